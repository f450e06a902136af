"""The local backend: each point in a fresh process on this machine, `--jobs` of them at once.

A fresh process per point keeps a crash, a leak or an out-of-memory kill to that point, and makes its
peak memory its own. The processes report through one queue; the loop below, in the caller's thread,
starts points as slots free up and turns a process that died without a word into a failure.
"""

import multiprocessing
import os
import queue
import signal
import threading
import time
from typing import Any, Sequence

from dpfl_bench.config import RunConfig
from dpfl_bench.errors import UserError
from dpfl_bench.execution import Crash, ExecutionConfig, OnEvent, PointEvent, run_point

LAST_WORDS_SECONDS = 2.0  # how long a point's final event may trail the exit of its process
STOP_SECONDS = 10.0  # how long interrupted points get to stop cleanly before they are terminated


class LocalBackend:
    def __init__(self, config: ExecutionConfig) -> None:
        self.config = config
        self.jobs = config.jobs or 1
        # Several points at once share the cores instead of each taking all of them.
        self.threads = max(1, (os.cpu_count() or 1) // self.jobs) if self.jobs > 1 else 0

    def run(self, points: Sequence[RunConfig], on_event: OnEvent) -> None:
        context = multiprocessing.get_context("spawn")  # a clean interpreter: no state shared with this one
        events = context.Queue()
        waiting = list(range(len(points)))
        running: dict[int, Any] = {}  # point -> its process
        exited: dict[int, float] = {}  # point -> when its process was seen dead without a final event
        try:
            while waiting or running:
                while waiting and len(running) < self.jobs:
                    index = waiting.pop(0)
                    args = (index, points[index], self.config.checkpointing, events, os.getpid(), self.threads)
                    running[index] = context.Process(target=_point_process, args=args, daemon=True)
                    running[index].start()
                try:
                    event: PointEvent | None = events.get(timeout=0.2)
                except queue.Empty:
                    event = None
                if event is not None:
                    on_event(event)
                    if event.kind in ("finished", "failed"):
                        running.pop(event.point).join()
                        exited.pop(event.point, None)
                for index, process in list(running.items()):
                    if process.is_alive():
                        continue
                    if time.monotonic() - exited.setdefault(index, time.monotonic()) > LAST_WORDS_SECONDS:
                        running.pop(index)
                        on_event(PointEvent(index, "failed", message=_death(process.exitcode)))
        finally:
            _stop(list(running.values()))


def _point_process(index: int, config: RunConfig, checkpointing: Any, events: Any, sweep_pid: int, threads: int) -> None:
    threading.Thread(target=_exit_with_the_sweep, args=(sweep_pid,), daemon=True).start()
    try:
        run_point(index, config, checkpointing, events.put, threads)
    except KeyboardInterrupt:
        pass  # the sweep is stopping: the point keeps its checkpoint
    except (UserError, Crash) as e:
        events.put(PointEvent(index, "failed", message=str(e)))


def _exit_with_the_sweep(sweep_pid: int) -> None:
    """Stop this point when the sweep that started it is gone (killed outright), rather than run on unseen."""
    while os.getppid() == sweep_pid:
        time.sleep(1)
    os._exit(1)


def _death(code: int | None) -> str:
    how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
    return f"the run's process {how} before finishing" + (" (out of memory?)" if code == -signal.SIGKILL else "")


def _stop(processes: list[Any]) -> None:
    """Interrupted: let the points stop cleanly, then make sure they do."""
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGINT)
    deadline = time.monotonic() + STOP_SECONDS
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.terminate()
            process.join()
