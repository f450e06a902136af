"""The comparison figure: the metric against round, one panel per privacy regime (an ε, or a regime
without a guarantee, which its title says), and the final metric against regime.

One row of panels per task and model; one line per method (or `--by` group), its band ± one standard
deviation over seeds.
"""

import math
from pathlib import Path

import pandas as pd

from dpfl_bench.compare import COLUMN_KEY, TABLE_KEYS, regimes_in


def plot_comparison(rows: pd.DataFrame, finals: pd.DataFrame, metric: str, by: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    order = regimes_in(finals[COLUMN_KEY])
    finals = finals.assign(**{COLUMN_KEY: finals[COLUMN_KEY].astype(str)})  # plain labels; `order` keeps their order
    # Only `finals`' runs: after --select, the chosen configurations.
    rows = rows.merge(finals[["run_id", COLUMN_KEY, *[c for c in by if c not in rows.columns]]], on="run_id")
    tables = list(finals.groupby(TABLE_KEYS, sort=True))
    width = max(finals.groupby(TABLE_KEYS)[COLUMN_KEY].nunique()) + 1
    figure, axes = plt.subplots(len(tables), width, figsize=(3.6 * width, 3.2 * len(tables)), squeeze=False)
    names = sorted({_label(values) for values in finals[by].itertuples(index=False)})
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    readable = metric.replace("_", " ")

    for row_axes, ((task, model), table) in zip(axes, tables):
        regimes = [r for r in order if r in set(table[COLUMN_KEY])]
        run_rows = rows[rows["run_id"].isin(table["run_id"])]
        for ax, regime in zip(row_axes, regimes):
            in_regime = run_rows[run_rows[COLUMN_KEY] == regime]
            for values, group in in_regime.groupby(by, sort=True):
                name = _label(values)
                curve = group.groupby("round")[metric].agg(["mean", "std"]).fillna({"std": 0.0})
                ax.plot(curve.index, curve["mean"], marker="o", markersize=3, label=name, color=colours[name])
                ax.fill_between(curve.index, curve["mean"] - curve["std"], curve["mean"] + curve["std"], alpha=0.2, color=colours[name])
            ax.set_title(f"{task} · {regime}", fontsize=10)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
            ax.set_xlabel("round")
            ax.set_ylabel(readable)
            ax.grid(alpha=0.3)
        for ax in row_axes[len(regimes):-1]:
            ax.set_visible(False)

        # Final metric against regime: evenly spaced categories, so ∞ and the regimes without an ε have a place.
        ax = row_axes[-1]
        positions = range(len(regimes))
        for values, group in table.groupby(by, sort=True):
            name = _label(values)
            final = group.groupby(COLUMN_KEY)[metric].agg(["mean", "std"]).reindex(regimes).fillna({"std": 0.0})
            ax.errorbar(positions, final["mean"], yerr=final["std"], marker="o", capsize=3, label=name, color=colours[name])
        ax.set_xticks(list(positions), [r.removeprefix("ε=").replace(" (", "\n(") for r in regimes])
        ax.set_title(f"{task} · final {readable}", fontsize=10)
        ax.set_xlabel("privacy budget ε, or regime")
        ax.set_ylabel(readable)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        row_axes[0].annotate(model, (0, 1.12), xycoords="axes fraction", fontsize=8, color="grey")

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)
    plt.close(figure)


def _label(values: object) -> str:
    values = values if isinstance(values, tuple) else (values,)
    return " · ".join(str(v) if not (isinstance(v, float) and math.isinf(v)) else "∞" for v in values)
