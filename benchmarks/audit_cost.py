"""What the empirical audit costs: run time and accuracy with and without canaries, side by side.

    python benchmarks/audit_cost.py [--task mnist] [--canaries 1000] [--eps 1,inf] [--repeats 1]

For each ε, the same configuration runs without canaries and with them, alternately in this one process
(so drift in machine load hits both alike). Prints and saves to results/bench_audit_cost.json the training
seconds of each, their ratio, the final test accuracies and the audit's figures.
"""

import argparse
import json
import math
import statistics
from pathlib import Path

from dpfl_bench.checkpoint import CheckpointConfig
from dpfl_bench.configure import build_config
from dpfl_bench.execution import quiet_libraries
from dpfl_bench.federated import run_federated
from dpfl_bench.tasks import TASKS

AGAIN = CheckpointConfig(restart=True)  # a repeat trains again instead of returning the finished run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="mnist")
    parser.add_argument("--method", default="dp-lora")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--eps", default="1,inf", help="comma-separated targets")
    parser.add_argument("--dp-level", default="sample")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/bench_audit_cost.json"))
    args = parser.parse_args()
    quiet_libraries()

    results = []
    for eps in [float(e) for e in args.eps.split(",")]:
        runs: dict[int, list[dict]] = {0: [], args.canaries: []}
        for _ in range(args.repeats):
            for canaries in runs:
                options = {"task": args.task, "method": args.method, "eps": eps, "dp-level": args.dp_level,
                           "audit-canaries": canaries, "out": "results/bench_audit_cost"}
                summary = run_federated(build_config(options, TASKS.get(args.task).defaults), checkpointing=AGAIN)
                runs[canaries].append(summary.rows[-1])
        plain, audited = runs[0], runs[args.canaries]
        seconds = {k: statistics.median(r["train_seconds"] for r in v) for k, v in runs.items()}
        results.append({
            "task": args.task, "method": args.method, "dp_level": args.dp_level, "eps": eps, "canaries": args.canaries,
            "train_seconds_without": seconds[0], "train_seconds_with": seconds[args.canaries],
            "time_ratio": seconds[args.canaries] / seconds[0],
            "accuracy_without": statistics.mean(r["test_accuracy"] for r in plain),
            "accuracy_with": statistics.mean(r["test_accuracy"] for r in audited),
            "eps_spent": audited[-1]["eps_spent"] if math.isfinite(eps) else "inf",
            "audit_eps_lower": audited[-1]["audit_eps_lower"], "audit_eps_estimate": audited[-1]["audit_eps_estimate"],
        })
        print(json.dumps(results[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
