"""Run results: one tidy Parquet file per run, one row per evaluated round.

The file is rewritten after every evaluation through a temporary file and an atomic rename, so an
interrupted run leaves the rounds it finished and never a half-written file.
"""

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dpfl_bench.files import write_atomically

SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("task", pa.string()),
        ("model", pa.string()),
        ("method", pa.string()),  # its name, or its variant's (e.g. "la-lora (authors' code)"; see Method.label)
        ("dp_level", pa.string()),  # the privacy mechanism: none | sample | client
        ("rng", pa.string()),  # seeded | secure
        ("eps_target", pa.float64()),  # inf for a non-private run
        ("delta", pa.float64()),
        ("noise_multiplier", pa.float64()),  # σ; noise std is σ·clip
        ("noise_multiplier_min", pa.float64()),  # smallest per-client σ (noise_multiplier is the largest)
        ("clip", pa.float64()),
        ("eps_spent", pa.float64()),  # largest ε spent by any client so far (client level: by the client set)
        ("eps_spent_mean", pa.float64()),  # mean over clients
        ("guarantee", pa.bool_()),  # an accounted (ε, δ) guarantee: false when non-private or under the authors' regime
        ("audit_canaries", pa.int64()),  # canaries of the empirical audit (0: none)
        ("audit_eps_lower", pa.float64()),  # the audit's 95% lower bound on ε (NaN without an audit)
        ("audit_eps_lower_fdp", pa.float64()),  # the same guesses' bound under a Gaussian trade-off curve (f-DP)
        ("audit_eps_estimate", pa.float64()),  # the audit's Gaussian-fit estimate of ε
        ("round", pa.int64()),  # 1-based: the number of rounds finished
        ("rounds_total", pa.int64()),
        ("test_accuracy", pa.float64()),
        ("test_loss", pa.float64()),
        ("val_accuracy", pa.float64()),  # global model on a validation split carved from the training data
        ("val_loss", pa.float64()),
        ("train_loss", pa.float64()),  # mean over the examples the round's clients trained on (NaN when secure)
        ("wall_seconds", pa.float64()),  # since the run started, evaluation included
        ("train_seconds", pa.float64()),  # local training and aggregation only, summed over rounds
        ("peak_memory_bytes", pa.int64()),  # CUDA peak allocation, or peak resident memory on CPU
        ("physical_batch_size", pa.int64()),  # examples per forward pass now, after any CUDA out-of-memory halving
        ("clients_together", pa.bool_()),  # a round's clients trained in one batched pass (--client-batching)
        ("threads", pa.int64()),  # torch's intra-op threads (--threads; a sweep's: cores / --jobs)
        ("bytes_uploaded_per_round", pa.float64()),  # all sampled clients together, mean over rounds so far
        ("seed", pa.int64()),
        ("config_json", pa.string()),  # the fully resolved configuration, method options included
        ("client_data_json", pa.string()),  # per client: examples, label histogram, Poisson rate (see docs/results.md)
        ("dpfl_bench_version", pa.string()),
        ("torch_version", pa.string()),
        ("peft_version", pa.string()),
        ("opacus_version", pa.string()),
        ("transformers_version", pa.string()),
    ]
)
SPECIAL_NUMBERS = {"inf": math.inf, "nan": math.nan}  # how a configuration's JSON writes them


def option_column(option: str) -> str:
    """The column that holds a run option, in results files and compare's tables: the option's name, or
    config.<name> where a results column has that name (dp_level, which a non-private run records as none)."""
    return f"config.{option}" if option in SCHEMA.names else option


def flat_options(config_json: str) -> dict:
    """A resolved configuration as flat option names (the names `run` takes, with underscores)."""
    flat = {}
    for key, value in json.loads(config_json).items():
        if isinstance(value, dict) and key != "method_options":
            flat.update(value)
        elif key == "method_options":
            flat.update({f"method_options.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return {k: SPECIAL_NUMBERS.get(v, v) if isinstance(v, str) else v for k, v in flat.items()}


def option_values(config_json: str) -> dict[str, Any]:
    """A run's options as columns of its rows (`option_column` names), so that `df.groupby("lr")` works on a
    results file as it is: lists (of targets) as comma-joined text. `out` is left out: where the file is
    says it, and the same run written elsewhere has the same rows."""
    return {option_column(k): ",".join(map(str, v)) if isinstance(v, list) else v
            for k, v in flat_options(config_json).items() if k != "out"}


ADDED_SINCE_0_4 = ("physical_batch_size", "clients_together", "threads", "audit_eps_lower_fdp")  # read as empty from older files


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """Write `rows` to `path` atomically: readers see the old file or the new one, never a partial one."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    for name in sorted({k for row in rows for k in row} - set(SCHEMA.names)):  # the options, after the fixed columns
        table = table.append_column(name, pa.array([row.get(name) for row in rows]))
    write_atomically(path, lambda file: pq.write_table(table, file))


class NotAResultsFile(ValueError):
    """A readable Parquet file, but not one that dpfl-bench wrote."""


def read_run(path: Path) -> pd.DataFrame:
    """One run's rows; raises NotAResultsFile for a foreign Parquet file, pyarrow's errors for a damaged one."""
    table = pq.read_table(path)
    for name in ADDED_SINCE_0_4:
        if name not in table.column_names:
            table = table.append_column(SCHEMA.field(name), pa.nulls(len(table), SCHEMA.field(name).type))
    missing = set(SCHEMA.names) - set(table.column_names)
    if missing:
        other_version = "run_id" in table.column_names and "config_json" in table.column_names
        what = "from another version of dpfl-bench" if other_version else "not a dpfl-bench results file"
        raise NotAResultsFile(f"{path} is {what} (missing {', '.join(sorted(missing))})")
    options = [n for n in table.column_names if n not in SCHEMA.names]
    return table.select([*SCHEMA.names, *options]).to_pandas()
