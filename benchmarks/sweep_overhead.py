"""What a sweep costs beyond training: the local backend against Ray, both with reused worker processes, on
the same suite, side by side in this one process.

    python benchmarks/sweep_overhead.py                              # 12 tiny synthetic points
    python benchmarks/sweep_overhead.py --suite benchmarks/smoke.toml --backends local:1,ray:2

Each backend runs the suite from nothing into its own folder. Prints and saves to
results/bench_sweep_overhead.json, per backend: wall seconds, seconds per point, training seconds per point
(the runs' own `train_seconds`) and the overhead per point (wall per point minus what the runs measured of
their own wall time, divided by the points running at once). Ray's start-up is counted in its wall time.
"""

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from dpfl_bench.execution import ExecutionConfig, create_backend
from dpfl_bench.federated import results_path
from dpfl_bench.results import read_run
from dpfl_bench.sweep import load_suite

TINY = """
description = "12 tiny synthetic points: the cost of a sweep around its training"
[base]
task = "synthetic"
rounds = 2
local-steps = 1
[grid]
method = ["dp-lora", "ffa-lora", "rolora", "la-lora"]
eps = [inf]
seed = [0, 1, 2]
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", type=Path, help="a suite file (default: 12 tiny synthetic points)")
    parser.add_argument("--backends", default="local:1,ray:1,ray:2", help="backend:jobs, comma-separated, in order")
    parser.add_argument("--out", type=Path, default=Path("results/bench_sweep_overhead.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sweep_overhead_"))
    text = args.suite.read_text() if args.suite else TINY
    text = "\n".join(line for line in text.splitlines() if not line.startswith("out ="))

    figures = []
    for spec in args.backends.split(","):
        backend, jobs = spec.split(":")
        folder = work / spec.replace(":", "-")
        folder.mkdir()
        suite_path = folder / "suite.toml"
        suite_path.write_text(f'out = "{folder / "results"}"\n{text}')
        points = load_suite(suite_path).points
        started = time.perf_counter()
        create_backend(ExecutionConfig(backend=backend, jobs=int(jobs))).run(points, lambda event: None)
        wall = time.perf_counter() - started
        last = [read_run(results_path(c)).iloc[-1] for c in points]
        run_wall = sum(r["wall_seconds"] for r in last)
        figures.append({
            "backend": backend, "jobs": int(jobs), "points": len(points), "wall_seconds": wall,
            "seconds_per_point": wall / len(points),
            "train_seconds_per_point": statistics.mean(r["train_seconds"] for r in last),
            "run_wall_seconds_per_point": run_wall / len(points),
            "overhead_seconds_per_point": (wall * int(jobs) - run_wall) / len(points),
            "peak_memory_mib_median": statistics.median(r["peak_memory_bytes"] for r in last) / 2**20,
        })
        f = figures[-1]
        print(f"{backend} ×{jobs}: {f['wall_seconds']:.1f} s for {len(points)} points · {f['seconds_per_point']:.2f} s/point · "
              f"training {f['train_seconds_per_point']:.2f} s/point · overhead {f['overhead_seconds_per_point']:.2f} s/point · "
              f"peak memory median {f['peak_memory_mib_median']:.0f} MiB", flush=True)
    shutil.rmtree(work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1))
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
