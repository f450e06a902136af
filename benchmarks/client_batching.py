"""Seconds per round with a round's clients trained together against one after another, side by side.

    python benchmarks/client_batching.py [--repeats 3] [--device auto]

Cases: (a) `synthetic`, 32 clients per round, batch 8, and (a-512) the same in passes of 512; (b) `sentiment`,
8 clients, batch 32; (c) `mnist`, 8 clients, batch 64; all sample-level DP at a fixed σ (no calibration), 4
local steps. Each case trains round 0 both ways from the same global state, alternately, each with its default
physical batch (all clients of a pass together) unless the case sets one, and reports the median seconds per
round, the ratio, the peak memory of each way (CUDA: allocator peak; CPU: resident high-water mark, reset
before each) and the largest relative difference of the uploads. A case whose model batching does not cover
says why. Saves to results/bench_client_batching.json.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dpfl_bench.client import train_client
from dpfl_bench.client_batch import train_clients, uncovered
from dpfl_bench.configure import build_config
from dpfl_bench.execution import quiet_libraries
from dpfl_bench.federated import peak_memory_bytes, prepare, reset_peak_memory
from dpfl_bench.tasks import TASKS

CASES = {
    "a": {"task": "synthetic", "clients": 32, "batch-size": 8},
    "a-512": {"task": "synthetic", "clients": 32, "batch-size": 8, "physical-batch-size": 512},  # a tiny model: big passes
    "b": {"task": "sentiment", "clients": 8, "batch-size": 32},
    "c": {"task": "mnist", "clients": 8, "batch-size": 64},
}


def measure(case: dict, repeats: int, device: str) -> dict:
    options = {**case, "participation": 1.0, "local-steps": 4, "rounds": 1, "device": device, "eps": 1.0, "calibration": "shared"}
    config = build_config(options, TASKS.get(case["task"]).defaults)
    exp = prepare(config)
    ws, state, chosen = exp.workspace, exp.workspace.params.state(), exp.schedule[0]
    figures = {"case": case, "device": str(ws.device)}
    reason = uncovered(ws, exp.data.train)
    if reason:
        return {**figures, "not_covered": reason}
    physical = {"sequential": config.training.physical_batch(ws.device.type), "batched": ws.physical_batch_size}
    ways = {
        "sequential": lambda: [train_client(ws, state, exp.clients[k], exp.run, client=k, round=0) for k in chosen],
        "batched": lambda: train_clients(ws, [state] * len(chosen), [exp.clients[k] for k in chosen], exp.run, clients=chosen, round=0),
    }
    seconds: dict[str, list[float]] = {k: [] for k in ways}
    peaks: dict[str, int] = {}
    uploads = {}
    for _ in range(repeats):
        for name, train in ways.items():  # alternately, so drift in machine load hits both alike
            ws.physical_batch_size = physical[name]  # each way's default
            reset_peak_memory(ws.device)
            if ws.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            uploads[name] = train()
            if ws.device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks.get(name, 0), peak_memory_bytes(ws.device))
    worst = max(
        float((a.upload[n] - b.upload[n]).norm() / a.upload[n].norm().clamp(min=1e-12))
        for a, b in zip(uploads["sequential"], uploads["batched"]) for n in a.upload
    )
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    return {
        **figures, "physical_batch_size": physical, "seconds_per_round": medians, "speedup": medians["sequential"] / medians["batched"],
        "peak_memory_mib": {k: v / 2**20 for k, v in peaks.items()}, "largest_relative_upload_difference": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="a,a-512,b,c")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("results/bench_client_batching.json"))
    args = parser.parse_args()
    quiet_libraries()
    results = [measure(CASES[c], args.repeats, args.device) for c in args.cases.split(",")]
    for r in results:
        print(json.dumps(r), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
