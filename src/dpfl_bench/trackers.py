"""Results to the experiment trackers the field uses: TensorBoard event files (what pfl-research and NVFlare
write) and MLflow. A run is one tracker run named by its run id: each evaluated round's figures as series
against the round, its options as hyperparameters, and what its numbers mean (the method, the privacy
regime, whether an accountant guarantees them) as text or tags.

`dpfl-bench export DIR --to TRACKER` writes finished and unfinished runs; `run --log-to TRACKER` writes each
evaluated round as it comes, `sweep --log-to TRACKER` each run as it finishes.
"""

import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from dpfl_bench.errors import UserError
from dpfl_bench.results import flat_options

SERIES = ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "train_loss", "eps_spent", "eps_spent_mean",
          "audit_eps_lower", "audit_eps_lower_fdp", "audit_eps_estimate", "bytes_uploaded_per_round", "wall_seconds")
EXPERIMENT = "dpfl-bench"  # the MLflow experiment every run goes to
MARKER = "val_accuracy"  # the series whose steps say which rounds a tracker run already holds


class TrackerRun(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...
    def close(self) -> None: ...
    @staticmethod
    def view(folder: Path) -> str: ...  # the command that shows what was written under `folder`


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def _guarantee(row: dict[str, Any]) -> str:
    return "an accounted (ε, δ) guarantee" if row["guarantee"] else "NO privacy guarantee"


class TensorBoardRun:
    """One run's event files under `folder`/<run id>; rows are logged as they come, the description once.
    Like MLflowRun, a run id logged again (a resumed run, a repeated export) adds only the rounds its folder
    does not hold yet."""

    def __init__(self, folder: Path, run_id: str) -> None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        from torch.utils.tensorboard import SummaryWriter

        self.logged: set[int] = set()
        if (folder / run_id).exists():
            events = EventAccumulator(str(folder / run_id), size_guidance={"scalars": 0})
            events.Reload()
            if MARKER in events.Tags()["scalars"]:
                self.logged = {e.step for e in events.Scalars(MARKER)}
        self.writer = SummaryWriter(log_dir=str(folder / run_id))
        self.described = bool(self.logged)

    def log(self, row: dict[str, Any]) -> None:
        if not self.described:
            self._describe(row)
        if int(row["round"]) in self.logged:
            return
        self.logged.add(int(row["round"]))
        for name in SERIES:
            if _finite(row.get(name)):
                self.writer.add_scalar(name, float(row[name]), int(row["round"]))
        self.writer.flush()

    def _describe(self, row: dict[str, Any]) -> None:
        self.writer.add_text("run", f"{row['task']} · {row['method']} · dp_level {row['dp_level']} · ε target "
                                    f"{row['eps_target']} · δ {row['delta']} · {_guarantee(row)}")
        options = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_options(row["config_json"]).items()}
        self.writer.add_hparams({**options, "guarantee": bool(row["guarantee"])}, {}, run_name=".")
        self.described = True

    def close(self) -> None:
        self.writer.close()

    @staticmethod
    def view(folder: Path) -> str:
        return f"tensorboard --logdir {folder}"


class MLflowRun:
    """One run in MLflow's experiment `dpfl-bench`, named by its run id, at MLFLOW_TRACKING_URI when that is
    set, else in a SQLite store `folder`/mlflow.db (MLflow 3 keeps no plain-file store). The same run id logs
    into the same MLflow run again, skipping the rounds it holds: a resumed run or a repeated export adds
    only what is new. Finished runs end FINISHED, unfinished ones KILLED."""

    def __init__(self, folder: Path, run_id: str) -> None:
        import logging

        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # they announce every database migration
            logging.getLogger(name).setLevel(logging.WARNING)
        folder.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(folder / 'mlflow.db').resolve()}")
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`mlflow.runName` = '{run_id}'", max_results=1)
        self.run = found[0].info.run_id if found else self.client.create_run(experiment_id, run_name=run_id).info.run_id
        self.logged = {m.step for m in self.client.get_metric_history(self.run, MARKER)}
        self.described = bool(found)
        self.finished = False

    def log(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if not self.described:
            options = flat_options(row["config_json"])
            tags = {"task": row["task"], "method": row["method"], "dp_level": row["dp_level"],
                    "eps_target": row["eps_target"], "delta": row["delta"], "guarantee": _guarantee(row)}
            self.client.log_batch(self.run, params=[Param(k, str(v)) for k, v in options.items()],
                                  tags=[RunTag(k, str(v)) for k, v in tags.items()])
            self.described = True
        step = int(row["round"])
        self.finished = step == int(row["rounds_total"])
        if step in self.logged:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run, metrics=[Metric(n, float(row[n]), now, step) for n in SERIES if _finite(row.get(n))])
        self.logged.add(step)

    def close(self) -> None:
        self.client.set_terminated(self.run, "FINISHED" if self.finished else "KILLED")

    @staticmethod
    def view(folder: Path) -> str:
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return f"the MLflow server at {os.environ['MLFLOW_TRACKING_URI']}"
        return f"mlflow ui --backend-store-uri sqlite:///{folder}/mlflow.db"


TRACKERS = {  # name: (its class, the module it needs, how to install it)
    "tensorboard": (TensorBoardRun, "torch.utils.tensorboard", "pip install tensorboard"),
    "mlflow": (MLflowRun, "mlflow", "pip install mlflow"),
}


def check_tracker(name: str) -> None:
    """Refuse, in one line and before any work, a tracker that is unknown or not installed."""
    if name not in TRACKERS:
        raise UserError(f"the tracker must be one of {', '.join(TRACKERS)}, got {name!r}")
    _, module, install = TRACKERS[name]
    try:
        __import__(module)
    except ImportError:
        raise UserError(f"{name} is not installed; {install} (or: pip install 'dpfl-bench[trackers]')") from None


def view_command(name: str, folder: Path) -> str:
    """How to look at what tracker `name` wrote under `folder`."""
    return TRACKERS[name][0].view(folder)


def open_tracker(name: str, folder: Path, run_id: str) -> TrackerRun:
    """Run `run_id` in tracker `name` (checked with `check_tracker` first), its files under `folder`."""
    check_tracker(name)
    return TRACKERS[name][0](folder, run_id)


def export_runs(rows_by_run: dict[str, list[dict[str, Any]]], to: str, folder: Path) -> None:
    """Every run's rows to the tracker `to`, under `folder`."""
    for run_id, rows in rows_by_run.items():
        run = open_tracker(to, folder, run_id)
        for row in rows:
            run.log(row)
        run.close()
