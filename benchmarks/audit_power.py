"""How much the one-run audit can see on real tasks: its bounds on a non-private run, an honest ε = 1 run and a
run with a planted bug (noise σ/10 while the accountant counts σ), with 1,000 canaries.

    python benchmarks/audit_power.py [--tasks mnist,fashion] [--canaries 1000] [--seeds 0]

Every run is a default run of its task (DP-LoRA, sample level) with `--audit-canaries`. Prints a row per run
and saves them to results/bench_audit_power.json: the accounted ε, Steinke et al.'s 95% lower bound
(`audit_eps_lower`), the f-DP bound from the same guesses (`audit_eps_lower_fdp`), the Gaussian-fit estimate,
and the training seconds. A sound audit keeps the honest rows at or below their accounted ε; a useful one
puts the other two rows above it. Slow (minutes a run): a benchmark, not a test.
"""

import argparse
import json
import math
from pathlib import Path

from dpfl_bench.checkpoint import CheckpointConfig
from dpfl_bench.configure import build_config
from dpfl_bench.execution import quiet_libraries
from dpfl_bench.federated import run_federated
from dpfl_bench.privacy.mechanism import noise_like, register_mechanism
from dpfl_bench.privacy.mechanisms.sample import SampleDP
from dpfl_bench.tasks import TASKS


class TenthOfTheNoise(SampleDP):
    """A planted bug: the accountant counts σ, the run adds σ/10."""

    name = "planted-bug-tenth-noise"

    def privatize(self, summed, count, client, stream):
        expected = min(self.config.training.batch_size, self.client_sizes[client])
        noise = noise_like(summed, 0.1 * self.noise_multipliers[client] * self.clip, stream)
        return {name: (g + noise[name]) / expected for name, g in summed.items()}


REGIMES = {  # name: run options
    "non-private": {"eps": math.inf},
    "ε = 1": {"eps": 1.0},
    "σ/10 bug at ε = 1": {"eps": 1.0, "dp-level": TenthOfTheNoise.name},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="mnist,fashion")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--seeds", default="0", help="comma-separated")
    parser.add_argument("--out", type=Path, default=Path("results/bench_audit_power.json"))
    args = parser.parse_args()
    quiet_libraries()
    register_mechanism(TenthOfTheNoise)

    rows = []
    for task in args.tasks.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            for regime, options in REGIMES.items():
                config = build_config({"task": task, "method": "dp-lora", "seed": seed, "audit-canaries": args.canaries,
                                       "out": "results/bench_audit_power", **options}, TASKS.get(task).defaults)
                last = run_federated(config, checkpointing=CheckpointConfig(restart=True)).rows[-1]
                rows.append({"task": task, "seed": seed, "regime": regime, "canaries": args.canaries,
                             "eps_spent": last["eps_spent"] if math.isfinite(last["eps_spent"]) else "inf",
                             **{k: round(last[k], 3) if math.isfinite(last[k]) else str(last[k])
                                for k in ("audit_eps_lower", "audit_eps_lower_fdp", "audit_eps_estimate", "test_accuracy",
                                          "train_seconds")}})
                print(json.dumps(rows[-1], ensure_ascii=False), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(rows, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
