"""Read a folder of results files and summarize them: one cell per (task, method, ε), over seeds.

Loading is forgiving, summarizing is strict: a file that is corrupt, foreign, unfinished or a duplicate is
skipped with a one-line warning, but runs that differ in anything other than their seed are never
averaged into one cell without saying so.
"""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table

from dpfl_bench.errors import UserError
from dpfl_bench.results import SCHEMA, NotAResultsFile, read_run

TABLE_KEYS = ["task", "model"]  # one table per task and model
COLUMN_KEY = "eps_target"  # the columns of a table: ε, ∞ last
HIGHLIGHTED_METHOD = "la-lora"  # the method whose gain over the best other method gets its own row
LOWER_IS_BETTER = ("loss", "seconds", "bytes", "memory", "eps_spent", "audit_eps", "noise")  # audit ε: less leaked


@dataclass(frozen=True)
class Results:
    rows: pd.DataFrame  # every evaluated round of every finished run
    finals: pd.DataFrame  # each run's last row, its configuration options as extra columns
    unfinished: dict[str, int]  # run id -> rounds saved, for runs that stopped before their last round
    warnings: list[str]


def load_results(folder: Path) -> Results:
    """Every finished run under `folder` (searched recursively), and a warning per file left out."""
    if not folder.exists():
        raise UserError(f"{folder} does not exist; give a folder of results files (e.g. results/)")
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*.parquet") if not p.name.startswith("."))
    runs, warnings, seen, unfinished = [], [], {}, {}
    for path in files:
        try:
            run = read_run(path)
        except NotAResultsFile as e:
            warnings.append(f"skipped {path}: {_short(str(e).removeprefix(f'{path} is '))}")
            continue
        except Exception as e:  # a damaged file raises whatever pyarrow meets first
            warnings.append(f"skipped {path}: not a readable Parquet file ({type(e).__name__})")
            continue
        if run.empty:
            warnings.append(f"skipped {path}: no rows")
            continue
        if run["run_id"].nunique() > 1:
            warnings.append(f"skipped {path}: holds {run['run_id'].nunique()} runs (a reference or merged file), not one")
            continue
        last = run.iloc[-1]
        if last["round"] < last["rounds_total"]:
            unfinished[last["run_id"]] = int(last["round"])
            warnings.append(f"skipped {path}: unfinished (round {last['round']} of {last['rounds_total']}); run it again to finish it")
            continue
        if last["run_id"] in seen:
            warnings.append(f"skipped {path}: the same run as {seen[last['run_id']]}")
            continue
        seen[last["run_id"]] = path
        runs.append(run)
    rows = pd.concat(runs, ignore_index=True) if runs else pd.DataFrame(columns=SCHEMA.names)
    return Results(rows, final_rows(rows), unfinished, warnings)


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def final_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Each run's last row, with seconds per round and its configuration's options as columns (an option
    named like a results column, e.g. dp_level, which a non-private run records as none, as config.<name>)."""
    finals = rows.sort_values("round").groupby("run_id", sort=False).tail(1).sort_values("run_id").reset_index(drop=True)
    finals["seconds_per_round"] = finals["train_seconds"] / finals["round"]
    options = pd.DataFrame([flat_options(text) for text in finals["config_json"]], index=finals.index)
    return finals.join(options.rename(columns={c: option_column(c) for c in options.columns}))


def option_column(option: str) -> str:
    """The column of `finals` that holds a run option."""
    return f"config.{option}" if option in SCHEMA.names else option


def flat_options(config_json: str) -> dict:
    """A resolved configuration as flat option names (the names `run` takes, with underscores)."""
    flat = {}
    for key, value in json.loads(config_json).items():
        if isinstance(value, dict) and key != "method_options":
            flat.update(value)
        elif key == "method_options":
            flat.update({f"method_options.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return {k: (math.inf if v == "inf" else v) for k, v in flat.items()}


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


def summarize(finals: pd.DataFrame, metric: str = "test_accuracy", by: list[str] = ["method"]) -> pd.DataFrame:
    """One row per (task, model, *by, ε): the metric's mean, sample std and count over runs, and the mean
    seconds and bytes uploaded per round. Raises UserError for an unknown or non-numeric column."""
    for column in [metric, *by]:
        if column not in finals.columns:
            valid = ", ".join(sorted(c for c in finals.columns if c not in ("config_json", "client_data_json")))
            raise UserError(f"no column {column!r} in these results; choose from: {valid}")
    if not pd.api.types.is_numeric_dtype(finals[metric]):
        raise UserError(f"--metric {metric!r} is not numeric")
    keys = list(dict.fromkeys([*TABLE_KEYS, *by, COLUMN_KEY]))
    grouped = finals.groupby(keys, sort=True, dropna=False)
    summary = grouped.agg(
        mean=(metric, "mean"),  # over the runs with a value: a diverged run (NaN) is counted in `missing`
        std=(metric, "std"),  # sample std (ddof 1): NaN for a single seed
        n=(metric, "count"),
        missing=(metric, lambda values: int(values.isna().sum())),
        seconds_per_round=("seconds_per_round", "mean"),
        bytes_uploaded_per_round=("bytes_uploaded_per_round", "mean"),
    )
    return summary.reset_index()


def mixed_options(finals: pd.DataFrame, by: list[str]) -> list[str]:
    """Run options that differ between runs averaged into one cell: anything but the seed, where results
    go and how many workers load data (an option a run lacks counts as a value of its own)."""
    keys = list(dict.fromkeys([*TABLE_KEYS, *by, COLUMN_KEY]))
    # A results column in `by` (dp_level) does not fix the option of that name (config.dp_level).
    held = {b.removeprefix("config.") for b in by if b.startswith("config.") or b not in SCHEMA.names}
    same_in_a_cell = {"seed", "out", "workers", "eps", "task", "model", *held}
    mixed = set()
    for _, cell in finals.groupby(keys, dropna=False):
        configs = [flat_options(text) for text in cell["config_json"]]
        for option in set().union(*configs) - same_in_a_cell:
            if len({repr(c.get(option, "<absent>")) for c in configs}) > 1:
                # Name the column that separates them: the results column of that name when it does (method).
                separates = option in cell.columns and cell[option].nunique(dropna=False) > 1
                mixed.add(option if separates else option_column(option))
    return sorted(mixed)


@dataclass(frozen=True)
class Pivot:
    """One table: rows are the `by` values, columns the ε values (∞ last)."""

    title: str
    row_names: list[str]
    eps: list[float]
    cells: dict[tuple[str, float], pd.Series]  # (row, ε) -> a summary row
    best: dict[float, set[str]]  # ε -> the rows with the best mean (absent when no row has one)
    gain: dict[float, float] | None  # ε -> highlighted method minus the best other row, when both exist
    costs: dict[str, tuple[float, float]]  # row -> (seconds, bytes uploaded) per round, mean over its runs

    def row_texts(self, row: str, emphasize: Callable[[str], str]) -> list[str]:
        """A row as text: its name, a cell per ε (emphasized where it is the column's best), then its
        seconds and megabytes uploaded per round."""
        texts = [row]
        for e in self.eps:
            cell = self.cells.get((row, e))
            text = "—" if cell is None else cell_text(cell)
            texts.append(emphasize(text) if row in self.best.get(e, ()) else text)
        seconds, size = self.costs[row]
        return [*texts, f"{seconds:.1f}", megabytes(size)]


def pivots(summary: pd.DataFrame, metric: str, by: list[str]) -> list[Pivot]:
    tables = []
    lower = lower_is_better(metric)
    for (task, model), table in summary.groupby(TABLE_KEYS, sort=True):
        table = table.assign(row=[row_name(values) for values in table[by].itertuples(index=False)])
        row_names = list(dict.fromkeys(table["row"]))
        eps = sorted(table[COLUMN_KEY].unique())
        cells = {(r["row"], r[COLUMN_KEY]): r for _, r in table.iterrows()}
        best = {}
        for e in eps:
            means = table[table[COLUMN_KEY] == e].set_index("row")["mean"].dropna()
            if len(means):  # ties are all best
                best[e] = set(means.index[means == (means.min() if lower else means.max())])
        gain = None
        if by == ["method"] and HIGHLIGHTED_METHOD in row_names and len(row_names) > 1:
            gain = {}
            for e in eps:
                ours = cells.get((HIGHLIGHTED_METHOD, e))
                others = [cells[(r, e)]["mean"] for r in row_names if r != HIGHLIGHTED_METHOD and (r, e) in cells]
                others = [m for m in others if not np.isnan(m)]
                if ours is not None and others and not np.isnan(ours["mean"]):
                    gain[e] = (min(others) - ours["mean"]) if lower else (ours["mean"] - max(others))
        costs = {
            row: (group["seconds_per_round"].mean(), group["bytes_uploaded_per_round"].mean())
            for row, group in table.groupby("row", sort=False)
        }
        tables.append(Pivot(f"{task} · {model}", row_names, eps, cells, best, gain, costs))
    return tables


def row_name(values: tuple) -> str:
    """A row's `--by` values as text: "la-lora · 8", with "—" for an option a run does not have."""
    return " · ".join("—" if pd.isna(v) else "∞" if isinstance(v, float) and math.isinf(v) else str(v) for v in values)


def eps_label(eps: float) -> str:
    return "ε=∞" if math.isinf(eps) else f"ε={eps:g}"


def number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.4g}"


