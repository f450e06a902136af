"""Execution backends: a suite gives the same rows on Ray as locally; a Ray worker killed mid-point is
retried and resumes; an interrupted Ray sweep, run again, finishes with nothing run twice or lost; the
library never imports the CLI."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import assert_one_line_error, invoke

from dpfl_bench.execution import ExecutionConfig, create_backend
from dpfl_bench.federated import results_path
from dpfl_bench.results import read_run
from dpfl_bench.sweep import is_finished, load_suite

TIMING = ["wall_seconds", "train_seconds", "peak_memory_bytes"]
SUITE = """
[base]
task = "synthetic"
rounds = 3
local-steps = 2
[grid]
method = ["dp-lora", "rolora"]
regime = [{eps = 1}, {eps = "inf"}]
"""
SOURCE = Path(__file__).parents[1] / "src" / "dpfl_bench"


def suite_file(folder: Path, text: str = SUITE) -> Path:
    path = folder / "suite.toml"
    path.write_text(f'out = "{folder / "results"}"\n' + text.replace('"inf"', "inf"))
    return path


def rows_of(configs) -> list:
    """Each point's rows without the timings, the threads (Ray's points take one each) and config_json
    (which names the results folder)."""
    return [read_run(results_path(c)).drop(columns=[*TIMING, "threads", "config_json"]) for c in configs]


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def test_the_library_never_imports_the_cli():
    """Dependencies go one way: only the CLI (and `python -m`) may import the CLI."""
    imports_cli = re.compile(r"dpfl_bench\.cli\b|from dpfl_bench import .*\bcli\b")
    importers = [p.name for p in SOURCE.rglob("*.py") if imports_cli.search(p.read_text()) and p.name != "__main__.py"]
    assert importers == []
    modules = "dpfl_bench.sweep, dpfl_bench.execution.local, dpfl_bench.execution.ray_backend, dpfl_bench.progress"
    code = f"import sys, {modules}; assert 'dpfl_bench.cli' not in sys.modules, 'the CLI was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_ray_sweep_gives_the_rows_of_the_local_backend(ray_instance, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "ray"
    local.mkdir(), remote.mkdir()
    on_local, on_ray = load_suite(suite_file(local)).points, load_suite(suite_file(remote)).points
    seen = []
    create_backend(ExecutionConfig(jobs=2)).run(on_local, lambda e: None)
    create_backend(ExecutionConfig(backend="ray", jobs=2)).run(on_ray, seen.append)
    assert all(is_finished(c) for c in on_local + on_ray)
    for a, b in zip(rows_of(on_local), rows_of(on_ray)):
        assert a.equals(b)
    workers = {e.worker for e in seen if e.kind == "started"}
    assert len(workers) <= 2 < len(on_ray), "four points on two reused workers"


def test_a_killed_ray_worker_is_retried_and_the_point_resumes_to_the_same_rows(ray_instance, tmp_path):
    text = SUITE.replace("rounds = 3", "rounds = 40").replace('["dp-lora", "rolora"]', '["rolora"]').replace(', {eps = "inf"}', "")
    expected_folder, killed_folder = tmp_path / "whole", tmp_path / "killed"
    expected_folder.mkdir(), killed_folder.mkdir()
    whole, killed = load_suite(suite_file(expected_folder, text)).points, load_suite(suite_file(killed_folder, text)).points
    create_backend(ExecutionConfig()).run(whole, lambda e: None)

    events = []

    def kill_at_round_2(event):
        events.append(event)
        if event.kind == "round" and event.rounds_done == 2 and len([e for e in events if e.kind == "started"]) == 1:
            os.kill(int(event.worker.rsplit(":", 1)[1]), signal.SIGKILL)

    create_backend(ExecutionConfig(backend="ray", retries=1)).run(killed, kill_at_round_2)
    started = [e for e in events if e.kind == "started"]
    assert len(started) == 2 and started[0].worker != started[1].worker, "retried on a new worker"
    assert started[1].rounds_done >= 2 and "resuming from round" in started[1].message
    assert [e.kind for e in events][-1] == "finished"
    assert rows_of(whole)[0].equals(rows_of(killed)[0])


def test_a_crashing_point_is_retried_then_reported_and_the_others_go_on(ray_instance, tmp_path):
    path = suite_file(tmp_path)
    configs = load_suite(path).points
    results_path(configs[0]).parent.mkdir(parents=True)
    results_path(configs[0]).mkdir()  # the run cannot write its results file: a crash on every attempt
    result = invoke("sweep", path, "--backend", "ray", "--retries", 1)
    assert result.exit_code == 1, f"{result.exit_code}: {result.output} {result.exception!r}"
    assert "1 of 4 runs failed" in result.output and "IsADirectoryError" in result.output
    assert "↻" in result.output, "retried once before it was reported"
    assert "Traceback" in results_path(configs[0]).with_suffix(".error.log").read_text()
    assert all(is_finished(c) for c in configs[1:])


def test_an_interrupted_ray_sweep_run_again_runs_nothing_twice_and_loses_nothing(tmp_path):
    """SIGTERM (as `kill`, or Ctrl-C's SIGINT) after the first point, then the same command again."""
    pytest.importorskip("ray")
    path = suite_file(tmp_path, SUITE.replace("rounds = 3", "rounds = 6"))
    configs = load_suite(path).points
    command = [sys.executable, "-m", "dpfl_bench", "sweep", str(path), "--backend", "ray", "--jobs", "1"]
    sweep = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not is_finished(configs[0]) and sweep.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        sweep.send_signal(signal.SIGTERM)
        output, _ = sweep.communicate(timeout=120)
    finally:
        sweep.kill()
    assert sweep.returncode == 130, output
    assert "run the same command again to resume" in output and "Traceback" not in output
    finished = {results_path(c): results_path(c).stat().st_mtime_ns for c in configs if is_finished(c)}
    assert finished and len(finished) < len(configs)

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{len(finished)} finished, {len(configs) - len(finished)} to run" in rerun.stdout
    assert all(path.stat().st_mtime_ns == t for path, t in finished.items()), "a finished run is not run again"
    assert all(is_finished(c) for c in configs)
    assert sorted(os.listdir(tmp_path / "results")) == sorted(results_path(c).name for c in configs), "no checkpoint or temporary file left"


def test_without_ray_the_ray_backend_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    result = invoke("sweep", suite_file(tmp_path), "--backend", "ray")
    assert_one_line_error(result, 'pip install "dpfl-bench[ray]"')


BAD_OPTIONS = [
    (["--backend", "dask"], "--backend must be local or ray"),
    (["--gpus-per-run", "0.5"], "add --backend ray"),
    (["--jobs", "-1"], "--jobs must be 0"),
]


@pytest.mark.parametrize("args, fragment", BAD_OPTIONS)
def test_bad_execution_options_are_one_line_errors(args, fragment, tmp_path):
    result = invoke("sweep", suite_file(tmp_path), *args)
    assert result.exit_code == 1 and fragment in result.output and "Traceback" not in result.output


def test_local_workers_run_points_one_after_another_and_a_killed_one_fails_only_its_point(tmp_path):
    """One worker runs the points in turn (the same process for each); killed outright during a point, that
    point fails with the signal named, a new worker takes the next point, and every other point finishes."""
    text = SUITE.replace('regime = [{eps = 1}, {eps = "inf"}]', 'eps = ["inf"]\nseed = [0, 1, 2]').replace("rounds = 3", "rounds = 2")
    points = load_suite(suite_file(tmp_path, text)).points
    events, killed = [], []

    def on_event(event):
        events.append(event)
        if event.kind == "started" and event.point == 2 and not killed:
            killed.append(event.worker)
            os.kill(int(event.worker.rpartition(":")[2]), signal.SIGKILL)

    create_backend(ExecutionConfig(jobs=1)).run(points, on_event)
    ended = {e.point: e for e in events if e.kind in ("finished", "failed")}
    assert sorted(ended) == list(range(len(points)))
    assert ended[2].kind == "failed" and "killed by signal 9" in ended[2].message
    assert all(ended[i].kind == "finished" for i in range(len(points)) if i != 2)
    workers = [e.worker for e in events if e.kind == "started"]
    assert workers[0] == workers[1] == workers[2] == killed[0]  # reused until it was killed
    assert all(w != killed[0] for w in workers[3:]) and len(workers) == len(points)
    assert all(is_finished(c) for i, c in enumerate(points) if i != 2)
