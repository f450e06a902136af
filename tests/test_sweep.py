"""`dpfl-bench sweep`: suite files become the right grid of configurations, and a sweep interrupted in any
way finishes only what is missing, losing and duplicating nothing."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import assert_user_error, invoke

from dpfl_bench.errors import UserError
from dpfl_bench.federated import results_path
from dpfl_bench.results import read_run, write_rows
from dpfl_bench.sweep import is_finished, load_suite

TIMING = ["wall_seconds", "train_seconds", "peak_memory_bytes"]


def suite_file(tmp_path, text: str):
    path = tmp_path / "suite.toml"
    path.write_text(text if text.startswith("out =") else f'out = "{tmp_path / "results"}"\n' + text)
    return path


TINY = """
[base]
task = "synthetic"
rounds = 2
local-steps = 1
[grid]
method = ["dp-lora", "la-lora"]
eps = [1, inf]
"""
# For the tests that run a suite: non-private, so that no run waits for noise calibration.
RUNNABLE = TINY.replace("eps = [1, inf]", "eps = [inf]\nseed = [0, 1]")


def test_the_grid_is_every_combination_in_order_with_the_base_and_task_defaults(tmp_path):
    suite = load_suite(suite_file(tmp_path, TINY + "seed = [0, 1]\n"))
    assert [(c.method, c.privacy.eps, c.seed) for c in suite.points] == [
        (m, e, s) for m in ("dp-lora", "la-lora") for e in (1.0, float("inf")) for s in (0, 1)
    ]
    first = suite.points[0]
    assert first.federated.rounds == 2 and first.federated.local_steps == 1  # the base
    assert first.training.batch_size == 16 and first.federated.clients == 3  # synthetic's task defaults
    assert first.out == str(tmp_path / "results") and suite.varying == ["method", "eps", "seed"]


def test_method_options_apply_only_to_their_method_and_out_can_be_overridden(tmp_path):
    text = TINY + '[method-options.la-lora]\nsmooth_sigma = 0.0\n'
    suite = load_suite(suite_file(tmp_path, text), out=tmp_path / "elsewhere")
    options = {c.method: dict(c.method_options) for c in suite.points}
    assert options["la-lora"]["smooth_sigma"] == 0.0
    assert "smooth_sigma" not in options["dp-lora"]
    assert all(c.out == str(tmp_path / "elsewhere") for c in suite.points)


def test_a_methods_own_options_can_be_a_grid_axis(tmp_path):
    """LA-LoRA's filter on and off beside DP-LoRA: the axis applies to la-lora only, so 3 runs, not 4."""
    text = TINY.replace("eps = [1, inf]", "eps = [1]") + "[grid.method-options.la-lora]\nsmooth_sigma = [0.0, 1.0]\n"
    suite = load_suite(suite_file(tmp_path, text))
    assert [(c.method, c.method_options.get("smooth_sigma")) for c in suite.points] == [
        ("dp-lora", None),
        ("la-lora", 0.0),
        ("la-lora", 1.0),
    ]
    result = invoke("sweep", suite_file(tmp_path, text), "--dry-run")
    assert "la-lora (no filter) · ε=1 · seed 0 · smooth-sigma 0.0" in result.output, result.output


def test_an_axis_of_tables_sets_options_together_and_expands_lists_inside_a_table(tmp_path):
    """Regimes that take different options in one suite: the authors' level (no --eps) beside ε values,
    each with its own learning rates."""
    text = TINY.replace(
        "eps = [1, inf]",
        'regime = [{dp-level = "authors", lr = [0.001, 0.003]}, {eps = [1, 3], lr = 0.01}]',
    )
    suite = load_suite(suite_file(tmp_path, text))
    points = [(c.method, c.privacy.dp_level, str(c.privacy.eps), c.training.lr) for c in suite.points]  # str: nan == nan
    assert points == [
        (m, *rest) for m in ("dp-lora", "la-lora")
        for rest in (("authors", "nan", 0.001), ("authors", "nan", 0.003), ("sample", "1.0", 0.01), ("sample", "3.0", 0.01))
    ]
    assert suite.varying == ["method", "dp_level", "lr", "eps"]
    result = invoke("sweep", suite_file(tmp_path, text), "--dry-run")
    assert "dp-lora · authors σ=0.2 (no guarantee) · seed 0 · dp-level authors · lr 0.003" in result.output, result.output


