"""Where a sweep's points run. A backend runs a list of points and reports what happens as events.

The interface is one method, `Backend.run(points, on_event)`: run every point to its end (finished or
failed), calling `on_event` in the caller's thread for each `PointEvent`; on KeyboardInterrupt stop the
points, leave them resumable (each run keeps its checkpoint) and re-raise. Progress flows one way: the
caller hands in `on_event`; nothing here prints.

Backends: `local` (processes on this machine, `local.py`) and `ray` (Ray tasks on a local instance or a
cluster, `ray_backend.py`). Both run a point with `run_point`, so a point's rows do not depend on where
it ran.
"""

import os
import socket
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from dpfl_bench.checkpoint import CheckpointConfig
from dpfl_bench.config import RunConfig
from dpfl_bench.errors import UserError
from dpfl_bench.federated import find_resume, results_path, run_federated


@dataclass(frozen=True)
class PointEvent:
    point: int  # index into the points handed to the backend
    kind: str  # "started" | "round" | "progress" (within a round) | "note" | "finished" | "failed"
    rounds_done: float = 0  # started: the round it resumes from; round: the rounds finished; progress: done so far
    row: dict[str, float] | None = None  # an evaluated round's headline numbers (see `headline`)
    message: str = ""  # started: the resume note; note: a library's warning; failed: why, in one line
    worker: str = ""  # where the point runs: host:pid


OnEvent = Callable[[PointEvent], None]


class Backend(Protocol):
    def run(self, points: Sequence[RunConfig], on_event: OnEvent) -> None: ...


@dataclass(frozen=True)
class ExecutionConfig:
    """How a sweep runs its points. Not part of any run's identity."""

    backend: str = "local"  # local | ray
    jobs: int = 0  # points at once; 0: local 1, ray as many as the cluster's resources allow
    address: str = ""  # ray: auto or HOST:PORT of a running cluster; empty: a local instance
    cpus_per_run: int = 1  # ray: CPUs a point reserves (and its torch threads)
    gpus_per_run: float = 0.0  # ray: GPUs a point reserves, fractions allowed (0.25: four points share a GPU)
    retries: int = 2  # ray: attempts after a crash or a lost worker, each resuming from the checkpoint
    checkpointing: CheckpointConfig = CheckpointConfig()

    def __post_init__(self) -> None:
        def require(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        require(self.backend in ("local", "ray"), f"--backend must be local or ray, got {self.backend!r}")
        require(self.jobs >= 0, f"--jobs must be 0 (the backend's default) or more, got {self.jobs}")
        require(self.cpus_per_run >= 1, f"--cpus-per-run must be at least 1, got {self.cpus_per_run}")
        require(self.gpus_per_run >= 0, f"--gpus-per-run must be 0 or more, got {self.gpus_per_run}")
        require(self.retries >= 0, f"--retries must be 0 or more, got {self.retries}")
        require(
            self.backend == "ray" or (not self.address and self.gpus_per_run == 0 and self.cpus_per_run == 1),
            "--address, --gpus-per-run and --cpus-per-run are Ray options; add --backend ray",
        )


def create_backend(config: ExecutionConfig) -> Backend:
    if config.backend == "ray":
        from dpfl_bench.execution.ray_backend import RayBackend

        return RayBackend(config)
    from dpfl_bench.execution.local import LocalBackend

    return LocalBackend(config)


def run_point(index: int, config: RunConfig, checkpointing: CheckpointConfig, emit: OnEvent, threads: int = 0) -> None:
    """Run one point here, from its checkpoint if it has one, emitting its events. A UserError is the
    point's one-line failure; any other exception is a crash, whose traceback is written beside the results
    (`<run id>.error.log`) before it propagates."""
    quiet_libraries()
    if threads:
        import torch

        torch.set_num_threads(threads)
    worker, shown = f"{socket.gethostname()}:{os.getpid()}", warnings.showwarning
    log = results_path(config).with_suffix(".error.log")
    try:
        warnings.simplefilter("default")  # each point its own notes: resets what a reused worker has shown once
        warnings.showwarning = lambda message, *_, **__: emit(PointEvent(index, "note", message=str(message), worker=worker))
        resume = find_resume(config, checkpointing)
        emit(PointEvent(index, "started", resume.rounds_done, message=resume.note, worker=worker))
        summary = run_federated(
            config,
            on_round=lambda done, row: emit(PointEvent(index, "round", done, headline(row), worker=worker)),
            on_progress=lambda done: emit(PointEvent(index, "progress", done, worker=worker)),
            checkpointing=checkpointing,
            resume=resume,
        )
        log.unlink(missing_ok=True)  # an earlier attempt's crash report is out of date
        emit(PointEvent(index, "finished", config.federated.rounds, headline(summary.rows[-1]), worker=worker))
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:
        log.write_text(traceback.format_exc())
        raise Crash(f"{type(e).__name__}: {e} (traceback in {log})") from e
    finally:
        warnings.showwarning = shown
        release_device_memory()


class Crash(Exception):
    """A point's run raised something other than a UserError; its message names the traceback's file."""


def headline(row: dict[str, Any] | None) -> dict[str, float] | None:
    """What a progress line shows of an evaluated round."""
    return None if row is None else {k: float(row[k]) for k in ("test_accuracy", "eps_spent", "eps_target")}


def quiet_libraries() -> None:
    """Silence the libraries' own logging and progress bars: a run reports through its events."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import huggingface_hub
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # The hub client logs every retry of an unreachable hub; the task then reports it in one line.
    huggingface_hub.utils.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()


def release_device_memory() -> None:
    """A reused worker hands its cached CUDA memory back before the next point."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
