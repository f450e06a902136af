"""LoRA adapters on a task's model (via peft), and the trainable parameters grouped by factor."""

from dataclasses import dataclass

import torch
from torch import nn

from dpfl_bench.config import AdapterConfig
from dpfl_bench.errors import UserError
from dpfl_bench.method import Factor, Method

State = dict[str, torch.Tensor]  # parameter name -> value: what the server holds and clients send


@dataclass(frozen=True)
class TrainableParams:
    """The parameters that may ever train, by factor; everything else in the model stays frozen."""

    by_factor: dict[Factor, dict[str, nn.Parameter]]

    def of(self, factors: frozenset[Factor]) -> dict[str, nn.Parameter]:
        # In Factor's fixed order, not the set's: set order follows string hashes, which change from one
        # process to the next, and the order decides which parameter gets which noise draw.
        return {n: p for f in Factor if f in factors for n, p in self.by_factor[f].items()}

    def all(self) -> dict[str, nn.Parameter]:
        return self.of(frozenset(self.by_factor))

    def state(self) -> State:
        return {n: p.detach().clone() for n, p in self.all().items()}

    def load(self, state: State) -> None:
        with torch.no_grad():
            for name, param in self.all().items():
                param.copy_(state[name])

    def set_trainable(self, factors: frozenset[Factor]) -> None:
        for factor, params in self.by_factor.items():
            for param in params.values():
                param.requires_grad_(factor in factors)
                param.grad = None


ADAPTER = "default"  # peft's name for the one adapter


def add_lora(
    model: nn.Module, targets: tuple[str, ...], heads: tuple[str, ...], config: AdapterConfig, method: Method | None = None
) -> TrainableParams:
    """Inject LoRA into `model`, in place: B zero-initialized, A random under the current torch seed, then
    with `method`, the middle factor R if it asks for one and its factors as its `initialize` sets them.

    A target is a module-name suffix (`query` matches `...attention.self.query`); modules inside the head
    never get LoRA (a head's `dense` layer trains in full), so targets are resolved to full names here."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    def in_head(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in heads)

    chosen = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not in_head(name)
        and any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not chosen:
        raise UserError(f"no linear or convolution layer of the model matches the LoRA targets {','.join(targets)}; set --lora-targets")
    missing = [h for h in heads if h not in dict(model.named_modules())]
    if missing:
        raise UserError(f"the model has no head module {', '.join(missing)}; check the task's names")
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=chosen)
    inject_adapter_in_model(lora, model)
    if method is not None:
        for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
            if Factor.R in method.factors:
                add_middle_factor(layer)
            initialize(layer, method)
    by_factor: dict[Factor, dict[str, nn.Parameter]] = {f: {} for f in Factor}
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            by_factor[Factor.A][name] = param
        elif ".lora_B." in name:
            by_factor[Factor.B][name] = param
        elif ".lora_R." in name:
            by_factor[Factor.R][name] = param
        elif in_head(name.rpartition(".")[0]):
            by_factor[Factor.HEAD][name] = param
        param.requires_grad_(False)
    return TrainableParams(by_factor)


def add_middle_factor(layer: nn.Module) -> None:
    """An r×r factor R between peft's A and B (`lora_R`, zero), so the layer computes W x + s·B·R·A x: a
    pointwise layer like A and B, which the per-example engine and client batching already handle."""
    down, up = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    rank = down.weight.shape[0]
    middle = nn.Conv2d(rank, rank, 1, bias=False) if isinstance(down, nn.Conv2d) else nn.Linear(rank, rank, bias=False)
    nn.init.zeros_(middle.weight)
    layer.lora_R = nn.ModuleDict({ADAPTER: middle.to(down.weight.device, down.weight.dtype)})
    # peft computes B(A(x)); B's input goes through R first. A pre-hook, so B's own forward hooks (the
    # per-example engine's) see the input B really multiplies.
    up.register_forward_pre_hook(lambda module, args: (middle(args[0]),))


def initialize(layer: nn.Module, method: Method) -> None:
    """The layer's factors as `method.initialize` sets them from its frozen weight."""
    factors = {Factor.A: layer.lora_A[ADAPTER].weight, Factor.B: layer.lora_B[ADAPTER].weight}
    if hasattr(layer, "lora_R"):
        factors[Factor.R] = layer.lora_R[ADAPTER].weight
    weight = layer.get_base_layer().weight.detach().flatten(1)
    start = method.initialize(weight, {f: p.detach().flatten(1) for f, p in factors.items()})
    with torch.no_grad():
        for factor, param in factors.items():
            param.copy_(start[factor].reshape(param.shape))
