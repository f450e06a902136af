"""`dpfl-bench check`: the CI regression gate passes on its own reference and fails on each kind of
regression with a table that names the run."""

import math
import shutil

import pytest
from support import assert_user_error, invoke, write_run

from dpfl_bench.results import read_run, write_rows


@pytest.fixture
def reference(tmp_path):
    """Four finished runs and the reference written from them; returns (results folder, reference file)."""
    results = tmp_path / "results"
    for method in ("dp-lora", "la-lora"):
        for eps in (1.0, math.inf):
            write_run(results, method=method, eps=eps, seed=0, accuracies=[0.4, 0.7])
    path = tmp_path / "reference.parquet"
    result = invoke("check", results, "--reference", path, "--update-reference")
    assert result.exit_code == 0, result.output
    return results, path


def rewrite(path, **changes) -> None:
    """Change columns of the last row of a results file."""
    rows = read_run(path).to_dict("records")
    rows[-1].update(changes)
    write_rows(rows, path)


def file_of(results, method: str, eps: float):
    return next(p for p in results.glob("*.parquet") if f"_{method}_eps{eps:g}_" in p.name)


def test_reference_holds_the_last_row_of_each_run(reference):
    results, path = reference
    ref = read_run(path)
    assert len(ref) == 4 and set(ref["round"]) == {2} and set(ref["test_accuracy"]) == {0.7}


def test_passes_on_the_reference_itself(reference):
    results, path = reference
    result = invoke("check", results, "--reference", path)
    assert result.exit_code == 0, result.output
    assert "check passed" in result.output and len(result.output.strip().splitlines()) == 1


def test_accuracy_within_tolerance_passes_and_beyond_it_fails(reference):
    results, path = reference
    rewrite(file_of(results, "la-lora", 1), test_accuracy=0.68)
    assert invoke("check", results, "--reference", path, "--tolerance", "0.03").exit_code == 0
    result = invoke("check", results, "--reference", path, "--tolerance", "0.01")
    assert result.exit_code == 1
    assert "synthetic · la-lora · ε=1 · seed 0" in result.output and "accuracy" in result.output
    assert "0.6800" in result.output and "1 problems" in result.output


def test_eps_over_target_fails(reference):
    results, path = reference
    rewrite(file_of(results, "dp-lora", 1), eps_spent=1.2)
    result = invoke("check", results, "--reference", path)
    assert result.exit_code == 1
    assert "ε over target" in result.output and "1.2000" in result.output


def test_nan_loss_is_reported_as_diverged(reference):
    results, path = reference
    rewrite(file_of(results, "la-lora", math.inf), test_loss=math.nan, test_accuracy=0.1)
    result = invoke("check", results, "--reference", path)
    assert result.exit_code == 1
    assert "diverged" in result.output and "from round 2" in result.output
    assert "accuracy" in result.output, "its accuracy fell too"


def test_missing_and_unfinished_runs_fail(reference):
    results, path = reference
    file_of(results, "dp-lora", math.inf).unlink()
    unfinished = file_of(results, "la-lora", 1)
    write_rows(read_run(unfinished).to_dict("records")[:1], unfinished)
    result = invoke("check", results, "--reference", path)
    assert result.exit_code == 1
    assert "no results file" in result.output and "unfinished (round 1)" in result.output
    assert "2 problems" in result.output


def test_an_unreadable_reference_is_a_one_line_error(reference, tmp_path):
    results, _ = reference
    for bad in (tmp_path / "none.parquet", tmp_path / "corrupt.parquet"):
        if bad.name == "corrupt.parquet":
            bad.write_text("not parquet")
        assert_user_error(invoke("check", results, "--reference", bad), "--update-reference")


def test_an_empty_results_folder_fails_clearly(reference, tmp_path):
    _, path = reference
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(invoke("check", empty, "--reference", path), "no finished runs")


def test_runs_are_matched_by_configuration_not_by_name(reference, tmp_path):
    """A run of a different configuration (here another lr) does not stand in for its reference run."""
    results, path = reference
    other = tmp_path / "other"
    shutil.copytree(results, other)
    file_of(other, "la-lora", 1).unlink()
    write_run(other, method="la-lora", eps=1.0, seed=0, accuracies=[0.4, 0.9], lr=0.5)
    result = invoke("check", other, "--reference", path)
    assert result.exit_code == 1 and "missing" in result.output


def test_a_reference_is_written_only_from_finished_finite_runs(reference, tmp_path):
    results, _ = reference
    write_run(results, method="rolora", eps=1.0, seed=0, accuracies=[0.3], rounds_total=2)
    path = tmp_path / "new-reference.parquet"
    result = invoke("check", results, "--reference", path, "--update-reference")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "unfinished (round 1 of 2)" in result.output and "finished, finite runs only" in result.output
    assert not path.exists()


def test_the_committed_smoke_reference_matches_the_smoke_suite():
    """The CI gate compares by run id: a change of defaults that renames the smoke runs must come with a
    new reference (this fails in a second, the CI check only after the smoke sweep)."""
    from pathlib import Path

    from dpfl_bench.federated import run_id
    from dpfl_bench.sweep import load_suite

    root = Path(__file__).parents[1]
    suite = load_suite(root / "benchmarks" / "smoke.toml")
    reference = read_run(root / "benchmarks" / "reference" / "smoke.parquet")
    assert sorted(run_id(c) for c in suite.points) == sorted(reference["run_id"])


@pytest.mark.parametrize("spent, passes", [(1.0, True), (1.0 + 5e-7, True), (1.0 + 1e-4, False), (1.001, False), (1.5, False)])
def test_eps_at_its_target_passes_and_any_margin_beyond_rounding_fails(reference, spent, passes):
    """The boundary: the calibration meets ε from below to within its bisection tolerance (1e-6 relative), so
    a run at its target passes and one a ten-thousandth over it fails."""
    results, path = reference
    rewrite(file_of(results, "la-lora", 1), eps_spent=spent)
    result = invoke("check", results, "--reference", path)
    assert (result.exit_code == 0) == passes, result.output
    assert ("ε over target" in result.output) == (not passes)


def test_an_earlier_round_over_target_fails_even_when_the_last_is_within(reference):
    results, path = reference
    run = file_of(results, "dp-lora", 1)
    rows = read_run(run).to_dict("records")
    rows[0]["eps_spent"], rows[-1]["eps_spent"] = 1.01, 1.0
    write_rows(rows, run)
    result = invoke("check", results, "--reference", path)
    assert result.exit_code == 1 and "ε over target" in result.output and "1.0100" in result.output
