"""Progress on a terminal: Rich bars for a run and a sweep, fed by the execution backends' events.

The CLI hands a `SweepProgress` to a backend as its `on_event`; nothing below the CLI prints.
"""

import math
from typing import TYPE_CHECKING, Any, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from dpfl_bench.config import RunConfig

if TYPE_CHECKING:  # execution imports torch and the whole core; `dpfl-bench --help` must not wait for it
    from dpfl_bench.execution import PointEvent


def progress_bars(console: Console) -> Progress:
    """A spinner while anything moves; bars advance within a round (per client-step), and the ETA is the
    remaining work at the speed so far."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _UnitAndStatus(),
        TimeElapsedColumn(),
        TextColumn("· ETA"),
        TimeRemainingColumn(),
        console=console,
    )


class _UnitAndStatus(ProgressColumn):
    """`rounds · acc 0.51 · elapsed`: the status only when there is one."""

    def render(self, task: Task) -> Text:
        status = task.fields.get("status", "")
        return Text(f"{task.fields['unit']}{' · ' + status if status else ''} · elapsed")


def round_status(row: dict[str, Any] | None) -> str:
    if not row:
        return ""
    status = f"acc {row['test_accuracy']:.3f}"
    return status + (f" · ε spent {row['eps_spent']:.2f}" if math.isfinite(row["eps_target"]) else "")


def run_label(config: RunConfig, varying: list[str]) -> str:
    """A point in a few words: task, method, privacy regime, seed and whatever else the suite varies."""
    from dpfl_bench.compare import flat_options, regime
    from dpfl_bench.method import create_method

    options, privacy = flat_options(config.to_json()), config.privacy
    column = regime(privacy.dp_level, privacy.accounted, privacy.eps, privacy.dp_sigma).label
    shown = [config.task, create_method(config.method, config.method_options).label, column, f"seed {config.seed}"]
    shown += [
        f"{k.removeprefix('method_options.').replace('_', '-')} {options[k]}"
        for k in varying
        if k not in ("task", "method", "eps", "dp_sigma", "seed") and k in options
    ]
    return " · ".join(shown)


class SweepProgress:
    """A suite bar, a bar per running point, and a line per ended point; collects the failures."""

    def __init__(self, progress: Progress, points: Sequence[RunConfig], varying: list[str], total: int) -> None:
        self.progress, self.points, self.labels = progress, points, [run_label(c, varying) for c in points]
        self.ended = total - len(points)  # points finished before this sweep count as done
        self.suite = progress.add_task("suite", total=total, completed=self.ended, status="", unit="runs")
        self.bars: dict[int, Any] = {}
        self.done: dict[int, float] = {}  # each running point's fraction done: the suite's ETA counts it
        self.failed: list[tuple[str, str]] = []
        self.notes: set[str] = set()
        self.loading: set[int] = set()  # started points that have not yet reported a round

    def __call__(self, event: "PointEvent") -> None:
        label, progress = self.labels[event.point], self.progress
        if event.kind == "started":
            if event.point in self.bars:  # a retry, on another worker
                progress.console.print(f"[yellow]↻[/] {label}: retrying on {event.worker}; {escape(event.message)}", highlight=False)
                progress.update(self.bars[event.point], completed=event.rounds_done)
                return
            status = f"resumed at round {event.rounds_done:g}" if event.rounds_done else "loading"
            self.loading.add(event.point)
            total = self.points[event.point].federated.rounds
            self.bars[event.point] = progress.add_task(f"  {label}", total=total, completed=event.rounds_done, status=status, unit="rounds")
            self._update_suite()
        elif event.kind == "note" and event.message not in self.notes:  # each different note once
            self.notes.add(event.message)
            progress.console.print(f"[yellow]note[/]: {escape(event.message)}", highlight=False)
        elif event.kind in ("round", "progress") and event.point in self.bars:
            bar = self.bars[event.point]
            if event.row:
                status = {"status": round_status(event.row)}
            else:  # loaded: its first round is under way
                status = {"status": "training"} if event.point in self.loading else {}
            self.loading.discard(event.point)
            progress.update(bar, completed=event.rounds_done, **status)
            self.done[event.point] = event.rounds_done / self.points[event.point].federated.rounds
            self._update_suite()
        elif event.kind in ("finished", "failed"):
            if event.kind == "finished":
                progress.console.print(f"[green]✓[/] {label}: {round_status(event.row)}", highlight=False)
            else:
                self.failed.append((label, event.message))
                progress.console.print(f"[red]✗[/] {label}: {escape(event.message)}", highlight=False)
            if event.point in self.bars:
                progress.remove_task(self.bars.pop(event.point))
            self.done.pop(event.point, None)
            self.ended += 1
            self._update_suite()

    def _update_suite(self) -> None:
        running = f"{len(self.bars)} running" if self.bars else ""
        failed = f"{len(self.failed)} failed" if self.failed else ""
        status = " · ".join(s for s in (running, failed) if s)
        self.progress.update(self.suite, completed=self.ended + sum(self.done.values()), status=status)
