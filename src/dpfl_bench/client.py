"""One client's local training for one round.

`train_client` is a pure function of (the state it starts from, client id, round) and the run's fixed setup: its
batches, noise and dropout come from the run's streams for (round, client), so a client can be run
anywhere and in any order and still upload the same tensors (with `--rng seeded`). How batches are drawn
and how a step's gradient sum is privatized is the privacy mechanism's business; which factors train
and how their gradients are post-processed, the method's.
"""

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from dpfl_bench.adapters import State, TrainableParams
from dpfl_bench.config import RunConfig
from dpfl_bench.example_draws import ExampleDraws
from dpfl_bench.method import Factor, Method
from dpfl_bench.precision import FP16_LOSS_SCALE, autocast, tensor_to_device, to_device
from dpfl_bench.privacy.canaries import NoAudit
from dpfl_bench.privacy.mechanism import Mechanism
from dpfl_bench.privacy.per_example import PerExampleGradients
from dpfl_bench.privacy.randomness import Purpose, Randomness
from dpfl_bench.tasks import Examples


@dataclass
class Workspace:
    """The parts a client trains with: the model (with LoRA) on its device, and how to read it."""

    model: nn.Module
    params: TrainableParams
    device: torch.device
    per_example: PerExampleGradients | None  # present when the mechanism clips per example
    physical_batch_size: int  # examples per forward pass; halved for good when CUDA runs out of memory
    precision: str = "fp32"  # autocast dtype of the forward pass

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def to_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return to_device(tensors, self.device)


@dataclass(frozen=True)
class ClientResult:
    upload: State  # the factors the method sends, and the head (sent unless --head keeps it), after local training
    num_examples: int
    train_loss: float  # mean loss over the examples seen this round


@dataclass(frozen=True)
class RunContext:
    """What every client round of a run trains with besides the model, in one place: a new concern that
    client training needs is added here and nowhere else on its way down from the run."""

    config: RunConfig
    method: Method
    mechanism: Mechanism  # calibrated for the run's schedule
    randomness: Randomness
    audit: NoAudit = NoAudit()
    on_steps: Callable[[int], None] = lambda count: None  # told of every `count` client-steps done (progress)


def train_client(ws: Workspace, start: State, data: Examples, run: RunContext, *, client: int, round: int) -> ClientResult:
    """Client `client`'s local training at round `round`, from `start`, on its `data`."""
    config, method, mechanism, randomness, audit = run.config, run.method, run.mechanism, run.randomness, run.audit
    torch.manual_seed(randomness.torch_seed(Purpose.DROPOUT, round, client))  # draws not made per example (example_draws)
    batches = mechanism.draw_batches(client, config.federated.local_steps, randomness.stream(Purpose.BATCHES, round, client))
    noise = randomness.stream(Purpose.NOISE, round, client)
    ws.params.load(start)
    set_train_mode(ws.model)
    optimizer = make_optimizer(ws.params, method, config, round)
    lr = config.training.lr_at(round)
    loss_sum, seen = torch.zeros((), device=ws.device), 0  # on the device: read once, after the last step
    for step in range(config.federated.local_steps):
        factors = method.trains(round, step) | {Factor.HEAD}
        ws.params.set_trainable(factors)
        index = batches[step]
        seeds = randomness.example_seeds(round, client, step, len(index))
        summed, batch_loss = summed_gradients(ws, data, index, mechanism.clip_examples, seeds)
        summed, canaries = audit.insert(client, round, summed)  # inserted canaries enter the sum before the noise
        grads = mechanism.privatize(summed, len(index) + canaries, client, noise)
        audit.observe(client, grads)
        for factor in factors:
            for name, param in ws.params.by_factor[factor].items():
                extra = method.extra_step(factor, grads[name])
                if extra is not None:
                    param.data.sub_(lr * extra.to(param.dtype))
                param.grad = method.postprocess(factor, grads[name]).to(param.dtype)
        optimizer.step()
        loss_sum, seen = loss_sum + batch_loss, seen + len(index)
        run.on_steps(1)
    uploaded = method.uploads(round) | {Factor.HEAD}
    upload = {n: p.detach().clone() for n, p in ws.params.of(uploaded).items()}
    return ClientResult(upload, len(data), float(loss_sum) / max(seen, 1))


