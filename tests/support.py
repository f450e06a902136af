"""Shared by the command-line tests: invoking the CLI, and crafted results files with chosen numbers."""

import math
from pathlib import Path

from typer.testing import CliRunner

from dpfl_bench.cli import app
from dpfl_bench.configure import build_config
from dpfl_bench.federated import run_id
from dpfl_bench.method import create_method
from dpfl_bench.results import SCHEMA, write_rows


def invoke(*args: object):
    """Run `dpfl-bench ARGS` in this process and return typer's result (output, exit code)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def write_run(
    folder: Path,
    *,
    method: str,
    seed: int,
    accuracies: list[float],
    eps: float = math.nan,
    val_accuracies: list[float] | None = None,
    rounds_total: int | None = None,
    **options,
) -> Path:
    """A finished (or, with rounds_total > len(accuracies), unfinished) run whose round r has test accuracy
    accuracies[r-1] and validation accuracy val_accuracies[r-1] (default: the test accuracy), under the real
    run id of its configuration; other columns get plausible values. With the option dp_level="authors"
    (and its dp_sigma), a run of the authors' regime: no eps, no guarantee."""
    level = options.get("dp_level", options.get("dp-level", "sample"))
    authors = level == "authors"
    config = build_config({"task": "synthetic", "method": method, "seed": seed, **({} if authors else {"eps": eps}), **options})
    eps, private = config.privacy.eps, math.isfinite(config.privacy.eps)
    sigma = config.privacy.dp_sigma if authors else 1.0 if private else 0.0
    name = run_id(config)
    total = rounds_total or len(accuracies)
    rows = []
    for r, (accuracy, val_accuracy) in enumerate(zip(accuracies, val_accuracies or accuracies), 1):
        row = {column: "" for column in SCHEMA.names}
        row.update(
            run_id=name, task="synthetic", model="tiny", method=create_method(method, config.method_options).label,
            dp_level=level if authors or private else "none",
            rng="seeded", audit_canaries=0, audit_eps_lower=math.nan, audit_eps_lower_fdp=math.nan,
            audit_eps_estimate=math.nan,
            eps_target=eps, delta=1e-5, noise_multiplier=sigma, noise_multiplier_min=sigma, clip=1.0, guarantee=private,
            eps_spent=eps * r / total if private else eps, eps_spent_mean=0.0 if private else eps, round=r, rounds_total=total,
            test_accuracy=accuracy, test_loss=1.0 - accuracy, val_accuracy=val_accuracy, val_loss=1.0 - val_accuracy,
            train_loss=1.0, wall_seconds=10.0 * r, train_seconds=2.0 * r, peak_memory_bytes=1 << 20, physical_batch_size=64,
            clients_together=False, threads=1,
            bytes_uploaded_per_round=3e6, seed=seed, config_json=config.to_json(), client_data_json="[]",
        )
        rows.append(row)
    path = folder / f"{name}.parquet"
    write_rows(rows, path)
    return path


def assert_user_error(result, *texts: str) -> None:
    """A bad input's answer: exit code 1 from the CLI's own handling (not a crash, which CliRunner would
    also report as exit code 1), one line, naming what is wrong."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), f"crashed: {result.exception!r}"
    assert len(result.output.strip().splitlines()) == 1, result.output
    for text in texts:
        assert text in result.output, result.output


def assert_one_line_error(result, *fragments: str) -> str:
    """A run refused once it has started (after its header line): one error line on stderr, no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
