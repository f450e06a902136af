"""Results to the experiment trackers the field uses: TensorBoard event files (what pfl-research and NVFlare
write). A run is one TensorBoard run named by its run id: each evaluated round's figures as series against
the round, its options as hyperparameters, and what its numbers mean as text (the method, the privacy
regime, whether an accountant guarantees them).

`dpfl-bench export DIR --to tensorboard` writes finished and unfinished runs; `run --log-to tensorboard`
writes each evaluated round as it comes.
"""

import math
from pathlib import Path
from typing import Any

from dpfl_bench.errors import UserError
from dpfl_bench.results import flat_options

TRACKERS = ("tensorboard",)
SERIES = ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "train_loss", "eps_spent", "eps_spent_mean",
          "audit_eps_lower", "audit_eps_lower_fdp", "audit_eps_estimate", "bytes_uploaded_per_round", "wall_seconds")
HINT = "TensorBoard is not installed; pip install tensorboard (or: pip install 'dpfl-bench[trackers]')"


def check_tracker(name: str) -> None:
    """Refuse, in one line and before any work, a tracker that is unknown or not installed."""
    if name not in TRACKERS:
        raise UserError(f"the tracker must be one of {', '.join(TRACKERS)}, got {name!r}")
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise UserError(HINT) from None


class TensorBoardRun:
    """One run's event file under `folder`/<run id>; rows are logged as they come, the description once."""

    def __init__(self, folder: Path, run_id: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(HINT) from None
        self.writer = SummaryWriter(log_dir=str(folder / run_id))
        self.described = False

    def log(self, row: dict[str, Any]) -> None:
        if not self.described:
            self._describe(row)
        for name in SERIES:
            value = row.get(name)
            if value is not None and math.isfinite(float(value)):
                self.writer.add_scalar(name, float(value), int(row["round"]))
        self.writer.flush()

    def _describe(self, row: dict[str, Any]) -> None:
        guarantee = "an accounted (ε, δ) guarantee" if row["guarantee"] else "NO privacy guarantee"
        self.writer.add_text("run", f"{row['task']} · {row['method']} · dp_level {row['dp_level']} · ε target "
                                    f"{row['eps_target']} · δ {row['delta']} · {guarantee}")
        options = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_options(row["config_json"]).items()}
        self.writer.add_hparams({**options, "guarantee": bool(row["guarantee"])}, {}, run_name=".")
        self.described = True

    def close(self) -> None:
        self.writer.close()


def export_runs(rows_by_run: dict[str, list[dict[str, Any]]], to: str, folder: Path) -> None:
    """Every run's rows to the tracker `to`, under `folder`."""
    check_tracker(to)
    for run_id, rows in rows_by_run.items():
        run = TensorBoardRun(folder, run_id)
        for row in rows:
            run.log(row)
        run.close()