def test_a_method_axis_of_tables_carries_each_variants_options_over_a_preset(tmp_path):
    """The paper-regime rows: a preset in [base] sets LA-LoRA to the authors' variant; a table restores the
    default, another switches the filter off; each run is labelled as its variant."""
    text = """
[base]
task = "synthetic"
preset = "authors-glue"
dp-level = "authors"
rounds = 1
[grid]
method = [{method = "dp-lora"}, {method = "la-lora"}, {method = "la-lora", method-options = {first_factor = "B", filter = "gaussian"}},
          {method = "la-lora", method-options = {first_factor = "B", filter = "gaussian", smooth_sigma = 0.0}}]
"""
    suite = load_suite(suite_file(tmp_path, text))
    assert [c.method for c in suite.points] == ["dp-lora", "la-lora", "la-lora", "la-lora"]
    assert [c.federated.client_selection for c in suite.points] == ["first"] * 4  # the preset
    la_lora = [dict(c.method_options) for c in suite.points[1:]]
    assert la_lora[0]["filter"] == "laplacian" and la_lora[0]["first_factor"] == "A"
    assert la_lora[1]["filter"] == "gaussian" and la_lora[1]["smooth_sigma"] == 1.0
    assert la_lora[2]["smooth_sigma"] == 0.0
    result = invoke("sweep", suite_file(tmp_path, text), "--dry-run")
    for label in ("la-lora (authors' code) · authors", "la-lora · authors", "la-lora (no filter) · authors"):
        assert label in result.output, result.output


def test_an_axis_mixing_tables_and_values_or_a_bad_table_is_one_line(tmp_path):
    mixed = TINY.replace("eps = [1, inf]", 'regime = [{eps = 1}, 3]')
    assert_user_error(invoke("sweep", suite_file(tmp_path, mixed), "--dry-run"), "mixes tables and plain values")
    authors_with_eps = TINY.replace("eps = [1, inf]", 'regime = [{dp-level = "authors", eps = 1}]')
    assert_user_error(invoke("sweep", suite_file(tmp_path, authors_with_eps), "--dry-run"), "--eps does not apply to --dp-level authors")


def test_identical_points_run_once(tmp_path):
    # rounds 2 is already the base's value: the grid's two values give one configuration
    suite = load_suite(suite_file(tmp_path, TINY.replace("[grid]", "[grid]\nrounds = [2, 2]")))
    assert len(suite.points) == 4


