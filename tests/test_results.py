"""The Parquet results file: schema round-trip, atomic rewrites, and rejecting foreign files."""

import math
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpfl_bench import results
from dpfl_bench.results import SCHEMA, read_run, write_rows


def make_row(round: int, **overrides) -> dict:
    """A row with a value for every column of SCHEMA, of the column's type."""
    row = {}
    for field in SCHEMA:
        if pa.types.is_string(field.type):
            row[field.name] = f"{field.name}-{round}"
        elif pa.types.is_int64(field.type):
            row[field.name] = 1000 * round + len(field.name)
        elif pa.types.is_float64(field.type):
            row[field.name] = round + len(field.name) / 7
        elif pa.types.is_boolean(field.type):
            row[field.name] = round % 2 == 1
        else:  # a new column type: extend this helper
            raise AssertionError(f"unexpected type {field.type} for {field.name}")
    row.update(overrides)
    return row


def test_schema_columns_have_the_types_the_runner_writes():
    # a guard so that make_row covers every column
    assert set(str(f.type) for f in SCHEMA) <= {"string", "int64", "double", "bool"}
    assert len(SCHEMA.names) == len(set(SCHEMA.names))


def test_round_trip_preserves_every_column_value_and_dtype(tmp_path):
    rows = [
        make_row(1, eps_target=math.inf, eps_spent=math.inf, clip=math.inf, dp_level="none"),
        make_row(2, eps_target=1.0, eps_spent=0.73, peak_memory_bytes=2**40, config_json='{"eps": "inf"}'),
    ]
    path = tmp_path / "sub" / "run.parquet"  # the folder is created
    write_rows(rows, path)

    assert pq.read_schema(path).remove_metadata() == SCHEMA
    df = read_run(path)
    assert list(df.columns) == SCHEMA.names
    assert len(df) == 2
    for field in SCHEMA:
        kind = df[field.name].dtype.kind
        if pa.types.is_int64(field.type):
            assert df[field.name].dtype == "int64", field.name
        elif pa.types.is_float64(field.type):
            assert df[field.name].dtype == "float64", field.name
        elif pa.types.is_boolean(field.type):
            assert df[field.name].dtype == "bool", field.name
        else:
            assert kind in "OU" or isinstance(df[field.name].dtype, pd.StringDtype), field.name
    for i, row in enumerate(rows):
        for name, value in row.items():
            assert df[name].iloc[i] == value, (i, name)
    assert math.isinf(df["eps_target"].iloc[0])


def test_write_rejects_a_row_of_the_wrong_type(tmp_path):
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError, TypeError)):
        write_rows([make_row(1, round="first")], tmp_path / "run.parquet")


def test_rewrite_replaces_the_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "run.parquet"
    write_rows([make_row(1)], path)
    write_rows([make_row(1), make_row(2)], path)
    assert list(read_run(path)["round"]) == [make_row(1)["round"], make_row(2)["round"]]
    assert os.listdir(tmp_path) == ["run.parquet"]


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "run.parquet"
    write_rows([make_row(1)], path)
    old_bytes = path.read_bytes()
    attempted = []

    def failing_write_table(table, where, *args, **kwargs):
        attempted.append(where.name)
        where.write(b"PAR1 partial")  # half a file, then the failure
        raise failure

    monkeypatch.setattr(results.pq, "write_table", failing_write_table)
    with pytest.raises(type(failure)):
        write_rows([make_row(1), make_row(2)], path)

    assert attempted and os.path.dirname(attempted[0]) == str(tmp_path), "written next to the target, not over it"
    assert os.path.abspath(attempted[0]) != os.path.abspath(path)
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ["run.parquet"]
    monkeypatch.undo()
    assert len(read_run(path)) == 1


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    def failing_write_table(table, where, *args, **kwargs):
        raise OSError("no space")

    monkeypatch.setattr(results.pq, "write_table", failing_write_table)
    with pytest.raises(OSError):
        write_rows([make_row(1)], tmp_path / "run.parquet")
    assert os.listdir(tmp_path) == []


def test_read_run_rejects_a_foreign_parquet_file(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"a": [1, 2], "round": [1, 2]}), path)
    with pytest.raises(ValueError, match="not a dpfl-bench results file") as info:
        read_run(path)
    assert "test_accuracy" in str(info.value)  # names what is missing


def test_read_run_rejects_a_file_missing_one_column(tmp_path):
    path = tmp_path / "almost.parquet"
    table = pa.Table.from_pylist([make_row(1)], schema=SCHEMA).drop_columns(["eps_spent"])
    pq.write_table(table, path)
    with pytest.raises(ValueError, match="eps_spent"):
        read_run(path)


def test_a_file_from_0_4_reads_with_the_columns_added_since_empty(tmp_path):
    path = tmp_path / "old.parquet"
    pq.write_table(pa.Table.from_pylist([make_row(1)], schema=SCHEMA).drop_columns(list(results.ADDED_SINCE_0_4)), path)
    df = read_run(path)
    assert list(df.columns) == SCHEMA.names
    assert df[list(results.ADDED_SINCE_0_4)].isna().all().all()
    assert df["eps_spent"].iloc[0] == make_row(1)["eps_spent"]


def test_results_file_mode_follows_the_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        path = tmp_path / "run.parquet"
        write_rows([make_row(1)], path)
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_every_option_is_a_column_of_a_runs_results(tmp_path):
    """`df.groupby("lr")` on a results file as it is: each resolved option its own column, named as its flag
    (config.<name> where a results column has the name), each method option as method_options.<name>."""
    import pandas as pd

    from dpfl_bench.configure import build_config
    from dpfl_bench.federated import run_federated
    from dpfl_bench.tasks import TASKS

    config = build_config({"task": "synthetic", "device": "cpu", "rounds": 1, "local-steps": 1, "lr": 0.02, "eps": float("inf"),
                           "method": "la-lora", "method-options": {"smooth_sigma": 0.5}, "out": str(tmp_path)},
                          TASKS.get("synthetic").defaults)
    df = pd.read_parquet(run_federated(config).path)
    assert df["lr"].tolist() == [0.02] and df["local_steps"].tolist() == [1] and df["eps"].tolist() == [float("inf")]
    assert df["method_options.smooth_sigma"].tolist() == [0.5]
    assert df["dp_level"].tolist() == ["none"] and df["config.dp_level"].tolist() == ["sample"]  # what ran, what was asked
    assert df["config.method"].tolist() == ["la-lora"]