def summed_gradients(
    ws: Workspace, data: Examples, index: torch.Tensor, clip: float | None, seeds: list[int]
) -> tuple[State, torch.Tensor]:
    """Sum over the batch of each example's gradient (clipped to `clip` per example, unless None), and the
    summed loss (a tensor on the device: reading it would wait for the device). Example i's dropout draws
    come from `seeds[i]` (see `example_draws`). The batch is processed in
    physical chunks, so memory does not grow with its size. When CUDA runs out of memory, the chunks are
    halved and the whole batch is recomputed: the batch (drawn before) and its sum are the same, so the
    privacy accounting is too."""
    return with_memory_retries(ws, lambda: _summed_in_chunks(ws, data, index, clip, seeds))


T = TypeVar("T")


def with_memory_retries(ws: Workspace, compute: Callable[[], T]) -> T:
    """`compute()`, again with half the physical batch each time CUDA runs out of memory."""
    # The failed attempt may have drawn from torch's generator (a draw `example_draws` does not make per
    # example): the retry starts from the same RNG states, so the run stays a pure function of the seed.
    cpu_rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(ws.device) if ws.device.type == "cuda" else None
    while True:
        try:
            return compute()
        except torch.cuda.OutOfMemoryError:
            if ws.physical_batch_size == 1:
                raise
            if ws.per_example is not None:
                ws.per_example.reset()
            torch.random.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, ws.device)
            ws.physical_batch_size //= 2
            if ws.device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(ws.device)  # the failed attempt's peak was the whole card
            warnings.warn(f"CUDA out of memory: physical batch size lowered to {ws.physical_batch_size}", stacklevel=2)


def _summed_in_chunks(
    ws: Workspace, data: Examples, index: torch.Tensor, clip: float | None, seeds: list[int]
) -> tuple[State, torch.Tensor]:
    # Nothing here reads a value back from the device: on a GPU the chunks queue up without waiting.
    trainable = {n: p for n, p in ws.params.all().items() if p.requires_grad}
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in trainable.items()}
    scale = FP16_LOSS_SCALE if ws.precision == "fp16" else 1.0
    loss_sum = torch.zeros((), device=ws.device)
    order = data.shortest_first(index)  # the sum does not depend on the order; each example keeps its seed
    index, seeds = index[order], [seeds[i] for i in order.tolist()]
    for start in range(0, len(index), ws.physical_batch_size):  # none for an empty Poisson batch: noise alone
        chunk = index[start : start + ws.physical_batch_size]
        features, labels = data.batch(chunk)
        with ws.autocast(), ExampleDraws(seeds[start : start + len(chunk)], data.token_widths(features)):
            logits = ws.model(**ws.to_device(features))
        losses = F.cross_entropy(logits.float(), tensor_to_device(labels, ws.device), reduction="none")
        loss_sum += losses.detach().sum()
        if clip is not None:
            clipped, _ = ws.per_example.clipped_sum(losses, clip, loss_scale=scale)
            grads = [clipped[n] for n in trainable]
        else:
            grads = [g.float() / scale for g in torch.autograd.grad(losses.sum() * scale, list(trainable.values()))]
            if scale != 1.0:
                grads = zero_if_overflowed(grads)
        for name, g in zip(trainable, grads):
            total[name] += g.float()
    return total, loss_sum


def zero_if_overflowed(grads: list[torch.Tensor], per_client: bool = False) -> list[torch.Tensor]:
    """An fp16 overflow anywhere: the chunk contributes nothing; with `per_client` (the leading dimension is
    the clients of a batched pass), nothing for the clients it overflowed for. Decided on the device,
    without a sync."""
    if per_client:
        finite = torch.stack([torch.isfinite(g).flatten(1).all(dim=1) for g in grads]).all(dim=0)
        return [torch.where(finite.view(-1, *[1] * (g.dim() - 1)), g, 0.0) for g in grads]
    finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
    return [torch.where(finite, g, 0.0) for g in grads]


def make_optimizer(params: TrainableParams, method: Method, config: RunConfig, round: int) -> torch.optim.Optimizer:
    """A fresh optimizer for one client-round, one parameter group per factor (for its lr multiplier),
    at the round's learning rate."""
    training = config.training
    lr = training.lr_at(round)
    groups = [
        {"params": list(p.values()), "lr": lr * (1.0 if f is Factor.HEAD else method.lr_multiplier(f))}
        for f, p in params.by_factor.items()
        if p
    ]
    if training.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=training.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=training.weight_decay)


def set_train_mode(model: nn.Module) -> None:
    """Train mode, but BatchNorm stays in eval mode: batch statistics would mix examples."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
