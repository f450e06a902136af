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

    regime = [                         # an axis of tables: options that change together; a list inside
      {dp-level = "authors", lr = [1e-3, 3e-3]},   # a table is a grid of its own (lr per regime here)
      {eps = 1, lr = [3e-3, 1e-2]},
    ]

    [grid.method-options.la-lora]      # a method's own option as an axis: only that method's runs vary
    smooth_sigma = [0.0, 1.0]

    method = [{method = "dp-lora"}, {method = "la-lora", method-options = {smooth_sigma = 0.0}}]  # or per table

    [method-options.rolora]            # options for one method, applied whenever it runs
    first_factor = "A"

A point's results file is named by its run id, a hash of its full configuration, so a point is finished
exactly when its file holds its last round. Running a suite again skips finished points and resumes an
unfinished one from its checkpoint: nothing finished is lost, nothing is run twice. Where and how points
run is `dpfl_bench.execution`'s business.
"""

import itertools
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from dpfl_bench.checkpoint import CheckpointConfig
from dpfl_bench.config import RunConfig, read_toml
from dpfl_bench.configure import build_config
from dpfl_bench.errors import UserError
from dpfl_bench.federated import find_resume, run_id, saved_rows


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
    if not isinstance(data.get("out", ""), str):
        raise UserError(f"suite {path}: out must be a folder name in quotes, e.g. out = \"results/mine\"")
    base = dict(tables["base"])
    if "method-options" in base:
        base["method_options"] = base.pop("method-options")
    fixed_method_options = _per_method(tables["method-options"], path, "[method-options")
    axes = _grid_axes(tables["grid"], path)
    out = Path(out or data.get("out", "results"))

    points: dict[str, RunConfig] = {}
    for values in itertools.product(*(axis.values for axis in axes)):
        options, in_a_table = {**base, "out": str(out)}, {}
        for axis, value in zip(axes, values):
            if axis.method is None and isinstance(value, dict):  # e.g. {method = "la-lora", method-options = {...}}
                value = dict(value)
                in_a_table |= value.pop("method-options", {}) | value.pop("method_options", {})
                options.update(value)
            elif axis.method is None:
                options[axis.option] = value
        method = options.get("method", RunConfig.method)
        method_options = {**options.get("method_options", {}), **fixed_method_options.get(method, {}), **in_a_table}
        method_options |= {a.option: v for a, v in zip(axes, values) if a.method == method}
        options["method_options"] = method_options
        point = ", ".join(f"{a.name}={_text(v)}" for a, v in zip(axes, values)) or "the base"
        try:
            config = build_config(options, TASKS.get(options.get("task", RunConfig.task)).defaults)
        except UserError as e:
            raise UserError(f"suite {path}, grid point {point}: {e}") from None
        points.setdefault(run_id(config), config)  # e.g. a la-lora option's values leave dp-lora's runs alike
    varying = [name for axis in axes for name in axis.varying]
    return Suite(path, str(data.get("description", "")), out, list(points.values()), varying)


@dataclass(frozen=True)
class _Axis:
    name: str  # as written in the suite
    option: str
    method: str | None  # set for a method's own option: it applies only to runs of that method
    values: list[Any]  # option values, or tables of options set together

    @property
    def varying(self) -> list[str]:
        """The options this axis varies, as the results name them (underscored)."""
        if self.method is not None:
            return [f"method_options.{self.option}"]
        keys = [self.option] if not isinstance(self.values[0], dict) else list(dict.fromkeys(k for v in self.values for k in v))
        return [k.replace("-", "_") for k in keys]


def _expand_tables(values: list[Any]) -> list[Any]:
    """An axis of tables: each table whose entries hold lists stands for every combination of them."""
    expanded = []
    for value in values:
        if not isinstance(value, dict):
            expanded.append(value)
            continue
        lists = {k: v if isinstance(v, list) else [v] for k, v in value.items()}
        expanded += [dict(zip(lists, combination)) for combination in itertools.product(*lists.values())]
    return expanded


def _text(value: Any) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in value.items()) + "}" if isinstance(value, dict) else str(value)


def _grid_axes(grid: Mapping[str, Any], path: Path) -> list[_Axis]:
    """The grid's lists in order: run options, then `[grid.method-options.<method>]` lists."""
    axes = [_Axis(key, key, None, values) for key, values in grid.items() if key != "method-options"]
    for method, options in _per_method(grid.get("method-options", {}), path, "[grid.method-options").items():
        axes += [_Axis(f"{method}.{key}", key, method, values) for key, values in options.items()]
    for axis in axes:
        if not isinstance(axis.values, list) or not axis.values:
            raise UserError(f"suite {path}: grid option {axis.name!r} must be a non-empty list, e.g. {axis.option} = [1, 2]")
        if len({isinstance(v, dict) for v in axis.values}) > 1:
            raise UserError(f"suite {path}: grid option {axis.name!r} mixes tables and plain values; use one kind")
    return [_Axis(a.name, a.option, a.method, _expand_tables(a.values)) for a in axes]


