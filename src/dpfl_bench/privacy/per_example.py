"""Per-example gradients of the trainable LoRA factors and head, for DP-SGD.

Every trainable weight here lives in an `nn.Linear` (LoRA on linear layers, the head) or a 1x1 `nn.Conv2d`
(LoRA on pointwise convolutions). For such a layer y = W x, the gradient of example i's loss is
sum_t g_it x_it^T, with g = dL/dy over the t tokens or pixels of that example. So a forward hook keeps
each trainable layer's input and output; `torch.autograd.grad` then asks for dL/dy alone, which
backpropagates through the frozen network without ever forming the (summed) weight gradients.

Layers whose weight is frozen at this step record nothing: the alternating methods change the trainable
set every step or round, and nothing here needs re-wrapping when they do.

A layer may see its input with more leading dimensions than the batch, as long as they are batch-major:
Swin's window attention feeds `attn.qkv` with [batch * windows, tokens, features], the windows of example
0 first. Everything but the feature dimension then folds into the token dimension of the batch's examples.
A leading size that is not a multiple of the batch size cannot be attributed to examples and is refused.

Under fp16 the summed loss is multiplied by a constant before the backward pass (so small activation
gradients do not flush to zero in half precision) and the per-example gradients are divided by it in fp32.
An example whose gradient is not finite (an fp16 overflow) contributes zero: its contribution stays within
the clipping norm, so the sensitivity and the privacy accounting are unchanged, and no step is skipped or
retried depending on the data.
"""

from typing import TYPE_CHECKING, Callable, Hashable

import torch
import torch.nn.functional as F
from torch import nn

from dpfl_bench.errors import UserError
from dpfl_bench.precision import to_device

if TYPE_CHECKING:
    from dpfl_bench.adapters import TrainableParams
    from dpfl_bench.tasks import Examples

_PASSED: set[Hashable] = set()  # what built the models `check_per_example` passed in this process
PER_EXAMPLE_TOLERANCE = 1e-2  # of an example's gradient norm: how far a layer's per-example gradient may stray


