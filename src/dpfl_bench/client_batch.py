"""A round's clients trained together: one pass of the frozen backbone over the examples of several clients,
each example routed through its own client's LoRA factors and head.

How. The clients' trainable tensors are stacked along a leading client axis ([C, rank, in] for A,
[C, out, rank] for B, the head likewise), and every trainable layer computes y_i = W[c_i] x_i (+ b[c_i])
for example i of client c_i: a gather of the client's weights, then one batched product. For LoRA the
gathered copies are rank-sized, and a gather keeps the physical batch one tensor, where grouping by client
would split every layer into C products of a few examples each. The layers keep their parameter names:
the stacks load from and write back to the same names as `TrainableParams`, so uploads, results and
checkpoints are unchanged.

Privacy is per example and per client as in `client.train_client`: the per-example engine sees the same
layer inputs and output gradients (an example's gradient touches only its client's factors), each example
is clipped to the norm of its whole gradient, and the clipped sums are added per client. Then, client by
client and in the same order as sequential training, the audit, the mechanism's noise (from that client's
own stream), the method's extra step and post-processing. AdamW (and SGD) are element-wise, so one
optimizer over the stacked tensors steps each client exactly as its own optimizer would.

What it covers: models whose trainable layers are linear layers or 1x1 convolutions (LoRA on linear layers
or pointwise convolutions, a linear head), and whose training pass is per example: an example's output,
dropout included, must not depend on the other examples of its pass (`example_draws` makes dropout, drop-
connect, stochastic depth and attention dropout per example). `uncovered` says why a model is not covered.
"""

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dpfl_bench.adapters import State
from dpfl_bench.client import ClientResult, RunContext, Workspace, make_optimizer, set_train_mode, with_memory_retries, zero_if_overflowed
from dpfl_bench.example_draws import ExampleDraws
from dpfl_bench.method import Factor
from dpfl_bench.precision import FP16_LOSS_SCALE, tensor_to_device
from dpfl_bench.privacy.per_example import clip_and_sum, is_pointwise
from dpfl_bench.privacy.randomness import Purpose
from dpfl_bench.tasks import Examples


def uncovered(ws: Workspace, sample: Examples) -> str | None:
    """Why these clients cannot train as one batch on this model, or None when they can."""
    trainable = {id(p) for p in ws.params.all().values()}
    for module in ws.model.modules():
        if any(id(p) in trainable for p in module.parameters(recurse=False)) and not _routable(module):
            return f"a trainable {type(module).__name__} layer (only linear layers and 1x1 convolutions are batched)"
    # The shortest and the longest example in one training pass must give what each gives alone (a layer that
    # mixes examples would not), and the pass must leave torch's generator untouched (a draw that
    # `ExampleDraws` does not make per example would not).
    order = sample.shortest_first(torch.arange(len(sample)))
    index = order[[0, -1]] if len(order) > 1 else order
    seeds = [11, 12][: len(index)]  # any fixed per-example seeds
    features, _ = sample.batch(index)
    modes = {m: m.training for m in ws.model.modules()}
    cuda = [ws.device] if ws.device.type == "cuda" else []
    try:
        set_train_mode(ws.model)
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            before = _generator_states(cuda)
            with ExampleDraws(seeds, sample.token_widths(features)):
                together = ws.model(**ws.to_device(features))
            drew_elsewhere = not all(map(torch.equal, _generator_states(cuda), before))
            alone = []
            for i, seed in enumerate(seeds):
                single, _ = sample.batch(index[i : i + 1])
                with ExampleDraws([seed], sample.token_widths(single)):
                    alone.append(ws.model(**ws.to_device(single)))
    finally:
        for module, training in modes.items():
            module.training = training
    difference = float((together - torch.cat(alone)).abs().max())
    if drew_elsewhere or not difference <= 1e-3 * float(together.abs().max()) + 1e-6:  # float rounding passes, NaN not
        return "a training pass that is not per example (a random draw or a layer mixes the examples of a pass)"
    return None


def _generator_states(cuda: list[torch.device]) -> list[torch.Tensor]:
    return [torch.random.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in cuda)]


def _routable(module: nn.Module) -> bool:
    """A layer `_routed` can replace: a pointwise layer of exactly nn.Linear or nn.Conv2d (a subclass may compute otherwise)."""
    return type(module) in (nn.Linear, nn.Conv2d) and is_pointwise(module)


