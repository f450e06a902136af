"""The comparison figure, per task: the metric against round in a panel per privacy regime (an ε, or a
regime without a guarantee, which its title says), and the final metric per regime.

A line per method (or `--by` group), its band the 95% interval of the mean over seeds (the axis follows the
means: a band of few seeds may run off it), the number of seeds (and, after `--select`, the chosen values)
in its label. Regimes are categories, so the final panel shows grouped points with 95% intervals, never a
line across them. Panels wrap at three a row; a regime whose runs were evaluated only once has no curve to
draw and gets no learning-curve panel. Legends hang under their panels, never over a curve. The format
follows the file name: .png, or .pdf and .svg for vector figures.
"""

import math
from pathlib import Path

import pandas as pd

from dpfl_bench.compare import COLUMN_KEY, TABLE_KEYS, regimes_in
from dpfl_bench.files import write_atomically
from dpfl_bench.stats import mean_interval

COLUMNS = 3  # panels a row: readable at a page's width
LEGEND_FONT = 7  # points


def plot_comparison(rows: pd.DataFrame, finals: pd.DataFrame, metric: str, by: list[str], path: Path, selected: list[str] = []) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    order = regimes_in(finals[COLUMN_KEY])
    finals = finals.assign(**{COLUMN_KEY: finals[COLUMN_KEY].astype(str)})  # plain labels; `order` keeps their order
    # Only `finals`' runs (after --select, the chosen configurations), with their row and option values as
    # `finals` has them, so that a curve and the legend's colours name a configuration alike.
    keys = list(dict.fromkeys([COLUMN_KEY, *by, *selected]))
    rows = rows.drop(columns=[c for c in keys if c in rows.columns]).merge(finals[["run_id", *keys]], on="run_id")
    tables = list(finals.groupby(TABLE_KEYS, sort=True))
    names = sorted({_label(values) for values in finals[by].itertuples(index=False)})
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    readable = metric.replace("_", " ")

    layouts = []
    for (task, model), table in tables:
        regimes = [r for r in order if r in set(table[COLUMN_KEY])]
        run_rows = rows[rows["run_id"].isin(table["run_id"])]
        curves = [r for r in regimes if run_rows[run_rows[COLUMN_KEY] == r].groupby("run_id").size().max() > 1]
        layouts.append((task, model, table, run_rows, regimes, curves))
    columns = min(COLUMNS, max(len(curves) + 1 for *_, curves in layouts))
    grid_rows = [math.ceil((len(curves) + 1) / columns) for *_, curves in layouts]
    figure, axes = plt.subplots(sum(grid_rows), columns, figsize=(4.2 * columns, 3.4 * sum(grid_rows)), squeeze=False)
    flat = [ax for row in axes for ax in row]
    start, legend_inches = 0, {}  # each panel's legend, to hang under it: the inches it needs
    for (task, model, table, run_rows, regimes, curves), height in zip(layouts, grid_rows):
        panels = flat[start : start + height * columns]
        start += height * columns
        for ax, regime in zip(panels, curves):
            in_regime, drawn = run_rows[run_rows[COLUMN_KEY] == regime], []
            for values, group in in_regime.groupby(by, sort=True):
                name = _label(values)
                seeds = group["run_id"].nunique()
                chosen = _chosen(table[table[COLUMN_KEY] == regime], by, values, selected)
                curve = group.groupby("round")[metric].apply(mean_interval).apply(pd.Series)
                mean, half = curve[0], curve[1].fillna(0.0)
                ax.plot(curve.index, mean, marker="o", markersize=2.5, label=f"{name}{chosen} ({_seeds(seeds)})", color=colours[name])
                ax.fill_between(curve.index, mean - half, mean + half, alpha=0.2, color=colours[name], linewidth=0)
                drawn.extend(zip(mean, half))
            _fit_to_means(ax, drawn)
            ax.set_title(f"{task} · {regime}", fontsize=10)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
            ax.set_xlabel("round")
            ax.set_ylabel(readable)
            ax.grid(alpha=0.3)
            legend_inches[ax] = _legend_below(ax, columns=1)

        # Final metric per regime: categories, a group of points with 95% intervals at each.
        ax = panels[len(curves)]
        groups = list(table.groupby(by, sort=True))
        spread, drawn = 0.7 / max(len(groups), 1), []
        for i, (values, group) in enumerate(groups):
            name = _label(values)
            stats = [mean_interval(group[group[COLUMN_KEY] == r][metric]) for r in regimes]
            positions = [p + (i - (len(groups) - 1) / 2) * spread for p in range(len(regimes))]
            means = [m for m, _, _ in stats]
            halves = [0.0 if math.isnan(h) else h for _, h, _ in stats]
            drawn.extend(zip(means, halves))
            seeds = max(n for _, _, n in stats)
            ax.errorbar(positions, means, yerr=halves, marker="o", markersize=4, capsize=2.5, linestyle="none",
                        label=f"{name} ({_seeds(seeds)})", color=colours[name])
        ticks = [r.removeprefix("ε=").replace(" (", "\n(") for r in regimes]
        ax.set_xticks(list(range(len(regimes))), ticks, fontsize=8)
        ax.set_xlim(-0.5, len(regimes) - 0.5)
        ax.set_title(f"{task} · final {readable}", fontsize=10)
        ax.set_xlabel("privacy budget ε, or regime")
        ax.set_ylabel(readable)
        ax.grid(alpha=0.3, axis="y")
        _fit_to_means(ax, drawn)
        legend_inches[ax] = _legend_below(ax, columns=2)
        panels[0].annotate(model, (0, 1.16), xycoords="axes fraction", fontsize=8, color="grey")
        for unused in panels[len(curves) + 1 :]:
            unused.set_visible(False)

    # Legends hang under their panels, outside the layout: each row gets the height of its tallest legend.
    tallest = max(legend_inches.values())
    figure.set_size_inches(4.2 * columns, (3.4 + tallest) * sum(grid_rows))
    figure.tight_layout(h_pad=1.08 + tallest * 72 / plt.rcParams["font.size"])
    renderer = figure.canvas.get_renderer()
    for ax in legend_inches:  # just under the tick labels and the axis label, whatever their height
        bottom = ax.transAxes.inverted().transform((0, ax.xaxis.get_tightbbox(renderer).y0))[1]
        legend = ax.get_legend()
        legend.set_bbox_to_anchor((0.5, bottom - 0.02), transform=ax.transAxes)
        legend.set_in_layout(True)  # so that the saved figure's tight box holds it
    write_atomically(path, lambda file: figure.savefig(file, format=path.suffix[1:].lower(), dpi=150, bbox_inches="tight"))
    plt.close(figure)


