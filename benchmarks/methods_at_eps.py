"""The four methods at one privacy budget on one task, several seeds: final accuracy and seconds per round.

    python benchmarks/methods_at_eps.py [--task fashion] [--eps 1] [--seeds 0 1 2] [--out results/methods]

Each run is an ordinary `dpfl-bench run` in its own process (its Parquet file lands in --out, and its peak
memory is its own); the table is printed and saved as Markdown beside them. Runs whose results file is
complete are not run again.
"""

import argparse
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from dpfl_bench.config import build_config
from dpfl_bench.federated import run_id
from dpfl_bench.results import read_run
from dpfl_bench.tasks import TASKS

METHODS = ("dp-lora", "ffa-lora", "rolora", "la-lora")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="fashion")
    parser.add_argument("--eps", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("results/methods"))
    args = parser.parse_args()

    task = TASKS.get(args.task)
    finals = []
    for method in METHODS:
        for seed in args.seeds:
            config = build_config(
                {"task": args.task, "method": method, "eps": args.eps, "seed": seed, "out": str(args.out)}, task.defaults
            )
            path = args.out / f"{run_id(config)}.parquet"
            rows = read_run(path) if path.exists() else None
            if rows is None or rows["round"].max() < config.federated.rounds:
                command = ["run", "--task", args.task, "--method", method, "--eps", str(args.eps), "--seed", str(seed)]
                subprocess.run([sys.executable, "-m", "dpfl_bench", *command, "--out", str(args.out)], check=True)
                rows = read_run(path)
            final = rows.iloc[-1]
            finals.append(
                {"method": method, "seed": seed, "accuracy": final["test_accuracy"],
                 "seconds_per_round": final["train_seconds"] / final["round"], "eps_spent": final["eps_spent"]}
            )
            print(f"{method} seed {seed}: accuracy {final['test_accuracy']:.4f}, ε spent {final['eps_spent']:.3f}", flush=True)

    df = pd.DataFrame(finals)
    summary = df.groupby("method", sort=False).agg(
        acc_mean=("accuracy", "mean"), acc_std=("accuracy", "std"), sec_mean=("seconds_per_round", "mean"),
        sec_std=("seconds_per_round", "std"), eps=("eps_spent", "max"), seeds=("seed", "count"),
    )
    eps_text = "∞" if math.isinf(args.eps) else f"{args.eps:g}"
    table = Table(title=f"{args.task}, ε = {eps_text}")
    lines = ["| method | test accuracy (mean ± std) | s / round | max ε spent | seeds |", "|---|---|---|---|---|"]
    for column in ("method", "test accuracy (mean ± std)", "s / round", "max ε spent", "seeds"):
        table.add_column(column)
    for method, r in summary.iterrows():
        cells = [method, f"{r.acc_mean:.4f} ± {r.acc_std:.4f}", f"{r.sec_mean:.1f} ± {r.sec_std:.1f}", f"{r.eps:.3f}", str(int(r.seeds))]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    Console().print(table)
    (args.out / f"summary_{args.task}_eps{eps_text}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