@dataclass
class _Routing:
    """Which client each example of the current forward pass belongs to."""

    clients: torch.Tensor | None = None  # [examples], on the device


def train_clients(
    ws: Workspace, starts: list[State], data: list[Examples], run: RunContext, *, clients: list[int], round: int
) -> list[ClientResult]:
    """What `train_client` returns for each of `clients` (holding `data`, starting from `starts`), trained together."""
    config, method, mechanism, randomness, audit = run.config, run.method, run.mechanism, run.randomness, run.audit
    count = len(clients)
    steps = config.federated.local_steps
    batches = [mechanism.draw_batches(k, steps, randomness.stream(Purpose.BATCHES, round, k)) for k in clients]
    noises = [randomness.stream(Purpose.NOISE, round, k) for k in clients]
    merged, offsets = _merge(data)
    params = ws.params.all()
    stacks = {n: torch.stack([start[n].detach() for start in starts]) for n in params}
    stacked = _StackedParams(ws, {n: nn.Parameter(t) for n, t in stacks.items()})
    optimizer = make_optimizer(stacked, method, config, round)
    lr = config.training.lr_at(round)
    loss_sums, seen = torch.zeros(count, device=ws.device), [0] * count
    routing = _Routing()
    set_train_mode(ws.model)
    with _routed(ws.model, params, stacked.tensors, routing):
        for step in range(steps):
            factors = method.trains(round, step) | {Factor.HEAD}
            ws.params.set_trainable(factors)  # the per-example engine records the layers whose weights train
            stacked.set_trainable(factors)
            indexes = [own[step] for own in batches]
            seeds = [s for k, index in zip(clients, indexes) for s in randomness.example_seeds(round, k, step, len(index))]
            summed, step_losses = with_memory_retries(
                ws, lambda: _summed_by_client(ws, stacked, merged, offsets, indexes, seeds, mechanism.clip_examples, routing)
            )
            loss_sums += step_losses
            for c, (k, index) in enumerate(zip(clients, indexes)):
                own = {n: g[c] for n, g in summed.items()}
                own, canaries = audit.insert(k, round, own)
                grads = mechanism.privatize(own, len(index) + canaries, k, noises[c])
                audit.observe(k, grads)
                for factor in factors:
                    for name in ws.params.by_factor[factor]:
                        param = stacked.tensors[name]
                        extra = method.extra_step(factor, grads[name])
                        if extra is not None:
                            param.data[c].sub_(lr * extra.to(param.dtype))
                        if param.grad is None:
                            param.grad = torch.zeros_like(param)
                        param.grad[c] = method.postprocess(factor, grads[name]).to(param.dtype)
                seen[c] += len(index)
            optimizer.step()
            run.on_steps(count)
    uploaded = list(ws.params.of(method.uploads(round) | {Factor.HEAD}))
    totals = loss_sums.tolist()  # the one read from the device
    return [
        ClientResult({n: stacked.tensors[n].detach()[c].clone() for n in uploaded}, len(data[c]), totals[c] / max(seen[c], 1))
        for c in range(count)
    ]


class _StackedParams:
    """The clients' trainable tensors, stacked, grouped by factor as `TrainableParams` groups the model's."""

    def __init__(self, ws: Workspace, tensors: dict[str, nn.Parameter]) -> None:
        self.tensors = tensors
        self.by_factor = {f: {n: tensors[n] for n in params} for f, params in ws.params.by_factor.items()}

    def set_trainable(self, factors: frozenset[Factor]) -> None:
        for factor, params in self.by_factor.items():
            for param in params.values():
                param.requires_grad_(factor in factors)
                param.grad = None


def _merge(data: list[Examples]) -> tuple[Examples, list[int]]:
    """All clients' examples as one set (token features share the task's padded width), and where each starts."""
    merged = Examples(
        {k: torch.cat([d.features[k] for d in data]) for k in data[0].features}, torch.cat([d.labels for d in data])
    )
    offsets, start = [], 0
    for d in data:
        offsets.append(start)
        start += len(d)
    return merged, offsets


