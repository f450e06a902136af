"""Seconds per round, extra memory and upload of every method, side by side in one process.

    python benchmarks/method_cost.py                                   # the default task (fashion) at ε = 1
    python benchmarks/method_cost.py --set preset=authors-vision --set local-steps=20 --name paper-regime

Every method gets the same configuration. Each is prepared once (data, model, calibration), trains one
untimed round, then the methods take turns, `--repeats` times, each timing one round: the same client
training, aggregation and broadcast a run does. Run it on an idle machine: the figures are only comparable
within one run. Prints a table and saves results/bench_method_cost[_NAME].json.

Memory is the round's peak resident memory (CUDA: allocated) above what was resident before it, on Linux,
where the high-water mark can be reset between rounds.

Where a round's time goes (CPU only: the parts are timed by wrapping them here, which a GPU's asynchrony
would blur): the forward passes; per-example gradients (the backward pass to each trainable layer's output
and the per-example products; without per-example clipping, the plain backward pass); clipping and
summing; noise (the mechanism's privatization); the method's filter or extra step; the optimizer step;
aggregation and broadcast at the server; the rest (batch drawing, loading states, Python).
"""

import argparse
import json
import statistics
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

import dpfl_bench.client as client_module
import dpfl_bench.client_batch as client_batch_module
import dpfl_bench.privacy.per_example as per_example_module
from dpfl_bench.configure import build_config
from dpfl_bench.federated import Experiment, peak_memory_bytes, prepare, reset_peak_memory, train_round
from dpfl_bench.method import load_methods
from dpfl_bench.tasks import TASKS


def resident_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:", 1)[1].split()[0]) * 1024


PARTS = ("forward", "per-example gradients", "clipping", "noise", "filter", "optimizer", "aggregation")


class PartTimer:
    """Seconds spent in each part of a round, by wrapping the functions that do it (on the CPU)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)

    def wrap(self, owner: Any, name: str, part: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        setattr(owner, name, timed)

    def instrument(self, exp: Experiment) -> None:
        """Wrap this experiment's model, mechanism and method (instances) and the shared helpers (once)."""
        model = exp.workspace.model
        started: list[float] = []
        model.register_forward_pre_hook(lambda module, args: started.append(time.perf_counter()))
        model.register_forward_hook(lambda module, args, out: self._add("forward", started.pop()))
        self.wrap(exp.run.mechanism, "privatize", "noise")
        self.wrap(exp.run.mechanism, "aggregate", "aggregation")
        self.wrap(exp.run.method, "postprocess", "filter")
        self.wrap(exp.run.method, "extra_step", "filter")
        self.wrap(exp.run.method, "broadcast", "aggregation")
        if exp.workspace.per_example is not None:
            self.wrap(exp.workspace.per_example, "compute", "per-example gradients")

    def instrument_shared(self) -> None:
        self.wrap(per_example_module, "clip_and_sum", "clipping")
        self.wrap(client_batch_module, "clip_and_sum", "clipping")
        for module in (client_module, client_batch_module):
            original = module.make_optimizer

            def make(*args: Any, _original: Any = original, **kwargs: Any) -> torch.optim.Optimizer:
                optimizer = _original(*args, **kwargs)
                self.wrap(optimizer, "step", "optimizer")
                return optimizer

            module.make_optimizer = make

    def _add(self, part: str, start: float) -> None:
        self.seconds[part] += time.perf_counter() - start

    def take(self) -> dict[str, float]:
        taken, self.seconds = self.seconds, dict.fromkeys(PARTS, 0.0)
        return taken


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
    parser.add_argument("--breakdown", action="store_true", help="also time each part of a round (CPU)")
    args = parser.parse_args()
    timer = PartTimer() if args.breakdown else None
    if timer:
        timer.instrument_shared()

    options: dict[str, Any] = {"task": args.task, "eps": args.eps}
    for item in args.set:
        key, _, value = item.partition("=")
        options[key] = toml_value(value)
    methods = args.methods.split(",")
    experiments, states = {}, {}
    for method in methods:
        exp = prepare(build_config({**options, "method": method}, TASKS.get(args.task).defaults))
        if timer:
            timer.instrument(exp)
        states[method], *_ = timed_round(exp, exp.workspace.params.state(), 0)  # untimed: first-call costs
        if timer:
            timer.take()
        experiments[method] = exp
    figures: dict[str, dict[str, list[float]]] = {m: {"seconds": [], "extra_memory_bytes": [], "bytes_uploaded": []} for m in methods}
    parts: dict[str, dict[str, float]] = {m: dict.fromkeys(PARTS, 0.0) for m in methods}
    for repeat in range(args.repeats):
        for method in methods:
            states[method], seconds, memory, uploaded = timed_round(experiments[method], states[method], 1 + repeat)
            for key, value in zip(figures[method], (seconds, memory, uploaded)):
                figures[method][key].append(value)
            if timer:
                for part, spent in timer.take().items():
                    parts[method][part] += spent / args.repeats

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
        if timer:
            mean = statistics.mean(f["seconds"])
            row["seconds_by_part"] = {**parts[method], "rest": mean - sum(parts[method].values())}
        table[method] = row
        print(f"{method:<10} {row['seconds_per_round']:>10.2f} {row['seconds_per_round'] / base:>12.2f} "
              f"{row['extra_memory_bytes'] / 2**20:>9.1f} {row['bytes_uploaded_per_round'] / 1e3:>14.1f}")
    if timer:
        print("\nseconds per round, by part (mean over the timed rounds):")
        print(f"{'method':<10}" + "".join(f" {part[:12]:>12}" for part in [*PARTS, "rest"]))
        for method in methods:
            by_part = table[method]["seconds_by_part"]
            print(f"{method:<10}" + "".join(f" {by_part[part]:>12.2f}" for part in [*PARTS, "rest"]))
    out = Path("results") / f"bench_method_cost{'_' + args.name if args.name else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"options": options, "repeats": args.repeats, "device": str(device),
                               "threads": torch.get_num_threads(), "methods": table}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
