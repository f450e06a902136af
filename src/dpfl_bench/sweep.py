"""Benchmark suites: a base configuration and a grid, run point by point, resumable.

A suite is a TOML file:

    description = "what this suite answers"
    out = "results/smoke"              # where its runs are written (`--out` overrides)

    [base]                             # run options, as in `dpfl-bench run --config`
    task = "mnist"
    rounds = 2

    [grid]                             # every combination of these lists is one run
    method = ["dp-lora", "la-lora"]
    eps = [1, inf]
    seed = [0, 1, 2]

    [method-options.la-lora]           # options for one method, applied whenever it runs
    smooth_sigma = 1.0

A point's results file is named by its run id, a hash of its full configuration, so a point is finished
exactly when its file holds its last round. Running a suite again skips finished points and redoes an
unfinished one from the start: nothing finished is lost, nothing is run twice.
"""

import itertools
import multiprocessing
import os
import queue
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from dpfl_bench.config import RunConfig, build_config, read_toml
from dpfl_bench.errors import UserError
from dpfl_bench.federated import run_federated, run_id
from dpfl_bench.results import read_run


@dataclass(frozen=True)
class Suite:
    path: Path
    description: str
    out: Path
    points: list[RunConfig]  # in grid order, each distinct configuration once
    varying: list[str]  # the options the grid varies (underscored names)


def load_suite(path: Path, out: Path | None = None) -> Suite:
    """Read a suite file and build (and validate) the configuration of every grid point."""
    from dpfl_bench.tasks import TASKS

    data = read_toml(path, "suite")
    unknown = set(data) - {"description", "out", "base", "grid", "method-options"}
    if unknown:
        raise UserError(
            f"suite {path}: unknown key {min(unknown)!r}; a suite has description, out, [base], [grid], [method-options.<method>]"
        )
    tables = {key: data.get(key, {}) for key in ("base", "grid", "method-options")}
    for key, table in tables.items():
        if not isinstance(table, dict):
            raise UserError(f"suite {path}: [{key}] must be a table")
    base = dict(tables["base"])
    if "method-options" in base:
        base["method_options"] = base.pop("method-options")
    grid = tables["grid"]
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"suite {path}: grid option {key!r} must be a non-empty list, e.g. {key} = [1, 2]")
    out = Path(out or data.get("out", "results"))

    points: dict[str, RunConfig] = {}
    for values in itertools.product(*grid.values()):
        options = {**base, **dict(zip(grid, values)), "out": str(out)}
        method = options.get("method", RunConfig.method)
        method_options = tables["method-options"].get(method, {})
        options["method_options"] = {**options.get("method_options", {}), **method_options}
        point = ", ".join(f"{k}={v}" for k, v in zip(grid, values)) or "the base"
        try:
            config = build_config(options, TASKS.get(options.get("task", RunConfig.task)).defaults)
        except UserError as e:
            raise UserError(f"suite {path}, grid point {point}: {e}") from None
        points.setdefault(run_id(config), config)
    varying = [key.replace("-", "_") for key in grid]
    return Suite(path, str(data.get("description", "")), out, list(points.values()), varying)


def results_path(config: RunConfig) -> Path:
    return Path(config.out) / f"{run_id(config)}.parquet"


def rounds_done(config: RunConfig) -> int:
    """How many rounds of this point are saved (0 when none, or when the file cannot be read)."""
    path = results_path(config)
    try:
        return int(read_run(path)["round"].max()) if path.exists() else 0
    except Exception:  # a damaged file is redone, and replaced atomically when the rerun saves
        return 0


def is_finished(config: RunConfig) -> bool:
    return rounds_done(config) >= config.federated.rounds


# Messages from a point's process to the sweep: ("round", done, row) after every round; then
# ("finished", None, None) or ("failed", message, None).
Event = tuple[str, Any, Any]


def run_point(config: RunConfig, on_event: Callable[[Event], None]) -> None:
    """Run one grid point in a fresh process (its peak memory and any crash stay its own), passing its
    events to `on_event`. Raises UserError when the run fails; KeyboardInterrupt stops it."""
    context = multiprocessing.get_context("spawn")  # a clean interpreter: no state shared with this one
    events = context.Queue()
    process = context.Process(target=_point_process, args=(config, events, os.getpid()), daemon=True)
    process.start()
    outcome: Event | None = None
    try:
        while outcome is None:
            try:
                event = events.get(timeout=0.2)
            except queue.Empty:
                if not process.is_alive():
                    break
                continue
            if event[0] == "round":
                on_event(event)
            else:
                outcome = event
        process.join()
    finally:
        if process.is_alive():  # interrupted: stop the point; its finished rounds are on disk
            process.terminate()
            process.join()
    if outcome is None:
        raise UserError(f"the run's process died (exit code {process.exitcode}; out of memory?)")
    if outcome[0] == "failed":
        raise UserError(outcome[1])


def _point_process(config: RunConfig, events: Any, sweep_pid: int) -> None:
    from dpfl_bench.cli import _quiet_libraries

    def on_round(done: int, row: Mapping[str, Any] | None) -> None:
        if os.getppid() != sweep_pid:  # the sweep was killed outright: stop rather than run on unseen
            raise KeyboardInterrupt
        events.put(("round", done, _plain(row)))

    _quiet_libraries()
    try:
        run_federated(config, on_round=on_round)
        events.put(("finished", None, None))
    except KeyboardInterrupt:
        pass
    except UserError as e:
        events.put(("failed", str(e), None))
    except Exception as e:  # a crash: one line here, the traceback beside the results
        log = results_path(config).with_suffix(".error.log")
        log.write_text(traceback.format_exc())
        events.put(("failed", f"{type(e).__name__}: {e} (traceback in {log})", None))


def _plain(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if row is None else {k: row[k] for k in ("test_accuracy", "eps_spent", "eps_target")}


def points_to_run(suite: Suite) -> Iterator[RunConfig]:
    return (config for config in suite.points if not is_finished(config))
