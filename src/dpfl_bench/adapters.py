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


def add_lora(model: nn.Module, targets: tuple[str, ...], head: str, config: AdapterConfig) -> TrainableParams:
    """Inject LoRA (B zero-initialized, A random under the current torch seed) into `model`, in place."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=list(targets))
    inject_adapter_in_model(lora, model)
    by_factor: dict[Factor, dict[str, nn.Parameter]] = {f: {} for f in Factor}
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            by_factor[Factor.A][name] = param
        elif ".lora_B." in name:
            by_factor[Factor.B][name] = param
        elif name.startswith(head + "."):
            by_factor[Factor.HEAD][name] = param
        param.requires_grad_(False)
    if not by_factor[Factor.A] or not by_factor[Factor.HEAD]:
        raise UserError(f"no LoRA target {targets} or head {head!r} found in the model; check the task's names")
    return TrainableParams(by_factor)