def _per_method(table: Any, path: Path, where: str) -> dict[str, dict[str, Any]]:
    """A table of method name -> table of that method's options, with the method names checked."""
    from dpfl_bench.method import load_methods

    methods = load_methods()
    if not isinstance(table, dict):
        raise UserError(f"suite {path}: {where}] must hold one table per method, e.g. {where}.la-lora]")
    for method, options in table.items():
        if method not in methods:  # a misspelt method would otherwise be ignored without a word
            raise UserError(f"suite {path}: {where}.{method}] names no method; choose one of: {', '.join(methods.names())}")
        if not isinstance(options, dict):
            raise UserError(f"suite {path}: {where}.{method}] must be a table of that method's options")
    return table


def select_points(points: Sequence[RunConfig], where: Mapping[str, str]) -> list[RunConfig]:
    """The points whose option equals its value for every `option: value` of `where`: option names as `run`
    takes them (dashes or underscores, `method_options.<name>` for a method's own), values as written on
    the command line (`inf`, `1e-3`, `true`); `method` matches a method's name or its variant's label.
    Raises UserError for an option no point has, or when no point matches (a misspelt value)."""
    from dpfl_bench.method import create_method
    from dpfl_bench.results import flat_options

    options = [flat_options(config.to_json()) for config in points]
    labels = [create_method(config.method, config.method_options).label for config in points]
    chosen = list(range(len(points)))
    for key, wanted in where.items():
        name = key.replace("-", "_")
        if not any(name in o for o in options):
            raise UserError(f"--where {key}: not an option of this suite's runs; e.g. method, eps, lr, seed, dp-level")
        chosen = [i for i in chosen if _equals(options[i].get(name), wanted) or (name == "method" and labels[i] == wanted)]
    if not chosen:
        pairs = " ".join(f"--where {k}={v}" for k, v in where.items())
        raise UserError(f"{pairs}: no point of the suite matches; `dpfl-bench sweep SUITE --dry-run` lists them")
    return [points[i] for i in chosen]


def _equals(value: Any, text: str) -> bool:
    """Whether an option's value is what the command line wrote: numbers as numbers (1e-3 is 0.001)."""
    if isinstance(value, bool):
        return text.lower() in (("true", "1", "yes") if value else ("false", "0", "no"))
    if isinstance(value, (int, float)):
        try:
            return float(text) == float(value)
        except ValueError:
            return False
    return str(value).lower() == text.lower()


def rounds_done(config: RunConfig) -> int:
    """How many rounds of this point are saved (0 when none, or when the file cannot be read)."""
    rows = saved_rows(config)
    return int(rows[-1]["round"]) if rows else 0


def is_finished(config: RunConfig) -> bool:
    return rounds_done(config) >= config.federated.rounds


def estimate_seconds(
    points: Sequence[RunConfig], measured: Sequence[RunConfig] = (), checkpointing: CheckpointConfig = CheckpointConfig(),
) -> tuple[float, int] | None:
    """Seconds the unfinished `points` need one after another, from the seconds per round (wall time,
    evaluation and start-up included) the saved runs among `points` and `measured` (the rest of the suite)
    took: each point at its method's median, or at all methods' when its method has none; the rounds an
    extension (`checkpointing.extend_from`) copies are not counted. With the number of runs it is estimated
    from; None before any run has saved a round."""
    per_round: dict[str, list[float]] = {}
    saved = {}
    for config in {run_id(c): c for c in [*points, *measured]}.values():
        rows = saved_rows(config)
        saved[run_id(config)] = int(rows[-1]["round"]) if rows else 0
        if rows:
            per_round.setdefault(config.method, []).append(float(rows[-1]["wall_seconds"]) / int(rows[-1]["round"]))
    if not per_round:
        return None
    everyone = statistics.median(s for seconds in per_round.values() for s in seconds)
    total = 0.0
    for config in points:
        left = config.federated.rounds - (saved[run_id(config)] or _copied_rounds(config, checkpointing))
        total += left * (statistics.median(per_round[config.method]) if config.method in per_round else everyone)
    return total, sum(map(len, per_round.values()))


def _copied_rounds(config: RunConfig, checkpointing: CheckpointConfig) -> int:
    """The rounds that extending (`--extend-from`) a point with nothing saved would copy from a shorter run."""
    if not checkpointing.extend_from:
        return 0
    resume = find_resume(config, checkpointing)
    return resume.checkpoint.rounds_done if resume.checkpoint is not None else 0


def probe_seconds_per_round(config: RunConfig) -> float:
    """Wall seconds of one round of `config` (start-up and evaluation included, so an estimate from it
    errs long), run to a temporary folder that is removed afterwards."""
    import dataclasses
    import tempfile

    from dpfl_bench.federated import run_federated

    with tempfile.TemporaryDirectory() as folder:
        one_round = dataclasses.replace(config, out=folder, federated=dataclasses.replace(config.federated, rounds=1))
        return float(run_federated(one_round).rows[-1]["wall_seconds"])
