"""Read a folder of results files and summarize them: one cell per (task, method, privacy regime), over seeds.

Loading is forgiving, summarizing is strict: a file that is corrupt, foreign, unfinished or a duplicate is
skipped with a one-line warning, but runs that differ in anything other than their seed are never
averaged into one cell without saying so, and a run without an accounted guarantee never shares a cell
with one that has it.
"""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from rich.markup import escape
from rich.table import Table

from dpfl_bench.errors import UserError
from dpfl_bench.results import SCHEMA, NotAResultsFile, flat_options, option_column, read_run
from dpfl_bench.stats import Gain, paired_gain

TABLE_KEYS = ["task", "model"]  # one table per task and model
COLUMN_KEY = "regime"  # the columns of a table: privacy regimes (see `regime`), in their order
LA_LORA = "la-lora"  # the method whose variants each get a row under the table: their gain over the best other
SELECTION_METRIC = "val_accuracy"  # --select chooses on validation data, never on the test split it reports
LOWER_IS_BETTER = ("loss", "seconds", "bytes", "memory", "eps_spent", "audit_eps", "noise")  # audit ε: less leaked
NO_GUARANTEE = "(no guarantee)"


@dataclass(frozen=True)
class Results:
    rows: pd.DataFrame  # every evaluated round of every finished run
    finals: pd.DataFrame  # each run's last row, its configuration options and privacy regime as extra columns
    unfinished: dict[str, int]  # run id -> rounds saved, for runs that stopped before their last round
    warnings: list[str]


def results_files(folder: Path) -> list[Path]:
    """The results files under `folder` (searched recursively; dotfiles are temporary files and locks), or
    `folder` itself when it is one file."""
    if not folder.exists():
        raise UserError(f"{folder} does not exist; give a folder of results files (e.g. results/)")
    return [folder] if folder.is_file() else sorted(p for p in folder.rglob("*.parquet") if not p.name.startswith("."))


def load_results(folder: Path) -> Results:
    """Every finished run under `folder` (searched recursively), and a warning per file left out."""
    files = results_files(folder)
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
    rows = with_method_labels(rows)
    return Results(rows, final_rows(rows), unfinished, warnings)


RUN_COLUMNS = ("task", "method", "regime", "seed", "lr", "rank", "local_steps", "batch_size", "rounds", "finished",
               "test_accuracy", "late_gain", "eps_spent", "run_id")


def list_runs(folder: Path) -> tuple[pd.DataFrame, list[str]]:
    """Every results file under `folder`, finished or not, a line each: what ran (task, method, privacy
    regime, seed, key options), how far it got ("done/planned" rounds), its last figures and how much its
    validation accuracy still rises (`stats.late_gain`); and a warning per file that is not a readable
    results file."""
    from dpfl_bench.stats import late_gain

    files = results_files(folder)
    lines, warnings = [], []
    for path in files:
        try:
            run = read_run(path)
        except Exception as e:  # a foreign or damaged file: said, and the others still listed
            warnings.append(f"skipped {path}: {_short(str(e).removeprefix(f'{path} is '))}")
            continue
        for _, rows in run.sort_values("round").groupby("run_id", sort=False):
            last, curve = rows.iloc[-1], rows.set_index("round")["val_accuracy"]
            options = flat_options(last["config_json"])
            column = regime(last["dp_level"], bool(last["guarantee"]), float(last["eps_target"]), options.get("dp_sigma", math.nan))
            lines.append({
                "task": last["task"], "method": last["method"], "seed": int(last["seed"]), "regime": column.label,
                **{k: options.get(k) for k in ("lr", "rank", "local_steps", "batch_size")},
                "rounds": f"{int(last['round'])}/{int(last['rounds_total'])}", "finished": bool(last["round"] >= last["rounds_total"]),
                "test_accuracy": float(last["test_accuracy"]), "late_gain": late_gain(curve),
                "eps_spent": float(last["eps_spent"]), "run_id": last["run_id"],
                "config_json": last["config_json"],
            })
    runs = pd.DataFrame(lines, columns=[*RUN_COLUMNS, "config_json"])
    return with_method_labels(runs).drop(columns="config_json"), warnings


