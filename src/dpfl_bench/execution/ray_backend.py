"""The Ray backend: each point a Ray task with its own resources, on a local instance or a cluster.

- Workers are reused between points (Ray keeps a worker process per resource shape; `max_calls=0` keeps
  GPU workers too), so a point pays no interpreter start-up or torch import. Each point still measures its
  own peak memory: the run resets CUDA's peak statistics, and on Linux the process's resident high-water
  mark, when it starts (`federated.reset_peak_memory`). Caveat on CPU: memory a previous point freed but
  the allocator kept counts towards the next point's peak.
- Results: workers write each point's results file and checkpoint into the results folder themselves,
  atomically, exactly as a local run does. On a cluster that folder must be shared storage (NFS or the
  like) at the same path on every node; the driver only reads it.
- Progress: workers send their events through a Ray queue (an actor); the driver drains it.
- A lost worker (killed, out of memory, node gone) or a crash is retried up to `--retries` times, each
  attempt resuming from the point's checkpoint; a UserError is not retried (it would fail the same way).
- Ctrl-C or SIGTERM: every task is cancelled (KeyboardInterrupt in the worker), given a bounded time to
  stop, then force-cancelled; checkpoints make every point resumable.
"""

import signal
from typing import Any, Sequence

from dpfl_bench.checkpoint import CheckpointConfig
from dpfl_bench.config import RunConfig
from dpfl_bench.errors import UserError
from dpfl_bench.execution import ExecutionConfig, OnEvent, PointEvent, run_point
from dpfl_bench.federated import results_path

STOP_SECONDS = 10.0  # how long cancelled points get to stop cleanly before they are force-cancelled
POLL_SECONDS = 0.2


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError('--backend ray needs Ray: pip install "dpfl-bench[ray]" (or pip install "ray>=2.9")') from None
    return ray


class RayBackend:
    def __init__(self, config: ExecutionConfig) -> None:
        self.config = config
        self.ray = _import_ray()

    def run(self, points: Sequence[RunConfig], on_event: OnEvent) -> None:
        ray, config = self.ray, self.config
        started_here = not ray.is_initialized()
        if started_here:
            handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            ray.init(address=config.address or None, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            for signum, handler in handlers.items():  # Ray's own would exit at once; the caller's stop cleanly
                signal.signal(signum, handler)
        from ray.util.queue import Queue

        events = Queue()
        task = ray.remote(
            num_cpus=config.cpus_per_run,
            num_gpus=config.gpus_per_run,
            max_retries=config.retries,
            retry_exceptions=[_Retry],
            max_calls=0,  # reuse workers, GPU ones included (Ray's GPU default is one task per worker)
        )(_ray_point)
        limit = config.jobs or len(points)
        waiting = list(range(len(points)))
        running: dict[Any, int] = {}  # task reference -> point
        try:
            while waiting or running:
                while waiting and len(running) < limit:
                    index = waiting.pop(0)
                    running[task.remote(index, points[index], config.checkpointing, events, config.cpus_per_run)] = index
                done, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
                _drain(events, on_event)
                for ref in done:
                    index = running.pop(ref)
                    failure = self._outcome(ref, points[index])
                    _drain(events, on_event)  # the point's last rounds before its end
                    if failure is not None:
                        on_event(PointEvent(index, "failed", message=failure))
        except KeyboardInterrupt:
            self._cancel(list(running))
            raise
        finally:
            if started_here:
                ray.shutdown()

    def _outcome(self, ref: Any, config: RunConfig) -> str | None:
        """None when the point finished (its worker sent "finished"); else why it failed, in one line."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:  # still crashing after its retries
            return str(e.cause or e).splitlines()[0]
        except self.ray.exceptions.RayError as e:  # the worker or its node was lost on every attempt
            log = results_path(config).with_suffix(".error.log")
            log.write_text(str(e))
            return f"{type(e).__name__}: the worker was lost on every attempt ({self.config.retries} retries; details in {log})"

    def _cancel(self, refs: list[Any]) -> None:
        for ref in refs:
            self.ray.cancel(ref)
        _, stubborn = self.ray.wait(refs, num_returns=len(refs), timeout=STOP_SECONDS)
        for ref in stubborn:
            self.ray.cancel(ref, force=True)


class _Retry(Exception):
    """A crash, raised so that Ray retries the point (from its checkpoint)."""


def _ray_point(index: int, config: RunConfig, checkpointing: CheckpointConfig, events: Any, threads: int) -> str | None:
    from dpfl_bench.execution import Crash

    try:
        run_point(index, config, checkpointing, events.put, threads)
    except UserError as e:
        return str(e)
    except Crash as e:
        raise _Retry(str(e)) from e
    return None


def _drain(events: Any, on_event: OnEvent) -> None:
    size = events.size()
    if size:
        for event in events.get_nowait_batch(size):
            on_event(event)
