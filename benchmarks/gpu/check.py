"""The prepared device check: run it once when a GPU is lent, in one call of at most 8 minutes.

    python benchmarks/gpu/check.py            # on the device: correctness, then paper-sized cost
    python benchmarks/gpu/check.py --smoke    # every part at toy sizes on the CPU, in about a minute

Prints a table per part and saves results/gpu_check.json (under $OUT when set, so the device tool brings it
back). It needs torch, timm, transformers and peft (all on the device machine) and what
`tools/prepare_device.sh` carries in `.device/`; nothing is downloaded.

1. Correctness on the device: one round of every method under every mechanism on `synthetic` (and sample
   level with `--rng secure`); the per-example engine against autograd on a small transformer and a 1x1-conv
   network; the same noise from the same seed on the CPU and on the device (the noise is drawn on the CPU,
   then moved).
2. Cost at the paper's sizes, models built from their configurations at random initialization (Swin-T and
   Swin-B at 224 px through timm, RoBERTa-base at 128 tokens through transformers): seconds and peak
   memory of one local step of batch 16 with LoRA rank 16, for each set of trained factors the methods use
   (A and B: DP-LoRA; one factor: FFA-LoRA, RoLoRA and LA-LoRA's steps; R: Fed-SB), per-example clipping
   against a non-private step, strict fp32 against TF32 (what runs use in fp32 on CUDA) against bf16.
   LA-LoRA's paper reports 0.57× DP-LoRA's time and 0.50× its memory; here the frozen factor never gets a
   per-example gradient, so a one-factor step saves only that factor's own products.
3. A round at the paper's size: Swin-B at random initialization on random 32 px images resized to 224 (as
   the authors feed CIFAR), 4 clients of K = 20 steps of batch 16, rank 16: seconds per round and peak memory
   for DP-LoRA and LA-LoRA at ε = 1 and without DP, and DP-LoRA's round with its clients batched against one
   by one, and with a physical batch of exactly the expected batch (a second pass whenever a Poisson batch
   exceeds its mean) against the default of twice that (a task registered here, as a user would add one:
   `paper_round_task`).
4. One real answer: the default task (`fashion`, pretrained EfficientNet-Lite0) at ε = 1 for every method,
   seeds 0-2, exactly as `benchmarks/fashion-seeds.toml` runs it, beside the committed CPU run of the same
   configuration and seed (`results/fashion-seeds/`). It needs the Fashion-MNIST files and the
   EfficientNet-Lite0 weights, which `tools/prepare_device.sh` puts in `.device/` to be carried;
   `--fashion-dir` says where the files are (default: `.device/fashion-mnist` when it exists).
Each part has a time cap and reports what it finished.
"""

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from dpfl_bench.adapters import add_lora
from dpfl_bench.compare import results_files
from dpfl_bench.config import AdapterConfig
from dpfl_bench.configure import build_config
from dpfl_bench.errors import UserError
from dpfl_bench.federated import run_federated
from dpfl_bench.method import Factor, create_method, load_methods
from dpfl_bench.privacy.mechanism import create_mechanism
from dpfl_bench.privacy.per_example import PerExampleGradients
from dpfl_bench.privacy.randomness import Purpose, Randomness
from dpfl_bench.results import read_run
from dpfl_bench.sweep import load_suite
from dpfl_bench.tasks import TASKS, Examples, Task, TrainTestSplit, images, register_task
from dpfl_bench.tasks.base import BuiltModel

ROOT = Path(__file__).parents[2]
DEFAULT_SUITE = ROOT / "benchmarks" / "fashion-seeds.toml"  # the default task at ε = 1; its CPU runs are committed
CARRIED_FASHION = ROOT / ".device" / "fashion-mnist"
PAPER_CLIENT_SIZE = 400  # examples per client in the paper-sized round (a step samples 16 of them)

LEVELS = {"none": {"eps": math.inf}, "sample": {"eps": 8.0}, "client": {"eps": 8.0, "dp-level": "client", "clients": 6,
          "participation": 0.5}, "authors": {"dp-level": "authors"}, "sample, secure rng": {"eps": 8.0, "rng": "secure"}}
FACTOR_SETS = {"A+B (dp-lora)": ("dp-lora", frozenset({Factor.A, Factor.B})), "B (ffa-lora)": ("ffa-lora", frozenset({Factor.B})),
               "R (fed-sb)": ("fed-sb", frozenset({Factor.R}))}