def with_method_labels(rows: pd.DataFrame) -> pd.DataFrame:
    """`rows` with `method` as its run's configuration names it (`Method.label`), so that a variant is its
    own row even in files written before version 0.6 recorded labels."""
    from dpfl_bench.method import create_method

    labels: dict[str, str] = {}
    for text in rows["config_json"].unique():
        config = json.loads(text)
        labels[text] = create_method(config["method"], config.get("method_options", {})).label
    return rows.assign(method=rows["config_json"].map(labels)) if len(rows) else rows


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def final_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Each run's last row, with seconds per round, its configuration's options as columns (an option
    named like a results column, e.g. dp_level, which a non-private run records as none, as config.<name>)
    and its privacy regime."""
    finals = rows.sort_values("round").groupby("run_id", sort=False).tail(1).sort_values("run_id").reset_index(drop=True)
    finals["seconds_per_round"] = finals["train_seconds"] / finals["round"]
    options = pd.DataFrame([flat_options(text) for text in finals["config_json"]], index=finals.index)
    options = options.rename(columns={c: option_column(c) for c in options.columns})
    # Files of version 0.7 on hold these columns already; older ones get them from their configuration here.
    return with_regimes(finals.drop(columns=[c for c in options.columns if c in finals.columns]).join(options))


class Regime(NamedTuple):
    """A table column. Sorted: accounted ε ascending, then runs without a guarantee (non-private: ε = ∞),
    then regimes without an accountant (the authors' noise), by σ."""

    rank: int
    value: float
    label: str


def regime(dp_level: str, guarantee: bool, eps: float, dp_sigma: float) -> Regime:
    """A run's column. Only an accounted run gets a label that does not say it has no guarantee, so no
    cell can mix the two."""
    if guarantee:
        return Regime(0, eps, f"ε={_exact(eps)}")
    if math.isnan(eps):  # no accountant: the level's own noise setting is all there is to tell runs apart
        return Regime(2, dp_sigma, f"{dp_level} σ={_exact(dp_sigma)} {NO_GUARANTEE}")
    return Regime(1, eps, "ε=∞ (no DP)" if math.isinf(eps) else f"ε={_exact(eps)} {NO_GUARANTEE}")


def _exact(value: float) -> str:
    """As short as reads back exactly: runs at ε = 1 and ε = 1.0000001 stay two columns."""
    text = f"{value:g}"
    return text if float(text) == value else repr(float(value))


def with_regimes(finals: pd.DataFrame) -> pd.DataFrame:
    """`finals` with its regime column: ordered categories, so that sorting and grouping keep table order."""
    sigmas = finals["dp_sigma"] if "dp_sigma" in finals else pd.Series(math.nan, index=finals.index)
    regimes = [regime(*values) for values in zip(finals["dp_level"], finals["guarantee"], finals["eps_target"], sigmas)]
    order = list(dict.fromkeys(r.label for r in sorted(regimes)))
    return finals.assign(**{COLUMN_KEY: pd.Categorical([r.label for r in regimes], categories=order, ordered=True)})


def regimes_in(column: pd.Series) -> list[str]:
    """The regimes of a column of `finals` or of a summary, in table order."""
    return list(dict.fromkeys(column.sort_values()))


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


def cell_keys(by: list[str], selected: list[str] = []) -> list[str]:
    """The columns that make a cell: table, row, the options --select fixed, and column."""
    return list(dict.fromkeys([*TABLE_KEYS, *by, *selected, COLUMN_KEY]))


def check_columns(finals: pd.DataFrame, metric: str, by: list[str]) -> None:
    """Raises UserError for an unknown or non-numeric metric, or an unknown --by column."""
    for column in [metric, *by]:
        if column not in finals.columns:
            valid = ", ".join(sorted(c for c in finals.columns if c not in ("config_json", "client_data_json")))
            raise UserError(f"no column {column!r} in these results; choose from: {valid}")
    if not pd.api.types.is_numeric_dtype(finals[metric]):
        raise UserError(f"--metric {metric!r} is not numeric")


def summarize(finals: pd.DataFrame, metric: str = "test_accuracy", by: list[str] = ["method"], selected: list[str] = []) -> pd.DataFrame:
    """One row per (task, model, *by, regime): the metric's mean, sample std and count over runs, and the
    mean seconds and bytes uploaded per round; with the values of the `selected` options (one per cell
    after `select_best`), whether the cell's runs have a guarantee, and their target ε."""
    keys = [*cell_keys(by, selected), "guarantee", "eps_target"]  # the last two: fixed by the regime
    grouped = finals.groupby(keys, sort=True, dropna=False, observed=True)
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
    # A results column in `by` (dp_level) does not fix the option of that name (config.dp_level).
    held = {b.removeprefix("config.") for b in by if b.startswith("config.") or b not in SCHEMA.names}
    same_in_a_cell = {"seed", "out", "workers", "eps", "task", "model", *held}
    mixed = set()
    for _, cell in finals.groupby(cell_keys(by), dropna=False, observed=True):
        configs = [flat_options(text) for text in cell["config_json"]]
        for option in set().union(*configs) - same_in_a_cell:
            if len({repr(c.get(option, "<absent>")) for c in configs}) > 1:
                # Name the column that separates them: the results column of that name when it does (method).
                separates = option in cell.columns and cell[option].nunique(dropna=False) > 1
                mixed.add(option if separates else option_column(option))
    return sorted(mixed)


def select_best(finals: pd.DataFrame, options: list[str], by: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """Per cell, only the runs of the value of `options` (a tuple, compared in order, for several) with the
    best mean final validation accuracy over seeds, the smaller value of tied ones; and the columns of
    those options. Raises UserError for an option that the runs of no cell differ in."""
    varying = mixed_options(finals, by)
    columns = list(dict.fromkeys(_varying_column(option, varying) for option in options))
    chosen = [_best_value(cell, columns) for _, cell in finals.groupby(cell_keys(by), dropna=False, observed=True)]
    return pd.concat(chosen).sort_values("run_id").reset_index(drop=True), columns


def _varying_column(option: str, varying: list[str]) -> str:
    name = option.replace("-", "_")
    for column in (name, option_column(name), f"method_options.{name}"):
        if column in varying:
            return column
    they = f"options that do: {', '.join(varying)}" if varying else "they differ in nothing but their seed"
    raise UserError(f"--select {option}: the runs of no cell differ in it; {they}")


def _best_value(cell: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    # Candidates in ascending order of value: of tied scores, max keeps the first, the smaller value.
    candidates = sorted(cell.groupby(columns, dropna=False), key=lambda candidate: _ascending(candidate[0]))
    return max(candidates, key=lambda candidate: _validation_score(candidate[1]))[1]


def _ascending(values: tuple) -> tuple:
    return tuple((pd.isna(v), 0 if pd.isna(v) else v) for v in values)  # an option a run lacks sorts last


def _validation_score(runs: pd.DataFrame) -> float:
    score = runs[SELECTION_METRIC].mean()
    return -math.inf if math.isnan(score) else score  # a value whose runs all diverged is never chosen over one


def is_la_lora_variant(method: str) -> bool:
    """Whether a row's method is LA-LoRA or one of its variants, e.g. "la-lora (authors' code)"."""
    return method.partition(" (")[0] == LA_LORA


def check_baseline(finals: pd.DataFrame, baseline: str, by: list[str]) -> None:
    """Raises UserError unless `baseline` is a method with runs, in tables whose rows are methods, and some
    LA-LoRA variant other than it has runs (a variant is a fine baseline: the default against the filterless
    one measures the filter)."""
    if by != ["method"]:
        raise UserError(f"--baseline compares methods: use it with --by method, not --by {','.join(by)}")
    methods = sorted(finals["method"].unique())
    variants = {m for m in methods if is_la_lora_variant(m)}
    if not variants:
        raise UserError(f"--baseline {baseline}: these runs have no {LA_LORA} variant to measure against it")
    if baseline not in methods or not variants - {baseline}:
        others = ", ".join(m for m in methods if variants - {m})
        raise UserError(f"--baseline {baseline}: give a method to measure the {LA_LORA} variants against; these runs have {others}")


GainCell = tuple[str, Gain]  # the method compared with, and an LA-LoRA variant's gain over it
GAIN_FIELDS = ["gain_over", "gain", "gain_low", "gain_high", "gain_pairs", "significant"]  # csv and json


def paired_gains(
    finals: pd.DataFrame, summary: pd.DataFrame, metric: str, by: list[str], baseline: str | None = None
) -> dict[tuple, GainCell]:
    """(task, model, regime, variant) -> each LA-LoRA variant's gain, seed by seed, over `baseline`, or else
    over the best method in that column that is no LA-LoRA variant (`best_on_shared_seeds`); positive is
    better, whichever direction the metric is. Only for tables whose rows are methods, and cells where both
    have a mean."""
    if by != ["method"]:
        return {}
    lower = lower_is_better(metric)
    runs = dict(iter(finals.groupby([*TABLE_KEYS, COLUMN_KEY], observed=True)))
    gains = {}
    for key, column in summary.groupby([*TABLE_KEYS, COLUMN_KEY], observed=True):
        means = column.set_index("method")["mean"].dropna()
        others = [m for m in means.index if not is_la_lora_variant(m)]
        if baseline is None and not others:
            continue
        per_seed = runs[key].groupby(["method", "seed"])[metric].mean().dropna()
        for variant in (m for m in means.index if is_la_lora_variant(m) and m != baseline):
            ours = per_seed[variant]
            over = baseline or best_on_shared_seeds(per_seed, others, ours.index, lower)
            if over not in means:  # the baseline has no mean in this column
                continue
            theirs = per_seed[over]
            gains[(*key, variant)] = (over, paired_gain(theirs, ours) if lower else paired_gain(ours, theirs))
    return gains


def best_on_shared_seeds(per_seed: pd.Series, methods: list[str], seeds: pd.Index, lower: bool) -> str:
    """The method with the best mean over the seeds that it, every other of `methods` and `seeds` all have
    (our decision: means over different seeds are not comparable, and a method still missing its low seeds
    would otherwise win); over each method's own seeds where they have none in common."""
    shared = set(seeds).intersection(*(per_seed[m].index for m in methods))
    scores = pd.Series({m: per_seed[m][per_seed[m].index.isin(shared)].mean() for m in methods}).dropna()
    if scores.empty:
        scores = pd.Series({m: per_seed[m].mean() for m in methods})
    return scores.idxmin() if lower else scores.idxmax()


@dataclass(frozen=True)
class Pivot:
    """One table: rows are the `by` values, columns the privacy regimes."""

    title: str
    row_names: list[str]
    columns: list[str]  # regime labels, in order
    cells: dict[tuple[str, str], pd.Series]  # (row, regime) -> a summary row
    best: dict[str, set[str]]  # regime -> the rows with the best mean (absent when no row has one)
    gains: dict[str, dict[str, GainCell]]  # a gain row's name -> regime -> an LA-LoRA variant's gain there
    costs: dict[str, tuple[float, float]]  # row -> (seconds, bytes uploaded) per round, mean over its runs
    selected: list[str]  # the options --select chose per cell
    notes: list[str]  # what the reader must know to read the cells
    baseline: str | None  # what every gain row is measured against (named in the row); None: each cell names its own

    def row_texts(self, row: str, emphasize: Callable[[str], str]) -> list[str]:
        """A row as text: its name, a cell per regime (emphasized where it is the column's best), then its
        seconds and megabytes uploaded per round."""
        texts = [row]
        for column in self.columns:
            cell = self.cells.get((row, column))
            text = "—" if cell is None else cell_text(cell, self.selected)
            texts.append(emphasize(text) if row in self.best.get(column, ()) else text)
        seconds, size = self.costs[row]
        return [*texts, f"{seconds:.1f}", megabytes(size)]

    def gain_cells(self, name: str) -> list[tuple[str, Gain] | None]:
        """A gain row's cells, a regime each, as (text, gain), None where the column has no gain; without a
        baseline each text names its comparator, since columns and variants may differ in it."""
        cells = []
        for column in self.columns:
            over, gain = self.gains[name].get(column, (None, None))
            if gain is None:
                cells.append(None)
                continue
            text = gain_text(gain) if self.baseline else f"{gain_text(gain)} vs {over}"
            cells.append((text, gain))
        return cells


def pivots(
    summary: pd.DataFrame,
    metric: str,
    by: list[str],
    gains: dict[tuple, GainCell] = {},
    selected: list[str] = [],
    baseline: str | None = None,
) -> list[Pivot]:
    tables = []
    lower = lower_is_better(metric)
    for (task, model), table in summary.groupby(TABLE_KEYS, sort=True):
        table = table.assign(row=[row_name(values) for values in table[by].itertuples(index=False)])
        row_names = list(dict.fromkeys(table["row"]))
        columns = regimes_in(table[COLUMN_KEY])
        cells = {(r["row"], r[COLUMN_KEY]): r for _, r in table.iterrows()}
        best = {}
        for column in columns:
            means = table[table[COLUMN_KEY] == column].set_index("row")["mean"].dropna()
            if len(means):  # ties are all best
                best[column] = set(means.index[means == (means.min() if lower else means.max())])
        table_gains: dict[str, dict[str, GainCell]] = {}
        for (*where, regime, variant), gain in sorted(gains.items(), key=lambda item: item[0][3]):
            if tuple(where) == (task, model):
                name = f"{variant} − {baseline}" if baseline else f"{variant} gain"
                table_gains.setdefault(name, {})[regime] = gain
        costs = {
            row: (group["seconds_per_round"].mean(), group["bytes_uploaded_per_round"].mean())
            for row, group in table.groupby("row", sort=False)
        }
        notes = _notes(selected, bool(table_gains), baseline)
        pivot = Pivot(f"{task} · {model}", row_names, columns, cells, best, table_gains, costs, selected, notes, baseline)
        tables.append(pivot)
    return tables


def _notes(selected: list[str], gains: bool, baseline: str | None) -> list[str]:
    notes = []
    if selected:
        names = ", ".join(map(option_name, selected))
        notes.append(f"{names}: chosen per cell by the best mean final {SELECTION_METRIC} over seeds")
    if gains:
        over = baseline or (
            f"the method its cell names, the column's best other than {LA_LORA}'s variants on the seeds they all ran"
        )
        each = "each other" if baseline and is_la_lora_variant(baseline) else "each"
        notes.append(
            f"gain rows: {each} {LA_LORA} variant's mean paired difference from {over}, over the seeds "
            "both ran (positive: better) [95% Student-t interval]; * excludes 0"
        )
    return notes


def row_name(values: tuple) -> str:
    """A row's `--by` values as text: "la-lora · 8", with "—" for an option a run does not have."""
    return " · ".join("—" if pd.isna(v) else "∞" if isinstance(v, float) and math.isinf(v) else str(v) for v in values)


def option_name(column: str) -> str:
    """A selected option's column as a cell names it: lr, smooth_sigma, dp_level."""
    return column.removeprefix("config.").removeprefix("method_options.")


def number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.4g}"


def cell_text(cell: pd.Series, selected: list[str] = []) -> str:
    std = "" if np.isnan(cell["std"]) else f" ± {number(cell['std'])}"
    missing = f", {cell['missing']} NaN" if cell["missing"] else ""
    chosen = "".join(f" {option_name(c)}={_value(cell[c])}" for c in selected if not pd.isna(cell[c]))
    return f"{number(cell['mean'])}{std} ({cell['n']}{missing}){chosen}"


def _value(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def gain_text(gain: Gain) -> str:
    """The mean paired difference and its interval, or why there is no interval (the significance mark
    is each format's own)."""
    if gain.pairs == 0:
        return "— (no seed in common)"
    if gain.pairs == 1:
        return f"{gain.mean:+.4f} (1 pair: no interval)"
    if math.isnan(gain.low):
        return f"{gain.mean:+.4f} ({gain.pairs} pairs, all equal: no interval)"
    return f"{gain.mean:+.4f} [{gain.low:+.4f}, {gain.high:+.4f}] ({gain.pairs} pairs)"


def megabytes(size: float) -> str:
    return f"{size / 1e6:.2f}"


def to_markdown(tables: list[Pivot], metric: str) -> str:
    blocks = []
    for t in tables:
        header = ["", *t.columns, "s / round", "MB up / round"]
        lines = [f"**{t.title}**: {metric}, mean ± std (seeds)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in t.row_names:
            lines.append("| " + " | ".join(t.row_texts(row, lambda text: f"**{text}**")) + " |")
        for name in t.gains:
            gains = [_markdown_gain(*cell) if cell else "—" for cell in t.gain_cells(name)]
            lines.append("| " + " | ".join([name, *gains, "", ""]) + " |")
        lines += ["", *t.notes] if t.notes else []
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _markdown_gain(text: str, gain: Gain) -> str:
    return f"**{text}** *" if gain.significant else text


def to_rich(tables: list[Pivot], metric: str) -> list[Table]:
    rendered = []
    for t in tables:
        caption = "\n".join(escape(note) for note in t.notes) or None
        title = f"[bold]{t.title}[/]: {metric}, mean ± std (seeds)"
        table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
        table.add_column("")
        for column in t.columns:
            table.add_column(escape(column).replace(NO_GUARANTEE, f"[yellow]{NO_GUARANTEE}[/]"), justify="right")
        table.add_column("s / round", justify="right", style="dim")
        table.add_column("MB up / round", justify="right", style="dim")
        for row in t.row_names:
            table.add_row(*t.row_texts(row, lambda text: f"[bold green]{text}[/]"))
        if t.gains:
            table.add_section()
        for name in t.gains:
            gains = [_rich_gain(*cell) if cell else "—" for cell in t.gain_cells(name)]
            table.add_row(f"[italic]{escape(name)}[/]", *gains, "", "")
        rendered.append(table)
    return rendered


def _rich_gain(text: str, gain: Gain) -> str:
    if not gain.significant:
        return escape(text)
    colour = "green" if gain.mean > 0 else "red"
    return f"[{colour}]{escape(text)} *[/]"


def to_records(summary: pd.DataFrame, gains: dict[tuple, GainCell] = {}) -> pd.DataFrame:
    """The long form for csv and json, with the gain columns on each LA-LoRA variant's cells when there
    are gains; ±inf written as "inf"/"-inf" (JSON has no infinity, and null would read as "no data")."""
    records = summary.astype(object)
    if gains:
        keys = zip(summary["task"], summary["model"], summary[COLUMN_KEY].astype(str), summary["method"])
        fields = [_gain_fields(gains.get(key)) for key in keys]
        records = records.join(pd.DataFrame(fields, index=records.index, dtype=object))  # object: pairs stay whole numbers
    for column in records.columns:
        values = [("inf" if v > 0 else "-inf") if isinstance(v, float) and math.isinf(v) else v for v in records[column]]
        records[column] = pd.Series(values, index=records.index, dtype=object)  # a list would be re-inferred: 4 -> 4.0
    return records


def _gain_fields(cell: GainCell | None) -> dict:
    if cell is None:
        return dict.fromkeys(GAIN_FIELDS)
    over, gain = cell
    return dict(gain_over=over, gain=gain.mean, gain_low=gain.low, gain_high=gain.high, gain_pairs=gain.pairs, significant=gain.significant)
