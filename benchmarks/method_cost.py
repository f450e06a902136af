"""Seconds per round, extra memory and upload of every method, side by side in one process.

    python benchmarks/method_cost.py                                   # the default task (fashion) at ε = 1
    python benchmarks/method_cost.py --set preset=authors-vision --set local-steps=20 --name paper-regime

Every method gets the same configuration. Each is prepared once (data, model, calibration), trains one
untimed round, then the methods take turns, `--repeats` times, each timing one round: the same client
training, aggregation and broadcast a run does. Run it on an idle machine: the figures are only comparable
within one run. Prints a table and saves results/bench_method_cost[_NAME].json.

Memory is the round's peak resident memory (CUDA: allocated) above what was resident before it, on Linux,
where the high-water mark can be reset between rounds.
"""

import argparse
import json
import statistics
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

from dpfl_bench.configure import build_config
from dpfl_bench.federated import Experiment, peak_memory_bytes, prepare, reset_peak_memory, train_round
from dpfl_bench.method import load_methods
from dpfl_bench.tasks import TASKS


def resident_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:", 1)[1].split()[0]) * 1024


def timed_round(exp: Experiment, state: dict, round: int) -> tuple[dict, float, int, int]:
    """(new state, seconds, peak bytes above the start, bytes uploaded by the round's clients)."""
    device = exp.workspace.device
    reset_peak_memory(device)
    before = resident_bytes(device)
    start = time.perf_counter()
    state, results, names = train_round(exp, state, {}, round)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    uploaded = sum(r.upload[n].numel() * r.upload[n].element_size() for r in results for n in names)
    return state, seconds, peak_memory_bytes(device) - before, uploaded


def toml_value(text: str) -> Any:
    """`20` -> 20, `1e-4` -> 0.0001, `true` -> True, anything else as the string it is."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="fashion")
    parser.add_argument("--eps", type=float, default=1.0)
    parser.add_argument("--methods", default=",".join(load_methods().names()), help="comma-separated (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", help="any run option, repeatable")
    parser.add_argument("--name", default="", help="suffix of the saved file")
    args = parser.parse_args()

    options: dict[str, Any] = {"task": args.task, "eps": args.eps}
    for item in args.set:
        key, _, value = item.partition("=")
        options[key] = toml_value(value)
    methods = args.methods.split(",")
    experiments, states = {}, {}
    for method in methods:
        exp = prepare(build_config({**options, "method": method}, TASKS.get(args.task).defaults))
        states[method], *_ = timed_round(exp, exp.workspace.params.state(), 0)  # untimed: first-call costs
        experiments[method] = exp
    figures: dict[str, dict[str, list[float]]] = {m: {"seconds": [], "extra_memory_bytes": [], "bytes_uploaded": []} for m in methods}
    for repeat in range(args.repeats):
        for method in methods:
            states[method], seconds, memory, uploaded = timed_round(experiments[method], states[method], 1 + repeat)
            for key, value in zip(figures[method], (seconds, memory, uploaded)):
                figures[method][key].append(value)

    base = statistics.median(figures[methods[0]]["seconds"])
    exp0 = experiments[methods[0]]
    device, config = exp0.workspace.device, exp0.run.config
    print(f"{args.task}, ε = {args.eps:g}, {config.federated.local_steps} local steps, batch {config.training.batch_size}, "
          f"rank {config.adapter.rank}, {len(exp0.schedule[1])} clients a round; device {device}, {torch.get_num_threads()} threads")
    print(f"{'method':<10} {'s / round':>10} {'× ' + methods[0]:>12} {'MB extra':>9} {'kB up / round':>14}")
    table = {}
    for method in methods:
        f = figures[method]
        row = {
            "seconds_per_round": statistics.median(f["seconds"]),
            "all_seconds": f["seconds"],
            "extra_memory_bytes": max(f["extra_memory_bytes"]),
            "bytes_uploaded_per_round": statistics.median(f["bytes_uploaded"]),
        }
        table[method] = row
        print(f"{method:<10} {row['seconds_per_round']:>10.2f} {row['seconds_per_round'] / base:>12.2f} "
              f"{row['extra_memory_bytes'] / 2**20:>9.1f} {row['bytes_uploaded_per_round'] / 1e3:>14.1f}")
    out = Path("results") / f"bench_method_cost{'_' + args.name if args.name else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"options": options, "repeats": args.repeats, "device": str(device),
                               "threads": torch.get_num_threads(), "methods": table}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