def cell_text(cell: pd.Series) -> str:
    std = "" if np.isnan(cell["std"]) else f" ± {number(cell['std'])}"
    missing = f", {cell['missing']} NaN" if cell["missing"] else ""
    return f"{number(cell['mean'])}{std} ({cell['n']}{missing})"


def megabytes(size: float) -> str:
    return f"{size / 1e6:.2f}"


def to_markdown(tables: list[Pivot], metric: str) -> str:
    blocks = []
    for t in tables:
        header = ["", *map(eps_label, t.eps), "s / round", "MB up / round"]
        lines = [f"**{t.title}**: {metric}, mean ± std (seeds)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in t.row_names:
            lines.append("| " + " | ".join(t.row_texts(row, lambda text: f"**{text}**")) + " |")
        if t.gain:
            gains = [f"{t.gain[e]:+.4f}" if e in t.gain else "—" for e in t.eps]
            lines.append("| " + " | ".join([f"{HIGHLIGHTED_METHOD} gain", *gains, "", ""]) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def to_rich(tables: list[Pivot], metric: str) -> list[Table]:
    rendered = []
    for t in tables:
        table = Table(title=f"[bold]{t.title}[/]: {metric}, mean ± std (seeds)", title_justify="left")
        table.add_column("")
        for e in t.eps:
            table.add_column(eps_label(e), justify="right")
        table.add_column("s / round", justify="right", style="dim")
        table.add_column("MB up / round", justify="right", style="dim")
        for row in t.row_names:
            table.add_row(*t.row_texts(row, lambda text: f"[bold green]{text}[/]"))
        if t.gain:
            table.add_section()
            gains = [_signed(t.gain[e]) if e in t.gain else "—" for e in t.eps]
            table.add_row(f"[italic]{HIGHLIGHTED_METHOD} gain[/]", *gains, "", "")
        rendered.append(table)
    return rendered


def _signed(value: float) -> str:
    colour = "green" if value > 0 else "red" if value < 0 else "white"
    return f"[{colour}]{value:+.4f}[/]"


def to_records(summary: pd.DataFrame) -> pd.DataFrame:
    """The long form for csv and json; ±inf written as "inf"/"-inf" (JSON has no infinity, and null
    would read as "no data")."""
    records = summary.astype(object)
    for column in records.columns:
        records[column] = [("inf" if v > 0 else "-inf") if isinstance(v, float) and math.isinf(v) else v for v in records[column]]
    return records
