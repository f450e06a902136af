"""Stage 2 of the paper-regime protocol: each cell's learning rate, chosen on seed 0 at 100 rounds, run to
convergence (200 rounds) on seeds 0, 1 and 2.

    python benchmarks/paper_regime_confirm.py [--results results/paper-regime]
    dpfl-bench sweep benchmarks/paper-regime-confirm.toml --jobs 2 --extend-from results/paper-regime
    dpfl-bench compare results/paper-regime-confirm --format markdown --plot benchmarks/figures/paper-regime-confirm.png

Reads stage 1 (`benchmarks/paper-regime.toml`, every learning rate on seed 0, 100 rounds) and takes each
cell (method variant × regime) whose stage-1 runs have all finished: it chooses the rate with the best final
validation accuracy (as `compare --select lr` does) and holds back, naming it, a cell that chose an edge of
its grid (extend that cell's grid and run stage 1 again). Cells still running are listed and left for a
later call, so that a column's confirmation can start while stage 1 works on the others. It writes
`benchmarks/paper-regime-confirm.toml`, whose points are the chosen configurations at ROUNDS rounds on
three seeds: the non-private DP-LoRA curve flattens (our rule: under one point of validation accuracy
gained in the last fifth of the rounds) by 200 rounds and not by 100 (docs/benchmarks.md, "How many
rounds"), while tuning every rate at 200 rounds would double stage 1. Run it again as stage 1 goes on: the
suite grows, and the points already run keep their run ids. Where stage 1 ran with --keep-checkpoint, a
seed-0 point without an accountant (the authors' regime, no DP) goes on from its stage-1 run's final state
(--extend-from), whose 100 rounds are exactly its first 100.
"""

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from dpfl_bench.compare import load_results, regime, select_best
from dpfl_bench.config import RunConfig
from dpfl_bench.federated import run_id
from dpfl_bench.method import create_method
from dpfl_bench.sweep import Suite, load_suite

STAGE_1 = Path("benchmarks/paper-regime.toml")
SUITE = Path("benchmarks/paper-regime-confirm.toml")
OUT = Path("results/paper-regime-confirm")
ROUNDS = 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results/paper-regime"))
    args = parser.parse_args()
    chosen, held_back = choose(load_suite(STAGE_1, args.results), load_results(args.results).finals)
    for line in held_back:
        print(f"held back: {line}")
    if chosen.empty:
        raise SystemExit(f"no cell of stage 1 is ready yet (dpfl-bench sweep {STAGE_1} --jobs 2)")
    points = [_point(json.loads(config_json)) for config_json in chosen["config_json"]]
    SUITE.write_text(_suite_text(points))
    print(f"{len(points)} cells chosen; wrote {SUITE} ({3 * len(points)} runs of {ROUNDS} rounds); run it with"
          f" dpfl-bench sweep {SUITE} --jobs 2 --extend-from {args.results}")


def choose(stage_1: Suite, finals: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The chosen seed-0 run of every cell whose stage-1 runs have all finished and whose choice is not an
    edge of its grid; and a line for each cell held back (unfinished, or at an edge)."""
    cells: dict[tuple, list[str]] = {}
    for config in stage_1.points:
        cells.setdefault(_cell(config), []).append(run_id(config))
    finished = set(finals["run_id"])
    held_back = [f"{_name(cell)}: {len(set(ids) & finished)} of {len(ids)} learning rates finished"
                 for cell, ids in cells.items() if not set(ids) <= finished]
    ready = {i for ids in cells.values() if set(ids) <= finished for i in ids}
    if not ready:
        return finals.iloc[:0], held_back
    runs = finals[finals["run_id"].isin(ready)]
    chosen, _ = select_best(runs, ["lr"], ["method"])
    grids = runs.groupby(["method", "regime"], observed=True)["lr"].agg(["min", "max"])
    inside = []
    for method, column, lr in zip(chosen["method"], chosen["regime"], chosen["lr"]):
        low, high = grids.loc[(method, column)]
        inside.append(low < lr < high)
        if not inside[-1]:
            held_back.append(f"{method} · {column}: chose lr {lr:g}, an edge of its grid; extend it and run stage 1 again")
    return chosen[inside].reset_index(drop=True), held_back


def _cell(config: RunConfig) -> tuple:
    """What makes a stage-1 cell: the method variant and the regime, everything but the learning rate."""
    privacy = config.privacy
    noise = (privacy.dp_sigma,) if privacy.dp_level == "authors" else (privacy.eps,)
    return create_method(config.method, config.method_options).label, privacy.dp_level, *noise


def _name(cell: tuple) -> str:
    """A cell as compare's tables name it."""
    label, level, noise = cell
    column = regime(level, False, math.nan, noise) if level == "authors" else regime(level, math.isfinite(noise), noise, math.nan)
    return f"{label} · {column.label}"


def _point(config: dict) -> str:
    """A grid table that sets this run's options again (everything that distinguishes it in stage 1)."""
    privacy, training = config["privacy"], config["training"]
    options = {"method": config["method"], "lr": training["lr"], "batch-order": training["batch_order"]}
    if privacy["dp_level"] == "authors":
        options |= {"dp-level": "authors", "dp-sigma": privacy["dp_sigma"]}
    else:
        options["eps"] = privacy["eps"]
    text = ", ".join(f"{k} = {_toml(v)}" for k, v in options.items())
    method_options = ", ".join(f"{k} = {_toml(v)}" for k, v in config["method_options"].items())
    return "  {" + text + (f", method-options = {{{method_options}}}" if method_options else "") + "},"


def _toml(value: object) -> str:
    if value == "inf":
        return "inf"
    return json.dumps(value) if isinstance(value, str) else repr(value).lower() if isinstance(value, bool) else repr(value)


def _suite_text(points: list[str]) -> str:
    base = STAGE_1.read_text().split("[base]", 1)[1].split("[grid]", 1)[0].strip()
    assert "\nrounds = 100\n" in f"\n{base}\n", "stage 1's [base] sets the rounds stage 2 replaces"
    base = f"\n{base}\n".replace("\nrounds = 100\n", f"\nrounds = {ROUNDS}\n").strip()
    return (
        "# Written by benchmarks/paper_regime_confirm.py from stage 1's choices: each cell's chosen learning\n"
        f"# rate, {ROUNDS} rounds, seeds 0-2. Do not edit; run the script again.\n"
        f'description = "paper-regime stage 2: each cell at its chosen lr, {ROUNDS} rounds, seeds 0-2"\nout = "{OUT}"\n\n'
        f"[base]\n{base}\n\n[grid]\nseed = [0, 1, 2]\ncell = [\n" + "\n".join(points) + "\n]\n"
    )


if __name__ == "__main__":
    main()