def _summed_by_client(
    ws: Workspace, stacked: _StackedParams, merged: Examples, offsets: list[int], indexes: list[torch.Tensor],
    seeds: list[int], clip: float | None, routing: _Routing,
) -> tuple[State, torch.Tensor]:
    """Per client, the sum over its batch of each example's gradient (clipped per example unless `clip` is
    None) as [clients, ...] tensors, and its summed loss; in physical chunks that mix clients. `seeds`: each
    example's dropout seed, clients in order."""
    count = len(indexes)
    scale = FP16_LOSS_SCALE if ws.precision == "fp16" else 1.0
    trainable = {n: p for n, p in stacked.tensors.items() if p.requires_grad}
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in trainable.items()}
    loss_sums = torch.zeros(count, device=ws.device)
    positions = torch.cat([index + offset for index, offset in zip(indexes, offsets)])
    owners = torch.cat([torch.full((len(index),), c) for c, index in enumerate(indexes)])
    order = merged.shortest_first(positions)  # passes of like lengths; each example keeps its client and seed
    positions, owners, seeds = positions[order], owners[order], [seeds[i] for i in order.tolist()]
    for start in range(0, len(positions), ws.physical_batch_size):
        chunk = positions[start : start + ws.physical_batch_size]
        features, labels = merged.batch(chunk)
        owner = tensor_to_device(owners[start : start + len(chunk)], ws.device)
        routing.clients = owner
        with ws.autocast(), ExampleDraws(seeds[start : start + len(chunk)], merged.token_widths(features)):
            logits = ws.model(**ws.to_device(features))
        losses = F.cross_entropy(logits.float(), tensor_to_device(labels, ws.device), reduction="none")
        loss_sums.index_add_(0, owner, losses.detach())
        if clip is not None:
            clipped, _ = clip_and_sum(ws.per_example.compute(losses, loss_scale=scale), clip, owner, count)
            for name, g in clipped.items():
                total[name] += g
        else:
            grads = [g.float() / scale for g in torch.autograd.grad(losses.sum() * scale, list(trainable.values()))]
            for name, g in zip(trainable, zero_if_overflowed(grads, per_client=True) if scale != 1.0 else grads):
                total[name] += g
    routing.clients = None
    return total, loss_sums


@contextlib.contextmanager
def _routed(model: nn.Module, params: dict[str, nn.Parameter], stacks: dict[str, nn.Parameter], routing: _Routing) -> Iterator[None]:
    """Every trainable layer of `model` computes with its example's client's weights while inside."""
    names = {id(p): n for n, p in params.items()}
    patched = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is not None and id(weight) in names:
            assert _routable(module), f"{module} cannot be routed (see uncovered)"
            bias = names.get(id(module.bias)) if module.bias is not None else None
            routed = _routed_conv if isinstance(module, nn.Conv2d) else _routed_linear
            module.forward = routed(stacks[names[id(weight)]], stacks[bias] if bias else None, routing)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # back to the class's own forward


def _routed_linear(weight: torch.Tensor, bias: torch.Tensor | None, routing: _Routing):
    def forward(x: torch.Tensor) -> torch.Tensor:
        owner = routing.clients
        if x.shape[0] != len(owner):  # batch-major leading dimensions (e.g. Swin's windows)
            owner = owner.repeat_interleave(x.shape[0] // len(owner))
        w = weight[owner].to(x.dtype)
        y = torch.einsum("n...i,noi->n...o", x, w)
        if bias is not None:
            y = y + bias[owner].to(y.dtype).view(len(owner), *[1] * (x.dim() - 2), -1)
        return y

    return forward


def _routed_conv(weight: torch.Tensor, bias: torch.Tensor | None, routing: _Routing):
    """A 1x1 convolution per client: one batched product over each example's pixels, [n, h*w, in] @ [n, in, out],
    whose result is laid out channels-last as the backbone's convolutions are."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        owner = routing.clients
        n, _, height, width = x.shape
        w = weight[owner].to(x.dtype).flatten(2)  # [n, out, in]
        y = torch.bmm(x.flatten(2).transpose(1, 2), w.transpose(1, 2))  # [n, h*w, out]
        y = y.view(n, height, width, -1).permute(0, 3, 1, 2)
        if bias is not None:
            y = y + bias[owner].to(y.dtype).view(n, -1, 1, 1)
        return y

    return forward
