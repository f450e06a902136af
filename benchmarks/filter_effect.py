"""How much LA-LoRA's filter changes one round: the Gaussian (dpfl-bench's default) against the Laplacian
(the authors' code), under SGD and AdamW, without noise and at ε = 1.

    python benchmarks/filter_effect.py [--rounds 30] [--sgd-lr 0.01] [--adamw-lr 1e-4]

The setting is the authors' vision one at CPU scale (`benchmarks/paper-regime.toml`'s base: `fashion`,
8 clients × 500, 4 a round, K = 20, batch 16, rank 16; each variant's factor order: B first for the
Gaussian, A first for the Laplacian). For each (filter, optimizer, privacy) the first round is trained twice
from the same global state with the same seed, batches and noise, once with the filter (σ = 1) and once
without (σ = 0), and the figure is ‖Δ_filter − Δ_none‖ / ‖Δ_none‖ over the round's aggregated update of
every sent tensor (A, B, head), and per factor. At ε = 1 the noise is calibrated for `--rounds` rounds, as a
run of that length would be. Prints a table; saves results/bench_filter_effect.json.
"""

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch

from dpfl_bench.configure import build_config
from dpfl_bench.execution import quiet_libraries
from dpfl_bench.federated import prepare, train_round
from dpfl_bench.method import create_method
from dpfl_bench.tasks import TASKS

BASE = {
    "task": "fashion", "clients": 8, "client-size": 500, "partition": "dirichlet-mix", "dirichlet-alpha": 0.1,
    "participation": 0.5, "local-steps": 20, "batch-size": 16, "rank": 16, "lora-alpha": 16.0, "weight-decay": 0.01,
    "method": "la-lora", "device": "cpu",
}
FILTERS = {"gaussian": {"filter": "gaussian", "first_factor": "B"}, "laplacian": {"filter": "laplacian", "first_factor": "A"}}


def relative_change(filtered: dict, plain: dict, start: dict, names: list[str]) -> float:
    difference = sum(float((filtered[n] - plain[n]).double().pow(2).sum()) for n in names)
    update = sum(float((plain[n] - start[n]).double().pow(2).sum()) for n in names)
    return math.sqrt(difference / update) if update else math.nan


def measure(optimizer: str, lr: float, eps: float, rounds: int) -> dict:
    config = build_config({**BASE, "optimizer": optimizer, "lr": lr, "eps": eps, "rounds": rounds}, TASKS.get("fashion").defaults)
    exp = prepare(config)
    start = exp.workspace.params.state()
    figures = {}
    for name, options in FILTERS.items():
        updates = {}
        for sigma in (1.0, 0.0):
            method_options = {**options, "smooth_sigma": sigma}
            variant = dataclasses.replace(exp, method=create_method("la-lora", method_options),
                                          config=dataclasses.replace(config, method_options=method_options))
            updates[sigma], _, names = train_round(variant, start, {}, 0)
        groups = {"all": names, **{f: [n for n in names if f"lora_{f}." in n] for f in ("A", "B")},
                  "head": [n for n in names if "lora_" not in n]}
        figures[name] = {group: relative_change(updates[1.0], updates[0.0], start, members) for group, members in groups.items()}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="the run length the ε = 1 noise is calibrated for")
    parser.add_argument("--sgd-lr", type=float, default=0.01)
    parser.add_argument("--adamw-lr", type=float, default=1e-4, help="the authors' vision lr")
    args = parser.parse_args()
    quiet_libraries()
    rows = []
    for optimizer, lr in (("sgd", args.sgd_lr), ("adamw", args.adamw_lr)):
        for eps in (math.inf, 1.0):
            for name, groups in measure(optimizer, lr, eps, args.rounds).items():
                rows.append({"filter": name, "optimizer": optimizer, "lr": lr, "eps": eps, **groups})
                print(f"{name:9s} {optimizer:5s} lr {lr:<6g} ε={eps:<4g} relative change: all {groups['all']:.5f} · "
                      f"A {groups['A']:.5f} · B {groups['B']:.5f} · head {groups['head']:.5f}", flush=True)
    out = Path("results/bench_filter_effect.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "torch_threads": torch.get_num_threads(), "rows": rows},
                              indent=1, default=str))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
