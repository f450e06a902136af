"""LoRA adapters on a task's model (via peft), and the trainable parameters grouped by factor."""

from dataclasses import dataclass

import torch
from torch import nn

from dpfl_bench.config import AdapterConfig
from dpfl_bench.errors import UserError
from dpfl_bench.method import Factor

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


def add_lora(model: nn.Module, targets: tuple[str, ...], heads: tuple[str, ...], config: AdapterConfig) -> TrainableParams:
    """Inject LoRA (B zero-initialized, A random under the current torch seed) into `model`, in place.

    A target is a module-name suffix (`query` matches `...attention.self.query`); modules inside the head
    never get LoRA (a head's `dense` layer trains in full), so targets are resolved to full names here."""
    from peft import LoraConfig, inject_adapter_in_model


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
    by_factor: dict[Factor, dict[str, nn.Parameter]] = {f: {} for f in Factor}
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            by_factor[Factor.A][name] = param
        elif ".lora_B." in name:
            by_factor[Factor.B][name] = param
        elif in_head(name.rpartition(".")[0]):
            by_factor[Factor.HEAD][name] = param
        param.requires_grad_(False)
    return TrainableParams(by_factor)
