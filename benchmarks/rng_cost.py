"""What `--rng secure` costs against `--rng seeded` on a task (default: the default task), side by side.

    python benchmarks/rng_cost.py [--task fashion] [--local-steps 2] [--repeats 2]

Two figures, each measured alternately for the two modes in this one process:
- the privacy draws of one local step alone: the Poisson mask of a client's dataset and the Gaussian noise
  for every trainable tensor (ChaCha20 with hardened Gaussians against PCG64);
- one client's whole local round (train_client of client 0, round 0) under sample-level DP.
Prints and saves to results/bench_rng_cost.json the median seconds of each and the ratios.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from dpfl_bench.client import train_client
from dpfl_bench.configure import build_config
from dpfl_bench.execution import quiet_libraries
from dpfl_bench.federated import prepare
from dpfl_bench.privacy.mechanism import noise_like
from dpfl_bench.privacy.randomness import MODES, Purpose, Randomness
from dpfl_bench.tasks import TASKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="fashion")
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--draw-repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("results/bench_rng_cost.json"))
    args = parser.parse_args()
    quiet_libraries()

    options = {"task": args.task, "eps": 1.0, "local-steps": args.local_steps, "out": "results/bench_rng_cost"}
    experiments = {mode: prepare(build_config({**options, "rng": mode}, TASKS.get(args.task).defaults)) for mode in MODES}
    seeded = experiments["seeded"]
    params = {n: p for n, p in seeded.workspace.params.all().items()}
    size = len(seeded.clients[0])

    draws: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.draw_repeats):
        for mode in MODES:
            randomness = experiments[mode].randomness
            start = time.perf_counter()
            randomness.stream(Purpose.BATCHES).bernoulli(size, experiments[mode].mechanism.sample_rates[0])
            noise_like(params, 1.0, randomness.stream(Purpose.NOISE))
            draws[mode].append(time.perf_counter() - start)

    rounds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            exp = experiments[mode]
            start = time.perf_counter()
            train_client(exp.workspace, exp.workspace.params.state(), exp.clients[0], exp.run, client=0, round=0)
            rounds[mode].append(time.perf_counter() - start)

    draw = {m: statistics.median(v) for m, v in draws.items()}
    local = {m: statistics.median(v) for m, v in rounds.items()}
    result = {
        "task": args.task, "trainable_parameters": sum(p.numel() for p in params.values()), "client_examples": size,
        "local_steps": args.local_steps, "repeats": args.repeats,
        "draws_per_step_seconds": draw, "draws_ratio": draw["secure"] / draw["seeded"],
        "local_round_seconds": local, "local_round_ratio": local["secure"] / local["seeded"],
        "rng": {m: str(Randomness(0, m).stream(Purpose.NOISE)._generator.bit_generator.__class__.__name__) for m in MODES},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
