"""Time of one DP-SGD local step against one non-private step on a task (same batch, same model).

    python benchmarks/step_overhead.py [--task sentiment] [--batch-size 32] [--repeats 15] [--device cuda]

Prints the median seconds of each and their ratio, and saves them to results/bench_step_overhead.json.
The DP step is: per-example gradients of the trainable factors and head, per-example clipping, sum;
the non-private step is the ordinary gradient of the mean loss. Noise and the optimizer are the same
cheap elementwise work in both and are left out.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dpfl_bench.adapters import add_lora
from dpfl_bench.client import Workspace, set_train_mode, summed_gradients
from dpfl_bench.config import RunConfig
from dpfl_bench.configure import build_config
from dpfl_bench.federated import resolve_device
from dpfl_bench.privacy.per_example import PerExampleGradients
from dpfl_bench.tasks import TASKS, Task


def workspace(task: Task, num_classes: int, config: RunConfig, dp: bool, device: torch.device) -> Workspace:
    """Two identical models, so that the non-private one carries no per-example hooks at all."""
    torch.manual_seed(0)
    built = task.build_model(num_classes, config.sources)
    model = built.module.to(device)
    params = add_lora(model, config.adapter.targets or built.lora_targets, built.heads, config.adapter)
    params.set_trainable(frozenset(params.by_factor))
    set_train_mode(model)
    engine = PerExampleGradients(model, params.all()) if dp else None
    return Workspace(model, params, device, engine, config.training.physical_batch(device.type), config.training.precision)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--physical-batch-size", type=int, default=None, help="default: the task's")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16")
    parser.add_argument("--out", type=Path, default=Path("results/bench_step_overhead.json"))
    args = parser.parse_args()

    task = TASKS.get(args.task)
    options = {"task": args.task, "batch_size": args.batch_size, "device": args.device, "precision": args.precision}
    if args.physical_batch_size:
        options["physical_batch_size"] = args.physical_batch_size
    config = build_config(options, task.defaults)
    device = resolve_device(config.device)
    data = task.load(config.sources)
    plain, private = (workspace(task, data.num_classes, config, dp, device) for dp in (False, True))
    index = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[: args.batch_size]

    times: dict[str, list[float]] = {"non_private": [], "dp": []}
    for _ in range(args.repeats + 2):  # interleaved, so drift in machine load hits both alike
        for name, ws, clip in (("non_private", plain, None), ("dp", private, config.privacy.clip)):
            synchronize(device)
            start = time.perf_counter()
            summed_gradients(ws, data.train, index, clip, list(range(len(index))))
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v[2:]) for k, v in times.items()}  # first two are warm-up
    result = {
        "task": args.task,
        "batch_size": args.batch_size,
        "physical_batch_size": private.physical_batch_size,
        "repeats": args.repeats,
        "device": str(device),
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "non_private_seconds": medians["non_private"],
        "dp_seconds": medians["dp"],
        "ratio": medians["dp"] / medians["non_private"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
