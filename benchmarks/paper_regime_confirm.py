"""Stage 2 of the paper-regime protocol: each cell's learning rate, chosen on seed 0, confirmed on seeds 1, 2.

    python benchmarks/paper_regime_confirm.py [--results results/paper-regime] [--out results/paper-regime-confirm]
    dpfl-bench sweep benchmarks/paper-regime-confirm.toml --jobs 2
    dpfl-bench compare results/paper-regime-confirm --format markdown --plot benchmarks/figures/paper-regime.png

Reads stage 1 (`benchmarks/paper-regime.toml`, every learning rate on seed 0), chooses per cell (method
variant × regime) the rate with the best final validation accuracy (as `compare --select lr` does), and
refuses, naming the cells, while any cell is unfinished or chose an edge of its grid (extend that cell's
grid and run stage 1 again). Then it copies the chosen seed-0 runs into `--out` and writes
`benchmarks/paper-regime-confirm.toml`, whose points are the same configurations on seeds 1 and 2, so that
`--out` holds exactly one learning rate per cell on three seeds.
"""

import argparse
import json
import shutil
from pathlib import Path

from dpfl_bench.compare import load_results, select_best
from dpfl_bench.sweep import load_suite

STAGE_1 = Path("benchmarks/paper-regime.toml")
SUITE = Path("benchmarks/paper-regime-confirm.toml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path("results/paper-regime"))
    parser.add_argument("--out", type=Path, default=Path("results/paper-regime-confirm"))
    args = parser.parse_args()
    stage_1 = load_suite(STAGE_1, args.results)
    loaded = load_results(args.results)
    missing = len(stage_1.points) - len(loaded.finals)
    if missing:
        raise SystemExit(f"stage 1 is not finished: {missing} of {len(stage_1.points)} runs to go "
                         f"(dpfl-bench sweep {STAGE_1} --jobs 2)")
    chosen, _ = select_best(loaded.finals, ["lr"], ["method"])
    grids = loaded.finals.groupby(["method", "regime"], observed=True)["lr"].agg(["min", "max"])
    edges = [f"{m} · {r}: lr {lr:g}" for m, r, lr in zip(chosen["method"], chosen["regime"], chosen["lr"])
             if lr in (grids.loc[(m, r), "min"], grids.loc[(m, r), "max"])]
    if edges:
        raise SystemExit("these cells chose an edge of their grid; extend it and run stage 1 again:\n  " + "\n  ".join(edges))
    args.out.mkdir(parents=True, exist_ok=True)
    points = []
    for run_id, config_json in zip(chosen["run_id"], chosen["config_json"]):
        shutil.copy2(args.results / f"{run_id}.parquet", args.out / f"{run_id}.parquet")
        config = json.loads(config_json)
        points.append(_point(config))
    SUITE.write_text(_suite_text(points, args.out))
    print(f"{len(points)} cells chosen; seed-0 runs copied to {args.out}; wrote {SUITE} ({2 * len(points)} runs)")


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


def _suite_text(points: list[str], out: Path) -> str:
    base = STAGE_1.read_text().split("[base]", 1)[1].split("[grid]", 1)[0].strip()
    return (
        "# Written by benchmarks/paper_regime_confirm.py from stage 1's choices: each cell's chosen learning\n"
        "# rate on seeds 1 and 2 (seed 0's run is copied beside them). Do not edit; run the script again.\n"
        f'description = "paper-regime stage 2: each cell at its chosen lr, seeds 1 and 2"\nout = "{out}"\n\n'
        f"[base]\n{base}\n\n[grid]\nseed = [1, 2]\ncell = [\n" + "\n".join(points) + "\n]\n"
    )


if __name__ == "__main__":
    main()
