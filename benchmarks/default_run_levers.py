"""What two levers save on the default task: one DP local step and one evaluation, alternately in this one
process, with the model (a) in the default NCHW layout, (b) channels-last, and (c) channels-last with the
frozen BatchNorms that LoRA's placement allows folded into the convolution before them (what runs use:
`tasks.images.fold_frozen_batchnorm`; skipped for (a) and (b)).

    python benchmarks/default_run_levers.py [--task fashion] [--repeats 3]

Prints and saves to results/bench_default_run_levers.json the median seconds of each, the ratios to (a)
and (b), and the relative difference of the clipped gradient sums to (a)'s (float rounding).
"""

import argparse
import json
import statistics
import time
import unittest.mock
from pathlib import Path

import torch

from dpfl_bench.adapters import add_lora
from dpfl_bench.client import Workspace, set_train_mode, summed_gradients
from dpfl_bench.configure import build_config
from dpfl_bench.execution import quiet_libraries
from dpfl_bench.federated import evaluate
from dpfl_bench.privacy.per_example import PerExampleGradients
from dpfl_bench.tasks import TASKS, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="fashion")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/bench_default_run_levers.json"))
    args = parser.parse_args()
    quiet_libraries()
    task = TASKS.get(args.task)
    config = build_config({"task": args.task}, task.defaults)
    data = task.load(config.sources)

    def workspace(channels_last: bool, folded: bool = False) -> Workspace:
        torch.manual_seed(0)
        with unittest.mock.patch.object(images, "fold_frozen_batchnorm", images.fold_frozen_batchnorm if folded else lambda _: None):
            built = task.build_model(data.num_classes, config.sources)
        params = add_lora(built.module, built.lora_targets, built.heads, config.adapter)
        if channels_last:
            built.module.to(memory_format=torch.channels_last)
        params.set_trainable(frozenset(params.by_factor))
        return Workspace(built.module, params, torch.device("cpu"), PerExampleGradients(built.module, params.all()),
                         config.training.physical_batch("cpu"))

    variants = {"nchw": workspace(False), "channels_last": workspace(True), "channels_last_bn_folded": workspace(True, True)}
    batch = torch.arange(config.training.batch_size)
    seconds: dict[str, dict[str, list[float]]] = {k: {"dp_step": [], "evaluation": []} for k in variants}
    sums = {}
    for _ in range(args.repeats):
        for name, ws in variants.items():  # alternately, so drift in machine load hits all alike
            set_train_mode(ws.model)
            start = time.perf_counter()
            sums[name], _ = summed_gradients(ws, data.train, batch, config.privacy.clip, list(range(len(batch))))  # same masks
            seconds[name]["dp_step"].append(time.perf_counter() - start)
            start = time.perf_counter()
            evaluate(ws.model, data.test, ws.device)
            seconds[name]["evaluation"].append(time.perf_counter() - start)
    medians = {k: {part: statistics.median(v) for part, v in parts.items()} for k, parts in seconds.items()}

    def ratios(name: str, to: str) -> dict[str, float]:
        return {part: medians[name][part] / medians[to][part] for part in ("dp_step", "evaluation")}

    def difference(name: str) -> float:
        a, b = sums["nchw"], sums[name]
        return float(torch.sqrt(sum((a[n] - b[n]).pow(2).sum() for n in a)) / torch.sqrt(sum(a[n].pow(2).sum() for n in a)))

    result = {
        "task": args.task, "batch_size": config.training.batch_size, "test_images": len(data.test),
        "threads": torch.get_num_threads(), "repeats": args.repeats, "seconds": medians,
        "channels_last_to_nchw": ratios("channels_last", "nchw"),
        "bn_folded_to_channels_last": ratios("channels_last_bn_folded", "channels_last"),
        "relative_difference_of_the_sums_to_nchw": {n: difference(n) for n in ("channels_last", "channels_last_bn_folded")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
