"""One writer per results file: a second run of the same configuration refuses in one line while the first
lives, before printing anything; a lock left by a dead process is taken over; a run leaves no lock behind."""

import os
import socket
import subprocess
import sys

import pytest
from support import assert_user_error
from typer.testing import CliRunner

from dpfl_bench.cli import app
from dpfl_bench.configure import build_config
from dpfl_bench.errors import UserError
from dpfl_bench.federated import results_path, run_federated
from dpfl_bench.lock import lock_path, writer_lock
from dpfl_bench.tasks import TASKS

pytestmark = pytest.mark.usefixtures("one_thread")
OPTIONS = {"task": "synthetic", "device": "cpu", "rounds": 1, "local-steps": 1, "eps": float("inf")}


def config(tmp_path):
    return build_config({**OPTIONS, "out": str(tmp_path)}, TASKS.get("synthetic").defaults)


@pytest.fixture
def live_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def hold(path, pid: int) -> None:
    lock_path(path).write_text(f"{socket.gethostname()} {pid}")


def test_a_run_refuses_while_another_live_process_writes_its_results(tmp_path, live_process):
    run = config(tmp_path)
    hold(results_path(run), live_process)
    with pytest.raises(UserError, match=f"being written by another run \\(process {live_process} on"):
        run_federated(run)
    assert not results_path(run).exists() and lock_path(results_path(run)).exists()  # the holder's lock is kept


def test_the_cli_refuses_before_printing_anything(tmp_path, live_process):
    run = config(tmp_path)
    hold(results_path(run), live_process)
    args = ["run", *[f"--{k}={v}" for k, v in OPTIONS.items()], "--out", str(tmp_path)]
    assert_user_error(CliRunner().invoke(app, args), "being written by another run", str(lock_path(results_path(run))))


def test_a_dead_processs_lock_is_taken_over_and_a_run_leaves_none(tmp_path):
    run = config(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    hold(results_path(run), dead.pid)
    summary = run_federated(run)
    assert summary.path.exists() and not lock_path(summary.path).exists()


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    path = tmp_path / "run.parquet"
    lock_path(path).write_text("elsewhere.example 1")
    with pytest.raises(UserError, match="process 1 on elsewhere.example"):
        with writer_lock(path):
            pass


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    path = tmp_path / "run.parquet"
    with pytest.raises(RuntimeError):
        with writer_lock(path):
            assert lock_path(path).read_text() == f"{socket.gethostname()} {os.getpid()}"
            raise RuntimeError("a crash")
    assert not lock_path(path).exists()