def every_method_round(device: str, deadline: float) -> list[dict[str, Any]]:
    rows = []
    for method in load_methods().names():
        for level, level_options in LEVELS.items():
            if time.perf_counter() > deadline:
                return rows
            options = {"task": "synthetic", "device": device, "method": method, "rounds": 1, "local-steps": 2,
                       "out": os.path.join(out_dir(), "gpu-check-runs"), **level_options}
            config = build_config(options, TASKS.get("synthetic").defaults)
            start = time.perf_counter()
            row = run_federated(config).rows[-1]
            rows.append({"method": method, "level": level, "seconds": time.perf_counter() - start,
                         "finite": math.isfinite(row["test_loss"]), "eps_spent": row["eps_spent"]})
    return rows


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(pixel_values).mean(dim=(2, 3)))


def engine_against_autograd(device: torch.device) -> list[dict[str, Any]]:
    """Largest relative difference between the engine's per-example gradients and one-at-a-time autograd."""
    rows = []
    for name, build in (("synthetic transformer", _synthetic_model), ("1x1-conv network", _conv_model)):
        torch.manual_seed(0)
        model, targets, heads, features, labels = build()
        model = model.to(device).eval()
        params = add_lora(model, targets, heads, AdapterConfig(rank=4, lora_alpha=8.0))
        with torch.no_grad():
            for p in params.by_factor[Factor.B].values():
                p.normal_(0, 0.1)
        params.set_trainable(frozenset({Factor.A, Factor.B, Factor.HEAD}))
        features = {k: v.to(device) for k, v in features.items()}
        labels = labels.to(device)
        engine = PerExampleGradients(model, params.all())
        batched = engine.compute(F.cross_entropy(model(**features), labels, reduction="none"))
        worst = 0.0
        for i in range(len(labels)):
            loss = F.cross_entropy(model(**{k: v[i : i + 1] for k, v in features.items()}), labels[i : i + 1])
            engine.reset()
            grads = torch.autograd.grad(loss, list(params.all().values()))
            for (param_name, _), g in zip(params.all().items(), grads):
                scale = float(g.norm()) + 1e-12
                worst = max(worst, float((batched[param_name][i] - g).norm()) / scale)
        engine.remove()
        rows.append({"model": name, "worst_relative_difference": worst, "exact_to_float_tolerance": worst < 1e-3})
    return rows


def _synthetic_model():
    task = TASKS.get("synthetic")
    built = task.build_model(2, build_config({"task": "synthetic"}).sources)
    data = task.load(build_config({"task": "synthetic"}).sources).train
    features, labels = data.batch(torch.arange(6))
    return built.module, built.lora_targets, built.heads, features, labels


def _conv_model():
    return TinyConvNet(), ("body.0", "body.2"), ("head",), {"pixel_values": torch.randn(6, 3, 5, 5)}, torch.tensor([0, 1, 2, 0, 1, 2])


def noise_on_both(device: torch.device) -> dict[str, Any]:
    """The same seed's privatized gradient on the CPU and on the device: the noise comes from a CPU stream."""
    config = build_config({"task": "synthetic", "eps": 1.0})
    summed = {"w": torch.randn(64, 32, generator=torch.Generator().manual_seed(1))}
    out = {}
    for where in ("cpu", str(device)):
        mechanism = create_mechanism(config, [200, 200, 200])
        mechanism.noise_multipliers = [1.0, 1.0, 1.0]
        stream = Randomness(0).stream(Purpose.NOISE, 0, 0)
        out[where] = mechanism.privatize({k: v.to(where) for k, v in summed.items()}, 16, 0, stream)["w"].cpu()
    difference = float((out["cpu"] - out[str(device)]).abs().max())
    return {"device": str(device), "max_abs_difference": difference, "same_noise": difference < 1e-5}


