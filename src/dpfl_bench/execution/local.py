"""The local backend: `--jobs` worker processes on this machine, each running points one after another.

A worker is a fresh interpreter (spawned: no state shared with the sweep's) that imports torch once and
keeps what a point may reuse (the task's data, noise calibrations, the per-example self-check of a model
it has checked), so a point costs its training and little else. A crash or an out-of-memory kill stays
with its point: the point is reported failed and a new worker takes the next one. A point's peak memory
is the worker's high-water mark since the point started (`prepare` resets it), so it includes what the
worker keeps. The loop below, in the caller's thread, hands each idle worker its next point, passes on
each worker's events (from a queue of its own: a worker killed while writing to a shared queue would
leave its lock held) and turns a worker that died without a word into its point's failure.
"""

import multiprocessing
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from dpfl_bench.config import RunConfig
from dpfl_bench.errors import UserError
from dpfl_bench.execution import Crash, ExecutionConfig, OnEvent, PointEvent, run_point

LAST_WORDS_SECONDS = 2.0  # how long a point's final event may trail the exit of its process
STOP_SECONDS = 10.0  # how long interrupted points get to stop cleanly before they are terminated


@dataclass
class _Worker:
    process: Any
    inbox: Any  # the point indexes it is to run; None: stop
    outbox: Any  # its events (its own queue: a worker killed while writing to a shared one holds its lock); None: it quits
    point: int | None = None  # the point it runs now
    died: float | None = None  # when it was first seen dead while running `point`
    quitting: bool = False  # it said it takes no more points

    @property
    def available(self) -> bool:
        return self.point is None and not self.quitting and self.process.is_alive()


class LocalBackend:
    def __init__(self, config: ExecutionConfig) -> None:
        self.config = config
        self.jobs = config.jobs or 1
        # Several points at once share the cores instead of each taking all of them.
        self.threads = max(1, (os.cpu_count() or 1) // self.jobs) if self.jobs > 1 else 0

    def run(self, points: Sequence[RunConfig], on_event: OnEvent) -> None:
        context = multiprocessing.get_context("spawn")  # a clean interpreter: no state shared with this one
        waiting = list(range(len(points)))
        workers: list[_Worker] = []

        def start_worker() -> _Worker:
            inbox, outbox = context.Queue(), context.Queue()
            args = (points, self.config.checkpointing, inbox, outbox, os.getpid(), self.threads)
            worker = _Worker(context.Process(target=_worker_process, args=args, daemon=True), inbox, outbox)
            worker.process.start()
            return worker

        try:
            while waiting or any(w.point is not None for w in workers):
                workers = [w for w in workers if w.point is not None or (w.process.is_alive() and not w.quitting)]
                while len(workers) < min(self.jobs, len(waiting) + sum(w.point is not None for w in workers)):
                    workers.append(start_worker())
                for worker in workers:
                    if worker.available and waiting:
                        worker.point = waiting.pop(0)
                        worker.inbox.put(worker.point)
                if not any([self._deliver(worker, on_event) for worker in workers]):
                    time.sleep(0.1)
                for worker in workers:
                    if worker.point is None or worker.process.is_alive():
                        continue
                    if time.monotonic() - (worker.died or time.monotonic()) > LAST_WORDS_SECONDS:
                        on_event(PointEvent(worker.point, "failed", message=_death(worker.process.exitcode)))
                        worker.point = None
                    worker.died = worker.died or time.monotonic()
            for worker in workers:  # all done: the workers stop
                worker.inbox.put(None)
            for worker in workers:
                worker.process.join(timeout=STOP_SECONDS)
        finally:
            _stop([w.process for w in workers])

    @staticmethod
    def _deliver(worker: _Worker, on_event: OnEvent) -> bool:
        """Hand on the events `worker` has sent; whether there were any."""
        delivered = False
        while True:
            try:
                event: PointEvent | None = worker.outbox.get_nowait()
            except queue.Empty:
                return delivered
            delivered = True
            if event is None:
                worker.quitting = True
                continue
            on_event(event)
            if event.kind in ("finished", "failed") and event.point == worker.point:
                worker.point, worker.died = None, None


def _worker_process(points: Sequence[RunConfig], checkpointing: Any, inbox: Any, outbox: Any, sweep_pid: int, threads: int) -> None:
    threading.Thread(target=_exit_with_the_sweep, args=(sweep_pid,), daemon=True).start()
    try:
        while (index := inbox.get()) is not None:
            try:
                run_point(index, points[index], checkpointing, outbox.put, threads)
            except UserError as e:
                outbox.put(PointEvent(index, "failed", message=str(e)))
            except Crash as e:  # the process may be in a bad state (a CUDA assert, say): a new worker goes on
                outbox.put(None)  # first, so that the sweep never hands it another point
                outbox.put(PointEvent(index, "failed", message=str(e)))
                return
    except KeyboardInterrupt:
        pass  # the sweep is stopping: a point it ran keeps its checkpoint


def _exit_with_the_sweep(sweep_pid: int) -> None:
    """Stop this worker when the sweep that started it is gone (killed outright), rather than run on unseen."""
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
