"""`dpfl-bench report`: one self-contained HTML file to send a colleague: the comparison tables with their
intervals, the figure (inline SVG), every run's privacy and audit figures, and each run's configuration.
Nothing is fetched from the network: no scripts, no external styles or fonts.
"""

import html
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

import dpfl_bench
from dpfl_bench.compare import Pivot, Results
from dpfl_bench.files import write_atomically
from dpfl_bench.plots import plot_comparison

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 75em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.best { font-weight: bold; } .no-guarantee { color: #a05a00; } .note { color: #555; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.7em; overflow-x: auto; font-size: 0.8em; }
svg { max-width: 100%; height: auto; }
"""
RUN_COLUMNS = ("task", "method", "regime", "seed", "round", "test_accuracy", "val_accuracy", "eps_spent", "delta",
               "noise_multiplier", "guarantee", "audit_eps_lower", "audit_eps_lower_fdp", "audit_eps_estimate", "run_id")


def write_report(path: Path, loaded: Results, finals: pd.DataFrame, tables: list[Pivot], metric: str, by: list[str],
                 selected: list[str], source: Path) -> None:
    """Write the report to `path` (through a temporary file, so a reader never sees half of it)."""
    parts = [
        f"<h1>dpfl-bench report: {html.escape(str(source))}</h1>",
        f"<p class='note'>{len(finals)} finished runs; written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by "
        f"dpfl-bench {dpfl_bench.__version__}. Cells: final {html.escape(metric)}, mean ± std over seeds (count); "
        "the gain rows (one per LA-LoRA variant): paired by seed, with a 95% interval. "
        "A column marked <span class='no-guarantee'>no guarantee</span> has no accounted (ε, δ).</p>",
    ]
    parts += [_table(t, metric) for t in tables]
    parts.append(f"<h2>Figure</h2>{_figure(loaded, finals, metric, by, selected)}")
    parts.append("<h2>Runs</h2>" + _runs(finals))
    parts.append("<h2>Configurations</h2>" + "".join(
        f"<details><summary>{html.escape(run)}</summary><pre>{html.escape(json.dumps(json.loads(text), indent=1))}</pre></details>"
        for run, text in zip(finals["run_id"], finals["config_json"])
    ))
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>dpfl-bench report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    write_atomically(path, lambda file: file.write(page.encode("utf-8")))


def _table(t: Pivot, metric: str) -> str:
    header = "".join(f"<th>{_column(c)}</th>" for c in ["", *t.columns, "s / round", "MB up / round"])
    marked = lambda text: f"\x00{text}\x01"  # noqa: E731  (every cell is escaped; the marks become the emphasis)
    cell = lambda text: html.escape(text).replace("\x00", "<span class='best'>").replace("\x01", "</span>")  # noqa: E731
    rows = ["<tr>" + "".join(f"<td>{cell(text)}</td>" for text in t.row_texts(row, marked)) + "</tr>" for row in t.row_names]
    for name in t.gains:
        gains = [html.escape(cell[0]) if cell else "—" for cell in t.gain_cells(name)]
        rows.append("<tr>" + "".join(f"<td>{g}</td>" for g in [html.escape(name), *gains, "", ""]) + "</tr>")
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in t.notes)
    return f"<h2>{html.escape(t.title)}: {html.escape(metric)}</h2><table><tr>{header}</tr>{''.join(rows)}</table>{notes}"


def _column(name: str) -> str:
    text = html.escape(name)
    return text.replace("(no guarantee)", "<span class='no-guarantee'>(no guarantee)</span>")


def _figure(loaded: Results, finals: pd.DataFrame, metric: str, by: list[str], selected: list[str]) -> str:
    with tempfile.TemporaryDirectory() as folder:
        svg = Path(folder) / "figure.svg"
        plot_comparison(loaded.rows, finals, metric, by, svg, selected)
        text = svg.read_text(encoding="utf-8")
    return text[text.index("<svg"):]  # inline: no file beside the report


def _runs(finals: pd.DataFrame) -> str:
    shown = finals.assign(regime=finals["regime"].astype(str))[list(RUN_COLUMNS)]
    header = "".join(f"<th>{html.escape(c)}</th>" for c in RUN_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_format(v))}</td>" for v in row) + "</tr>" for row in shown.itertuples(index=False)
    )
    return f"<table><tr>{header}</tr>{body}</table>"


def _format(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
