"""The federated core: sample clients -> local training -> aggregate -> evaluate -> record.

It knows nothing of any particular method: a method only answers the questions in `dpfl_bench.method`.
"""

import hashlib
import json
import math
import os
import resource
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dpfl_bench
from dpfl_bench.adapters import add_lora
from dpfl_bench.client import ClientResult, Workspace, train_client
from dpfl_bench.config import RunConfig
from dpfl_bench.errors import UserError
from dpfl_bench.method import Factor, Method, create_method
from dpfl_bench.partition import dirichlet_partition, iid_partition, participation_schedule
from dpfl_bench.precision import autocast, to_device
from dpfl_bench.privacy.per_example import PerExampleGradients
from dpfl_bench.privacy.plan import PrivacyPlan, plan_privacy
from dpfl_bench.results import write_rows
from dpfl_bench.server import aggregate, aggregate_private
from dpfl_bench.tasks import TASKS, Examples, Task, TaskData

EVAL_BATCH_SIZE = 256
PER_EXAMPLE_TOLERANCE = 1e-2  # of an example's gradient norm: how far a layer's per-example gradient may stray


@dataclass(frozen=True)
class RunSummary:
    path: Path
    rows: list[dict[str, Any]]
    plan: PrivacyPlan


def run_id(config: RunConfig) -> str:
    """Readable, and the same for the same configuration wherever its results are written and however
    many workers load its data (neither changes a result)."""
    identity = {k: v for k, v in json.loads(config.to_json()).items() if k != "out"}
    identity["sources"] = {k: v for k, v in identity["sources"].items() if k != "workers"}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return f"{config.task}_{config.method}_eps{config.privacy.eps:g}_seed{config.seed}_{digest}"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def check_precision(device: torch.device, precision: str) -> None:
    """Refuse a precision the device cannot autocast to, before anything is loaded."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16 needs a GPU with bfloat16 support (Ampere or newer); use fp16 or fp32")
    if precision == "fp16" and device.type == "cpu":
        try:
            with autocast(device, precision):
                nn.Linear(2, 2)(torch.ones(1, 2)).sum().backward()
        except RuntimeError:
            raise UserError("--precision fp16 is not supported on CPU by this torch; use bf16 or fp32") from None


@dataclass(frozen=True)
class Experiment:
    """Everything a run trains with, fixed before its first round."""

    config: RunConfig
    task: Task
    method: Method
    data: TaskData
    model_name: str  # the model actually used
    clients: list[Examples]  # each client's private training data
    schedule: list[list[int]]  # the clients that take part in each round
    plan: PrivacyPlan
    workspace: Workspace


def prepare(config: RunConfig) -> Experiment:
    """Load data and model, split the data, draw the participation schedule and calibrate the noise."""
    task = TASKS.get(config.task)
    method = create_method(config.method, config.method_options)
    fed, device = config.federated, resolve_device(config.device)
    client_level = config.privacy.private and config.privacy.dp_level == "client"
    if client_level and fed.weighting != "uniform":
        raise UserError("client-level DP needs uniform FedAvg weights; drop --weighting size")

    check_precision(device, config.training.precision)
    data = task.load_data(config.sources)
    clients = [data.train.subset(torch.from_numpy(idx)) for idx in partition(data.train, config)]
    schedule = participation_schedule(fed.clients, fed.participation, fed.rounds, seed=config.seed, poisson=client_level)
    plan = plan_privacy(config, [len(c) for c in clients], schedule)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(config.seed)  # the head's and LoRA A's initial values are part of the run
    built = task.build_model(data.num_classes, config.sources)
    model = built.module.to(device)  # move first, then add adapters (Opacus issue 820)
    params = add_lora(model, config.adapter.targets or built.lora_targets, built.heads, config.adapter)
    workspace = Workspace(
        model=model,
        params=params,
        device=device,
        per_example=PerExampleGradients(model, params.all()) if plan.level == "sample" else None,
        physical_batch_size=config.training.physical_batch_size,
        precision=config.training.precision,
    )
    if workspace.per_example is not None:
        check_per_example(workspace, data.train, built.name)
    return Experiment(config, task, method, data, built.name, clients, schedule, plan, workspace)


def check_per_example(ws: Workspace, train: Examples, model_name: str, count: int = 3) -> None:
    """Refuse a model whose per-example gradients mix examples: a layer may see its batch in a layout the
    engine cannot tell apart from batch-major ([tokens, batch, features] with tokens a multiple of the
    batch), and clipping would then bound nothing. Per-example gradients of `count` training examples in
    one pass must equal those computed one example at a time, in fp32, with every factor trainable and
    LoRA B made nonzero (else A's gradients are zero). Parameters, trainable flags, module modes and the
    RNG states are restored, so the run is the same as without the check."""
    params, model = ws.params, ws.model
    state, trainable = params.state(), {n: p.requires_grad for n, p in params.all().items()}
    modes = {m: m.training for m in model.modules()}
    devices = [ws.device] if ws.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            params.set_trainable(frozenset(params.by_factor))
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in params.by_factor[Factor.B].values():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            model.eval()  # no dropout: one pass and the single passes compute the same function
            features, labels = train.batch(torch.arange(min(count, len(train))))
            features, labels = to_device(features, ws.device), labels.to(ws.device)
            named = params.all()
            losses = F.cross_entropy(model(**features).float(), labels, reduction="none")
            try:
                batched = ws.per_example.compute(losses)
            except RuntimeError as e:
                raise UserError(f"per-example gradients of {model_name} cannot be computed ({e}); it cannot be trained "
                                "under sample-level DP; use --dp-level client") from None
            for i in range(len(labels)):
                loss = F.cross_entropy(model(**{k: v[i : i + 1] for k, v in features.items()}).float(), labels[i : i + 1])
                ws.per_example.reset()
                single = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
                single = [torch.zeros_like(p) if g is None else g.float() for p, g in zip(named.values(), single)]
                # Measured against the example's whole gradient (what clipping bounds), not the layer's own:
                # a layer whose gradient nearly cancels has a large relative rounding error (1% seen on
                # EfficientNet-Lite0 between batch sizes 3 and 1, TF32 convolutions on GPUs add more),
                # while mixing examples moves a layer by a sizeable part of the whole.
                tolerance = PER_EXAMPLE_TOLERANCE * float(torch.sqrt(sum(g.pow(2).sum() for g in single))) + 1e-6
                for name, g in zip(named, single):
                    mine = batched[name][i] if name in batched else torch.zeros_like(g)
                    if float((mine - g).norm()) > tolerance:
                        raise UserError(f"per-example gradients of {model_name} are not per example (layer {name}); it "
                                        "cannot be trained under sample-level DP; use --dp-level client")
    finally:
        ws.per_example.reset()
        params.load(state)
        for name, p in params.all().items():
            p.requires_grad_(trainable[name])
            p.grad = None
        for module, training in modes.items():
            module.training = training


def run_federated(
    config: RunConfig, *, on_round: Callable[[int, dict[str, Any] | None], None] = lambda r, row: None
) -> RunSummary:
    """Run one configuration to the end, writing its results file after every evaluation."""
    started = time.perf_counter()
    out = writable_folder(Path(config.out)) / f"{run_id(config)}.parquet"  # fail before training, not after
    exp = prepare(config)
    task, method, data, clients, plan, ws = exp.task, exp.method, exp.data, exp.clients, exp.plan, exp.workspace
    fed, params = config.federated, ws.params
    client_level = plan.level == "client"
    global_state = params.state()
    server_seed = int(np.random.SeedSequence([config.seed, 3]).generate_state(1)[0])
    noise = torch.Generator().manual_seed(server_seed)  # client-level DP noise, drawn by the server
    mechanisms_run = [0] * (1 if client_level else fed.clients)
    client_data = json.dumps(
        [
            {"examples": len(c), "labels": torch.bincount(c.labels, minlength=data.num_classes).tolist()}
            | ({"sample_rate": plan.sample_rates[k]} if plan.level == "sample" else {})
            for k, c in enumerate(clients)
        ]
    )
    rows: list[dict[str, Any]] = []
    train_seconds, bytes_uploaded = 0.0, 0

    for round, chosen in enumerate(exp.schedule):
        round_started = time.perf_counter()
        results: list[ClientResult] = [
            train_client(ws, global_state, clients[k], client=k, round=round, method=method, config=config, plan=plan)
            for k in chosen
        ]
        uploads = [r.upload for r in results]
        if client_level:
            global_state = aggregate_private(
                global_state,
                uploads,
                names=list(params.of(method.uploads(round) | {Factor.HEAD})),
                clip=plan.clip,
                noise_multiplier=plan.noise_multiplier,
                expected_clients=fed.participation * fed.clients,
                generator=noise,
            )
        else:
            weights = [1.0 if fed.weighting == "uniform" else r.num_examples for r in results]
            global_state = aggregate(global_state, uploads, weights)
        train_seconds += time.perf_counter() - round_started
        bytes_uploaded += sum(t.numel() * t.element_size() for r in results for t in r.upload.values())
        if plan.level == "sample":  # each local step is one subsampled Gaussian mechanism on the client's data
            for k in chosen:
                mechanisms_run[k] += fed.local_steps
        elif client_level:
            mechanisms_run[0] += 1

        row = None
        if (round + 1) % config.training.eval_every == 0 or round + 1 == fed.rounds:
            params.load(global_state)
            accuracy, loss = evaluate(ws.model, data.test, ws.device, ws.precision)
            spent = plan.spent(mechanisms_run)
            row = {
                "run_id": out.stem,
                "task": task.name,
                "model": exp.model_name,
                "method": method.name,
                "dp_level": plan.level,
                "eps_target": config.privacy.eps,
                "delta": config.privacy.delta,
                "noise_multiplier": plan.noise_multiplier,
                "clip": plan.clip,
                "eps_spent": max(spent),
                "eps_spent_mean": float(np.mean(spent)),
                "round": round + 1,
                "rounds_total": fed.rounds,
                "test_accuracy": accuracy,
                "test_loss": loss,
                "train_loss": float(np.mean([r.train_loss for r in results])) if results else math.nan,
                "wall_seconds": time.perf_counter() - started,
                "train_seconds": train_seconds,
                "peak_memory_bytes": peak_memory_bytes(ws.device),
                "bytes_uploaded_per_round": bytes_uploaded / (round + 1),
                "seed": config.seed,
                "config_json": config.to_json(),
                "client_data_json": client_data,
                **versions(),
            }
            rows.append(row)
            write_rows(rows, out)
        on_round(round + 1, row)
    if ws.per_example is not None:
        ws.per_example.remove()
    return RunSummary(out, rows, plan)


def writable_folder(folder: Path, option: str = "--out") -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{option} {folder} cannot be created: {e.strerror}; choose another folder") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"{option} {folder} is not writable; choose another folder")
    return folder


def partition(train: Examples, config: RunConfig) -> list[np.ndarray]:
    fed = config.federated
    if fed.partition == "iid":
        return iid_partition(len(train), fed.clients, seed=config.seed)
    return dirichlet_partition(
        train.labels.numpy(), fed.clients, alpha=fed.dirichlet_alpha, min_size=fed.min_partition_size, seed=config.seed
    )


@torch.no_grad()
def evaluate(model: nn.Module, test: Examples, device: torch.device, precision: str = "fp32") -> tuple[float, float]:
    """Accuracy and mean cross-entropy of `model` on `test`."""
    model.eval()
    correct, loss = 0, 0.0
    for chunk in test.by_length().split(EVAL_BATCH_SIZE):
        features, labels = test.batch(chunk)
        with autocast(device, precision):
            logits = model(**to_device(features, device))
        labels = labels.to(device)
        correct += int((logits.argmax(dim=1) == labels).sum())
        loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
    return correct / len(test), loss / len(test)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def versions() -> dict[str, str]:
    return {
        "dpfl_bench_version": dpfl_bench.__version__,
        **{f"{pkg}_version": version(pkg) for pkg in ("torch", "peft", "opacus", "transformers")},
    }
