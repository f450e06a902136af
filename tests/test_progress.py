"""Progress that tells the truth: a run reports when loading is done and advances within each round, a
sweep's suite bar counts the running points' fractions (so its ETA is the work left), and says how many run."""

import io

import pytest
from rich.console import Console

from dpfl_bench.configure import build_config
from dpfl_bench.execution import PointEvent
from dpfl_bench.federated import run_federated
from dpfl_bench.progress import SweepProgress, progress_bars
from dpfl_bench.tasks import TASKS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("batching, inside", [("off", 5), ("on", 1)])  # 3 clients × 2 steps, one by one or together
def test_a_run_reports_loading_done_then_advances_within_each_round(tmp_path, batching, inside):
    calls, rounds = [], []
    config = build_config({"task": "synthetic", "device": "cpu", "eps": float("inf"), "clients": 3, "participation": 1.0,
                           "rounds": 2, "local-steps": 2, "eval-every": 2, "client-batching": batching, "out": str(tmp_path)},
                          TASKS.get("synthetic").defaults)
    run_federated(config, on_round=lambda done, row: rounds.append((done, row)), on_progress=calls.append)
    assert rounds[0] == (0, None)  # loaded, before any training: the bar leaves "loading"
    assert [done for done, _ in rounds] == [0, 1, 2] and [row is not None for _, row in rounds] == [False, False, True]
    assert calls == sorted(calls) and calls[-1] == 2
    for round in range(2):
        assert len([d for d in calls if round < d < round + 1]) == inside


def test_the_suite_bar_counts_running_points_and_their_fractions():
    progress = progress_bars(Console(file=io.StringIO()))
    config = build_config({"task": "synthetic", "rounds": 4}, TASKS.get("synthetic").defaults)
    sweep = SweepProgress(progress, [config, config, config], [], total=3)
    sweep(PointEvent(0, "started"))
    sweep(PointEvent(1, "started"))
    sweep(PointEvent(0, "round", 2.0))
    sweep(PointEvent(1, "round", 1.0))
    suite = progress.tasks[0]
    assert suite.completed == pytest.approx(0.75) and suite.fields["status"] == "2 running"
    sweep(PointEvent(0, "finished", 4.0, {"test_accuracy": 0.5, "eps_spent": 1.0, "eps_target": 1.0}))
    assert suite.completed == pytest.approx(1.25) and suite.fields["status"] == "1 running"