def paper_models(smoke: bool) -> dict[str, Callable[[], tuple[nn.Module, tuple[str, ...], tuple[str, ...], dict]]]:
    import timm
    from transformers import RobertaConfig, RobertaForSequenceClassification

    size, tokens = (32, 16) if smoke else (224, 128)

    def swin(name: str):
        def build():
            toy = {"img_size": size, "window_size": 4, "depths": (1, 1, 1, 1), "embed_dim": 32, "num_heads": (1, 2, 2, 4)}
            kwargs = toy if smoke else {}
            model = timm.create_model(name, pretrained=False, num_classes=100, **kwargs)
            return model, ("attn.qkv", "attn.proj"), ("head.fc",), {"x": torch.randn(16, 3, size, size)}
        return build

    def roberta():
        config = RobertaConfig(num_labels=2, **({"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                                 "intermediate_size": 64} if smoke else {}))
        model = _LogitsOnly(RobertaForSequenceClassification(config))
        ids = torch.randint(3, config.vocab_size, (16, tokens))
        return model, ("query", "key", "value", "dense"), ("model.classifier",), {"input_ids": ids}

    return {"swin-t": swin("swin_tiny_patch4_window7_224"), "swin-b": swin("swin_base_patch4_window7_224"), "roberta-base": roberta}


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def step_cost(device: torch.device, smoke: bool, deadline: float) -> list[dict[str, Any]]:
    """Seconds and peak memory of one step of batch 16 (median of 3 after one warm-up), per model,
    trained factors, DP or not and precision."""
    rows = []
    for model_name, build in paper_models(smoke).items():
        for label, (method, factors) in FACTOR_SETS.items():
            for dp in (True, False):
                for precision in ("fp32", "tf32", "bf16"):
                    if time.perf_counter() > deadline:
                        return rows
                    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                        continue
                    rows.append({"model": model_name, "factors": label, "dp": dp, "precision": precision,
                                 **_one_step(build, method, factors, dp, precision, device)})
    return rows


def _one_step(build, method: str, factors: frozenset, dp: bool, precision: str, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    model, targets, heads, features = build()
    model = model.to(device).train()
    params = add_lora(model, targets, heads, AdapterConfig(rank=16, lora_alpha=16.0), create_method(method))
    params.set_trainable(factors | {Factor.HEAD})
    engine = PerExampleGradients(model, params.all()) if dp else None
    features = {k: v.to(device) for k, v in features.items()}
    labels = torch.zeros(16, dtype=torch.long, device=device)
    dtype = torch.bfloat16 if precision == "bf16" else None
    # fp32 here is strict (torch's default for matmuls); tf32 is what dpfl-bench's runs use for fp32 on CUDA
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(4):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(**features)
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        if engine is not None:
            engine.clipped_sum(losses, 1.0)
        else:
            trainable = [p for p in params.all().values() if p.requires_grad]
            torch.autograd.grad(losses.sum(), trainable)
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan
    if engine is not None:
        engine.remove()
    return {"seconds": statistics.median(times[1:]), "peak_mib": peak}


class _ResizedImages(nn.Module):
    """uint8 images [batch, H, W, 3] -> floats resized to the network's input size -> logits."""

    def __init__(self, network: nn.Module, size: int) -> None:
        super().__init__()
        self.network, self.size = network, size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float().div(255)
        return self.network(F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False))


def paper_round_task(smoke: bool) -> str:
    """Register a task of random CIFAR-sized images and a random-init Swin-B (toy sizes in smoke): cost only."""
    name, build = "gpu-check-swin-b", paper_models(smoke)["swin-b"]
    size = 32 if smoke else 224

    def load_data(sources) -> TrainTestSplit:
        generator = torch.Generator().manual_seed(0)

        def examples(n: int) -> Examples:
            pixels = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=generator)
            return Examples({"pixels": pixels}, torch.randint(0, 100, (n,), generator=generator))

        return TrainTestSplit(train=examples(4 * PAPER_CLIENT_SIZE + 100), test=examples(64), num_classes=100)

    def build_model(num_classes: int, sources) -> BuiltModel:
        network, targets, heads, _ = build()
        return BuiltModel(_ResizedImages(network, size), "swin-b (random init)", targets, tuple(f"network.{h}" for h in heads))

    if name not in TASKS.names():
        register_task(Task(name=name, description="random images, random-init Swin-B: for cost only", model_name="swin-b",
                           load_data=load_data, build_model=build_model, lora_targets=("attn.qkv", "attn.proj"),
                           validation_size=100, synthetic=True, images=True))
    return name


def paper_round_cost(device: torch.device, smoke: bool, deadline: float) -> list[dict[str, Any]]:
    task = paper_round_task(smoke)
    setting = {"task": task, "device": device.type, "clients": 4, "participation": 1.0, "rounds": 1,
               "local-steps": 2 if smoke else 20, "batch-size": 16, "rank": 16, "lora-alpha": 16.0}
    # The last case passes exactly the expected batch, so a Poisson batch over its mean takes a second pass
    # (the default physical batch on CUDA is twice the expected one, to avoid that).
    cases = [("dp-lora", 1.0, "on", 0), ("dp-lora", 1.0, "off", 0), ("dp-lora", math.inf, "on", 0),
             ("la-lora", 1.0, "on", 0), ("la-lora", math.inf, "on", 0), ("dp-lora", 1.0, "on", 4 * 16)]
    rows = []
    for method, eps, batching, physical in cases:
        if time.perf_counter() > deadline:
            break
        case = {"method": method, "eps": eps, "client_batching": batching, "physical_batch_size": physical or "auto"}
        # Its own folder: neither batching nor the physical batch is part of a run's identity
        out = os.path.join(out_dir(), "gpu-check-paper-round", f"{method}-eps{eps:g}-batching-{batching}-physical-{physical}")
        config = build_config({**setting, "method": method, "eps": eps, "client-batching": batching,
                               "physical-batch-size": physical, "out": out})
        try:
            last = run_federated(config).rows[-1]
        except UserError as error:  # e.g. a model client batching cannot take: say so, go on
            rows.append({**case, "error": str(error)})
            continue
        rows.append({**case, "train_seconds": last["train_seconds"], "peak_memory_mib": last["peak_memory_bytes"] / 2**20,
                     "clients_together": last["clients_together"]})
    return rows


def default_task_answer(device: torch.device, smoke: bool, deadline: float) -> list[dict[str, Any]]:
    """Every method's seed 0 first, then seeds 1 and 2, so that a time cap still leaves every method a run.
    Smoke: one method, one seed, one round of one step on 256 examples a client."""
    if not (images.FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        return [{"skipped": f"no Fashion-MNIST files in {images.FASHION_DIR}: run tools/prepare_device.sh and carry .device"}]
    suite = load_suite(DEFAULT_SUITE)
    cpu = {}
    for path in results_files(ROOT / suite.out):
        last = read_run(path).iloc[-1]
        cpu[(last["method"], int(last["seed"]))] = float(last["test_accuracy"])
    out = Path(out_dir()) / "gpu-check-fashion"
    points = sorted((c for c in suite.points if c.seed < 3), key=lambda c: c.seed)
    rows = []
    for config in points[:1] if smoke else points:
        if time.perf_counter() > deadline:
            break
        config = replace(config, device=device.type, out=str(out))
        if smoke:
            config = replace(config, federated=replace(config.federated, rounds=1, local_steps=1, client_size=256),
                             training=replace(config.training, batch_size=64))
        start = time.perf_counter()
        last = run_federated(config).rows[-1]
        rows.append({"method": config.method, "seed": config.seed, "test_accuracy": last["test_accuracy"],
                     "cpu_test_accuracy": math.nan if smoke else cpu.get((config.method, config.seed), math.nan),
                     "eps_spent": last["eps_spent"], "seconds": time.perf_counter() - start,
                     "peak_memory_mib": last["peak_memory_bytes"] / 2**20})
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def out_dir() -> str:
    return os.environ.get("OUT") or "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes, on the CPU: every part in about a minute")
    parser.add_argument("--minutes", type=float, default=7.0, help="stop starting new work after this long")
    parser.add_argument("--fashion-dir", type=Path, default=CARRIED_FASHION if CARRIED_FASHION.exists() else None,
                        help="the Fashion-MNIST IDX files (default: the carried .device/fashion-mnist, else the task's own)")
    args = parser.parse_args()
    if args.fashion_dir:
        images.FASHION_DIR = args.fashion_dir  # the real loader, reading the carried copy of the same files
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    started = time.perf_counter()
    budget = args.minutes * 60
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "smoke": args.smoke}
    report["every_method_round"] = every_method_round(str(device), started + 0.3 * budget)
    report["engine_against_autograd"] = engine_against_autograd(device)
    report["noise_on_both"] = noise_on_both(device)
    report["step_cost"] = step_cost(device, args.smoke, started + 0.45 * budget)
    report["paper_round_cost"] = paper_round_cost(device, args.smoke, started + 0.7 * budget)
    report["default_task_answer"] = default_task_answer(device, args.smoke, started + budget)
    report["seconds"] = time.perf_counter() - started
    for part in ("every_method_round", "engine_against_autograd", "step_cost", "paper_round_cost", "default_task_answer"):
        print(f"\n{part}:")
        for row in report[part]:
            print("  " + " · ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    print(f"\nnoise_on_both: {report['noise_on_both']}\ndevice {report['device']}, {report['seconds']:.0f} s")
    path = Path(out_dir()) / "gpu_check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