class PerExampleGradients:
    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter]) -> None:
        names = {id(p): n for n, p in params.items()}
        self._layers: list[tuple[nn.Module, str, str | None]] = []  # layer, weight name, bias name
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if weight is None or id(weight) not in names:
                continue
            if not is_pointwise(module):
                raise TypeError(f"per-example gradients are not implemented for {module}")
            bias = getattr(module, "bias", None)
            self._layers.append((module, names[id(weight)], names.get(id(bias)) if bias is not None else None))
        self._records: list[tuple[nn.Module, str, str | None, torch.Tensor, torch.Tensor]] = []
        self._handles = [layer.register_forward_hook(self._make_hook(w, b)) for layer, w, b in self._layers]

    def _make_hook(self, weight_name: str, bias_name: str | None) -> Callable:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if module.weight.requires_grad and torch.is_grad_enabled():
                self._records.append((module, weight_name, bias_name, inputs[0].detach(), output))

        return hook

    def reset(self) -> None:
        """Forget the layers recorded since the last `compute` (a forward pass that was abandoned)."""
        self._records = []

    def compute(self, losses: torch.Tensor, loss_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Per-example gradients {name: [batch, *param.shape]} of `losses.sum()` for the layers used since
        the last call; `losses` holds one loss per example. The backward pass runs on `losses.sum() *
        loss_scale` and the result is divided by `loss_scale` in fp32."""
        records, self._records = self._records, []
        batch = len(losses)
        names = [r[1] for r in records]
        if len(set(names)) < len(names):  # norms per call would understate the example's true norm
            twice = sorted({n for n in names if names.count(n) > 1})
            raise RuntimeError(f"per-example clipping needs each trainable layer called once per forward: {twice}")
        outputs = [r[4] for r in records]
        grads_out = list(torch.autograd.grad(losses.sum() * loss_scale, outputs, allow_unused=True)) if outputs else []
        del outputs
        grads: dict[str, torch.Tensor] = {}
        # Layer by layer, each layer's input, output and output gradient are let go once used, so the
        # large activations do not all live until the last layer is done.
        for i in range(len(records)):
            (module, weight_name, bias_name, x, y), g = records[i], grads_out[i]
            records[i] = grads_out[i] = None
            g = torch.zeros_like(y) if g is None else g
            del y
            x = _tokens_last(module, x.float(), batch, weight_name)  # [batch, tokens, features]
            g = _tokens_last(module, g.float(), batch, weight_name) / loss_scale
            grads[weight_name] = torch.einsum("bto,bti->boi", g, x).reshape(batch, *module.weight.shape)
            if bias_name is not None and module.bias.requires_grad:
                grads[bias_name] = g.sum(dim=1)
            del x, g
        return grads

    def clipped_sum(self, losses: torch.Tensor, clip: float, loss_scale: float = 1.0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Σ_i clip(∇ loss_i): each example's whole gradient (all layers together) scaled to norm ≤ `clip`,
        then summed over examples. Returns the sums and the per-example norms before clipping.

        Per-example gradients of LoRA factors are small (rank × features each), so holding them for one
        physical batch costs little; it is the layers' inputs, outputs and output gradients that are large,
        and `compute` drops each layer's as soon as it has used them."""
        return clip_and_sum(self.compute(losses, loss_scale), clip)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def clip_and_sum(
    grads: dict[str, torch.Tensor], clip: float, owners: torch.Tensor | None = None, groups: int = 1
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Σ_i clip(g_i) over the leading (example) dimension; an example with a non-finite gradient counts 0.
    With `owners` (each example's group, e.g. its client), one sum per group: [groups, ...] tensors."""
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(dim=1) for g in grads.values()))
    finite = torch.isfinite(norms)
    scale = torch.where(finite, (clip / (norms + 1e-6)).clamp(max=1.0), 0.0)
    summed = {}
    for name, g in grads.items():  # 0 * inf is nan: zero the non-finite examples before scaling
        g = torch.where(finite.view(-1, *[1] * (g.dim() - 1)), g, 0.0)
        if owners is None:
            summed[name] = torch.einsum("b,b...->...", scale, g)
        else:
            scaled = g.float() * scale.view(-1, *[1] * (g.dim() - 1))
            summed[name] = torch.zeros(groups, *g.shape[1:], device=g.device).index_add_(0, owners, scaled)
    return summed, norms


def is_pointwise(module: nn.Module) -> bool:
    """A layer computing y = W x (+ b) per token or pixel: linear, or a 1x1 stride-1 unpadded convolution."""
    if isinstance(module, nn.Conv2d):
        return module.kernel_size == (1, 1) and module.stride == (1, 1) and module.padding == (0, 0) and module.groups == 1
    return isinstance(module, nn.Linear)


def _tokens_last(module: nn.Module, t: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """[batch, tokens, features], folding batch-major leading dimensions into tokens."""
    if isinstance(module, nn.Conv2d):  # [b, c, h, w] -> [b, h*w, c]
        t = t.flatten(2).transpose(1, 2)
    if batch == 0 or len(t) % batch:
        raise RuntimeError(f"per-example gradients: {name} got a leading dimension {len(t)}, not a multiple of the batch {batch}")
    return t.reshape(batch, -1, t.shape[-1])


def check_per_example(
    engine: PerExampleGradients, model: nn.Module, params: "TrainableParams", device: torch.device,
    train: "Examples", model_name: str, count: int = 3, cache_key: Hashable | None = None,
) -> None:
    """Refuse a model whose per-example gradients mix examples: a layer may see its batch in a layout the
    engine cannot tell apart from batch-major ([tokens, batch, features] with tokens a multiple of the
    batch), and clipping would then bound nothing. Per-example gradients of `count` training examples in
    one pass must equal those computed one example at a time, in fp32, with every factor trainable and
    LoRA B made nonzero (else A's gradients are zero). Parameters, trainable flags, module modes and the
    RNG states are restored, so the run is the same as without the check.

    With `cache_key` (what built the model: its builder, task, sources, adapters, device), a model that passed is not
    checked again in this process (a sweep's worker runs many points of one model). A model that failed is
    checked, and refused, every time."""
    from dpfl_bench.method import Factor

    if cache_key is not None and cache_key in _PASSED:
        return
    features, labels = train.batch(torch.arange(min(count, len(train))))

    state, trainable = params.state(), {n: p.requires_grad for n, p in params.all().items()}
    modes = {m: m.training for m in model.modules()}
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            params.set_trainable(frozenset(params.by_factor))
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in params.by_factor[Factor.B].values():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            model.eval()  # no dropout: one pass and the single passes compute the same function
            features, labels = to_device(features, device), labels.to(device)
            named = params.all()
            losses = F.cross_entropy(model(**features).float(), labels, reduction="none")
            try:
                batched = engine.compute(losses)
            except RuntimeError as e:
                raise UserError(f"per-example gradients of {model_name} cannot be computed ({e}); it cannot be trained "
                                "under sample-level DP; use --dp-level client") from None
            for i in range(len(labels)):
                loss = F.cross_entropy(model(**{k: v[i : i + 1] for k, v in features.items()}).float(), labels[i : i + 1])
                engine.reset()
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
        if cache_key is not None:
            _PASSED.add(cache_key)
    finally:
        engine.reset()
        params.load(state)
        for name, p in params.all().items():
            p.requires_grad_(trainable[name])
            p.grad = None
        for module, training in modes.items():
            module.training = training