def _fit_to_means(ax, drawn: list[tuple[float, float]]) -> None:
    """Scale the y axis to the (mean, half-width) pairs drawn, but reach at most half the means' span beyond
    them: with two seeds a 95% interval uses t = 12.7 and would flatten every curve; such a band runs off
    the panel, which reads as "too few seeds to tell". A panel with no finite mean keeps matplotlib's
    own limits."""
    drawn = [(m, h) for m, h in drawn if math.isfinite(m)]
    if not drawn:
        return
    low, high = min(m for m, _ in drawn), max(m for m, _ in drawn)
    reach = 0.5 * (high - low) or 0.05 * max(abs(high), 1e-3)
    bottom = max(min(m - h for m, h in drawn), low - reach)
    top = min(max(m + h for m, h in drawn), high + reach)
    pad = 0.08 * (top - bottom)
    ax.set_ylim(bottom - pad, top + pad)


def _legend_below(ax, columns: int) -> float:
    """A legend for the panel, to hang under it once the panels are laid out, never over a line or a point
    (a panel may hold eight methods' curves); the inches of height it needs."""
    legend = ax.legend(fontsize=LEGEND_FONT, loc="upper center", ncol=columns, frameon=False)
    legend.set_in_layout(False)
    return math.ceil(len(legend.get_texts()) / columns) * LEGEND_FONT * 1.6 / 72 + 0.1


def _chosen(cell_runs: pd.DataFrame, by: list[str], values: object, selected: list[str]) -> str:
    """` · lr=0.001`: the values --select chose for this group in this regime."""
    if not selected:
        return ""
    values = values if isinstance(values, tuple) else (values,)
    mine = cell_runs[(cell_runs[by] == pd.Series(values, index=by)).all(axis=1)]
    return "".join(f" · {option.removeprefix('method_options.')}={_label(mine[option].iloc[0])}" for option in selected if len(mine))


def _seeds(count: int) -> str:
    return f"{count} seed" + ("s" if count != 1 else "")


def _label(values: object) -> str:
    values = values if isinstance(values, tuple) else (values,)
    return " · ".join(str(v) if not (isinstance(v, float) and math.isinf(v)) else "∞" for v in values)