@pytest.mark.parametrize(
    "text, message",
    [
        ('colour = "red"\n' + TINY, "unknown key 'colour'"),
        (TINY + "seed = 3\n", "grid option 'seed' must be a non-empty list"),
        (TINY + "rank = []\n", "grid option 'rank' must be a non-empty list"),
        (TINY + "rounds = [2, 0]\n", "grid point method=dp-lora, eps=1, rounds=0: --rounds must be at least 1"),
        (TINY.replace("synthetic", "cifar-1000"), "unknown task 'cifar-1000'"),
        (TINY + "[method-options.la-lora]\nwidth = 3\n", "method 'la-lora' has no option 'width'"),
        (TINY + "[method-options.la_lora]\nsmooth_sigma = 0.0\n", "[method-options.la_lora] names no method"),
        (TINY + "[method-options]\nla-lora = 3\n", "[method-options.la-lora] must be a table"),
        ("out = 3\n" + TINY, "out must be a folder name in quotes"),
        (TINY + "[grid.method-options.la-lora]\nsmooth_sigma = 0.5\n", "grid option 'la-lora.smooth_sigma' must be a non-empty list"),
        ("[grid\n", "is not valid TOML"),
    ],
)
def test_bad_suites_are_one_line_errors_naming_the_problem(tmp_path, text, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_suite(suite_file(tmp_path, text))
    assert_user_error(invoke("sweep", suite_file(tmp_path, text), "--dry-run"), message)


def test_dry_run_lists_the_grid_and_runs_nothing(tmp_path):
    result = invoke("sweep", suite_file(tmp_path, TINY), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "4 runs, 0 finished, 4 to run" in result.output
    assert result.output.count("to run") == 5 and "synthetic · la-lora · ε=∞ (no DP) · seed 0" in result.output
    assert not (tmp_path / "results").exists()


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The tiny suite run once to the end: (suite file, its configurations, each run's rows)."""
    tmp_path = tmp_path_factory.mktemp("swept")
    path = suite_file(tmp_path, RUNNABLE)
    result = invoke("sweep", path)
    assert result.exit_code == 0, result.output
    configs = load_suite(path).points
    return path, configs, [read_run(results_path(c)) for c in configs]


def test_a_sweep_runs_every_point_to_its_last_round(swept):
    path, configs, runs = swept
    assert all(is_finished(c) for c in configs)
    assert [len(r) for r in runs] == [2, 2, 2, 2]
    assert sorted(p.name for p in results_path(configs[0]).parent.iterdir()) == sorted(results_path(c).name for c in configs)


def test_a_rerun_after_an_interruption_redoes_only_what_is_missing(swept):
    path, configs, runs = swept
    deleted, cut, damaged, kept = configs
    results_path(deleted).unlink()
    write_rows(runs[1].iloc[:1].to_dict("records"), results_path(cut))  # stopped after its first round
    results_path(damaged).write_bytes(b"half a file")  # e.g. copied while being written elsewhere
    kept_bytes, kept_mtime = results_path(kept).read_bytes(), results_path(kept).stat().st_mtime_ns

    result = invoke("sweep", path)
    assert result.exit_code == 0, result.output
    assert "4 runs, 1 finished, 3 to run" in result.output
    assert result.output.count("✓") == 3
    assert results_path(kept).read_bytes() == kept_bytes and results_path(kept).stat().st_mtime_ns == kept_mtime
    for config, before in zip(configs, runs):
        after = read_run(results_path(config))
        assert after.drop(columns=TIMING).equals(before.drop(columns=TIMING)), "the redone run equals the first"
    assert len(list(results_path(kept).parent.iterdir())) == 4, "no duplicate and no temporary file"


def test_an_interrupted_sweep_process_resumes_where_it_stopped(tmp_path):
    """A real interruption: `kill` (SIGTERM) during the second run, then the same command again. (Ctrl-C's
    SIGINT takes the same path, but a shell ignores it in background jobs, as CI may run this.)"""
    path = suite_file(tmp_path, TINY.replace("rounds = 2", "rounds = 3").replace("eps = [1, inf]", "eps = [inf]"))
    configs = load_suite(path).points
    command = [sys.executable, "-m", "dpfl_bench", "sweep", str(path)]
    sweep = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not is_finished(configs[0]) and time.monotonic() < deadline and sweep.poll() is None:
        time.sleep(0.2)
    assert is_finished(configs[0]), sweep.communicate()[0]
    sweep.send_signal(signal.SIGTERM)
    output, _ = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, output
    assert "run the same command again to resume" in output and "Traceback" not in output
    first_bytes = results_path(configs[0]).read_bytes()

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert results_path(configs[0]).read_bytes() == first_bytes, "a finished run is not run again"
    assert all(is_finished(c) for c in configs)
    assert sorted(os.listdir(tmp_path / "results")) == sorted(results_path(c).name for c in configs)


def test_a_failing_point_is_reported_and_the_others_still_run(tmp_path):
    path = suite_file(tmp_path, TINY.replace("eps = [1, inf]", "eps = [inf]"))
    configs = load_suite(path).points
    results_path(configs[0]).parent.mkdir(parents=True)
    results_path(configs[0]).mkdir()  # the run cannot write its results file
    result = invoke("sweep", path)
    assert result.exit_code == 1
    assert "1 of 2 runs failed" in result.output and "✗ synthetic · dp-lora" in result.output
    assert "IsADirectoryError" in result.output, "a crash is named in one line"
    assert "Traceback" in results_path(configs[0]).with_suffix(".error.log").read_text(), "and its traceback kept"
    assert is_finished(configs[1])


SUITES = sorted((Path(__file__).parents[1] / "benchmarks").glob("*.toml"))


@pytest.mark.parametrize("suite", SUITES, ids=[s.name for s in SUITES])
def test_every_shipped_suite_parses_and_dry_runs(suite, tmp_path):
    """The paper's suites must parse and dry-run even on a machine that cannot run them."""
    assert load_suite(suite).points
    result = invoke("sweep", suite, "--dry-run", "--out", tmp_path)
    assert result.exit_code == 0, result.output


def test_the_readme_suite_example_is_a_valid_suite(tmp_path):
    readme = (Path(__file__).parents[1] / "docs" / "commands.md").read_text()
    example = readme.split("### `dpfl-bench sweep`", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "example.toml"
    path.write_text(example)
    suite = load_suite(path)
    assert len(suite.points) == 12 and suite.points[-1].method_options["smooth_sigma"] == 1.0


def test_the_run_id_ignores_where_results_go_and_how_many_workers_load_data():
    """A sweep resumed with another --out or --workers must still recognise its finished runs."""
    from dpfl_bench.configure import build_config
    from dpfl_bench.federated import run_id

    base = build_config({"task": "synthetic"})
    assert run_id(base) == run_id(build_config({"task": "synthetic", "out": "elsewhere", "workers": 3}))
    assert run_id(base) != run_id(build_config({"task": "synthetic", "lr": 0.5}))
    assert run_id(base) != run_id(build_config({"task": "synthetic", "precision": "bf16"}))


def test_the_paper_regime_confirm_suite_repeats_stage_1s_configurations_longer_on_three_seeds(tmp_path, monkeypatch):
    """Stage 2 of benchmarks/paper-regime.toml must run the very configurations stage 1 chose from, only
    longer, so each written point, on seed 0 and at stage 1's rounds, has the run id of its stage-1 run."""
    benchmarks = Path(__file__).parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    monkeypatch.chdir(benchmarks.parent)
    import paper_regime_confirm as confirm

    from dpfl_bench.federated import run_id

    stage_1 = load_suite(confirm.STAGE_1, tmp_path)
    picked = stage_1.points[::7]  # every regime and method variant turns up
    text = confirm._suite_text([confirm._point(json.loads(c.to_json())) for c in picked])
    (tmp_path / "stage-2.toml").write_text(text)
    stage_2 = load_suite(tmp_path / "stage-2.toml", tmp_path)
    assert {(c.seed, c.federated.rounds) for c in stage_2.points} == {(s, confirm.ROUNDS) for s in (0, 1, 2)}
    path = tmp_path / "confirm.toml"
    path.write_text(text.replace("seed = [0, 1, 2]", "seed = [0]").replace(f"rounds = {confirm.ROUNDS}", "rounds = 100"))
    again = load_suite(path, tmp_path)
    assert [run_id(c) for c in again.points] == [run_id(c) for c in picked]
    assert len({c.method_options.get("filter") for c in picked if c.method == "la-lora"}) == 2


def test_a_dry_run_estimates_the_time_left_from_the_runs_saved_so_far(tmp_path):
    from dpfl_bench.federated import run_federated
    from dpfl_bench.sweep import estimate_seconds

    suite = load_suite(suite_file(tmp_path, RUNNABLE))
    assert estimate_seconds(suite.points) is None
    unsaved = " ".join(invoke("sweep", suite_file(tmp_path, RUNNABLE), "--dry-run").output.split())
    assert "no run of this suite has saved a round yet; add --probe" in unsaved
    probed = " ".join(invoke("sweep", suite_file(tmp_path, RUNNABLE), "--dry-run", "--probe").output.split())
    assert "from a one-round probe of the first point" in probed
    assert not list(tmp_path.rglob("*.parquet"))  # the probe leaves nothing behind
    first = run_federated(suite.points[0]).rows[-1]
    per_round = first["wall_seconds"] / first["round"]
    seconds, runs = estimate_seconds(suite.points)
    dp_lora_left = sum(c.federated.rounds for c in suite.points[1:] if c.method == "dp-lora")
    la_lora_left = sum(c.federated.rounds for c in suite.points if c.method == "la-lora")
    assert runs == 1 and seconds == pytest.approx(per_round * (dp_lora_left + la_lora_left))
    result = invoke("sweep", suite_file(tmp_path, RUNNABLE), "--dry-run", "--jobs", "2")
    assert f"about {seconds / 3600 / 2:.1f} h with --jobs 2" in " ".join(result.output.split())
    la_lora_only = estimate_seconds([c for c in suite.points if c.method == "la-lora"], measured=suite.points)
    assert la_lora_only == (pytest.approx(per_round * la_lora_left), 1)  # timed from dp-lora's saved run


def test_a_dry_run_does_not_count_the_rounds_an_extension_copies(tmp_path):
    from dpfl_bench.checkpoint import CheckpointConfig
    from dpfl_bench.federated import run_federated
    from dpfl_bench.sweep import estimate_seconds

    short = load_suite(suite_file(tmp_path, RUNNABLE), tmp_path / "short")
    long = load_suite(suite_file(tmp_path, RUNNABLE.replace("rounds = 2", "rounds = 4")), tmp_path / "long")
    kept = run_federated(short.points[0], checkpointing=CheckpointConfig(keep=True)).rows[-1]
    per_round = kept["wall_seconds"] / kept["round"]
    assert estimate_seconds(long.points, measured=short.points) == (pytest.approx(per_round * 16), 1)
    extending = CheckpointConfig(extend_from=str(tmp_path / "short"))
    assert estimate_seconds(long.points, short.points, extending) == (pytest.approx(per_round * 14), 1), "2 of 4 rounds copied"


def test_where_selects_points_by_option_value_and_variant_label(tmp_path):
    from dpfl_bench.sweep import select_points

    text = TINY + "seed = [0, 1]\n" + '[grid.method-options.la-lora]\nfilter = ["laplacian", "gaussian"]\n'
    points = load_suite(suite_file(tmp_path, text)).points
    assert [(c.method, c.seed) for c in select_points(points, {"eps": "inf", "seed": "1"})] == [
        ("dp-lora", 1), ("la-lora", 1), ("la-lora", 1)]
    assert {c.privacy.eps for c in select_points(points, {"eps": "1.0"})} == {1.0}  # numbers as numbers
    filtered = select_points(points, {"method_options.filter": "laplacian", "eps": "1"})
    assert [(c.method, dict(c.method_options)["filter"], c.seed) for c in filtered] == [("la-lora", "laplacian", s) for s in (0, 1)]
    assert select_points(points, {"dp-level": "sample"}) == points  # dashes as on the command line
    with pytest.raises(UserError, match="--where colour: not an option of this suite's runs"):
        select_points(points, {"colour": "red"})
    with pytest.raises(UserError, match="--where eps=2: no point of the suite matches"):
        select_points(points, {"eps": "2"})


def test_a_sweep_where_runs_only_the_chosen_points(tmp_path):
    path = suite_file(tmp_path, RUNNABLE)
    result = invoke("sweep", path, "--where", "method=la-lora", "--where", "seed=1")
    assert result.exit_code == 0, result.output
    assert "1 runs (of 4, by --where), 0 finished, 1 to run" in " ".join(result.output.split())
    assert [(c.method, c.seed) for c in load_suite(path).points if is_finished(c)] == [("la-lora", 1)]
    assert_user_error(invoke("sweep", path, "--where", "seed"), "--where takes KEY=VALUE, got 'seed'")


def test_stage_2_takes_each_finished_cell_and_holds_back_edges_and_unfinished_cells(tmp_path, monkeypatch):
    """paper_regime_confirm.choose: a cell is confirmed once all its learning rates have finished, at the
    rate with the best validation accuracy, unless that rate is an edge of its grid."""
    benchmarks = Path(__file__).parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    import paper_regime_confirm as confirm

    from dpfl_bench.compare import load_results

    path = suite_file(tmp_path, RUNNABLE.replace("seed = [0, 1]", "lr = [0.01, 0.03, 0.1]"))
    assert invoke("sweep", path, "--where", "method=dp-lora").exit_code == 0
    stage_1, finals = load_suite(path), load_results(tmp_path / "results").finals
    for best, expected in ((0.03, "chosen"), (0.1, "edge")):
        scores = finals.assign(val_accuracy=[0.9 if lr == best else 0.5 for lr in finals["lr"]])
        chosen, held_back = confirm.choose(stage_1, scores)
        assert "la-lora · ε=∞ (no DP): 0 of 3 learning rates finished" in held_back
        if expected == "chosen":
            assert list(chosen["lr"]) == [0.03] and list(chosen["method"]) == ["dp-lora"] and len(held_back) == 1
        else:
            assert chosen.empty and "dp-lora · ε=∞ (no DP): chose lr 0.1, an edge of its grid; extend it and run stage 1 again" in held_back
