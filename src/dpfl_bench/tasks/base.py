"""What a task is: data, a pretrained model, and where LoRA goes.

A task is registered once with `register_task(Task(...))`. Its model maps a batch's features to logits,
`model(**features) -> Tensor[batch, classes]`, so the federated core never needs to know whether it is
training a text or an image model. Data and model are loaded through the run's `SourcesConfig` (hub or
local mirror); the built model says which of its modules get LoRA and which form the head, since that
depends on the architecture a user picked with `--model`.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from dpfl_bench.config import SourcesConfig
from dpfl_bench.errors import UserError
from dpfl_bench.registry import Registry


@dataclass(frozen=True)
class Examples:
    """Labelled examples held as tensors: `features[name][i]` and `labels[i]` belong to example i."""

    features: Mapping[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Examples":
        return Examples({k: v[index] for k, v in self.features.items()}, self.labels[index])

    def by_length(self) -> torch.Tensor:
        """An order of the examples from shortest to longest (token data), so batches carry little padding."""
        if "attention_mask" not in self.features:
            return torch.arange(len(self))
        return torch.argsort(self.features["attention_mask"].sum(dim=1), stable=True)

    def batch(self, index: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Features and labels of `index`; padded token sequences are cut to the batch's longest."""
        features = {k: v[index] for k, v in self.features.items()}
        if "attention_mask" in features and len(index) > 0:
            length = int(features["attention_mask"].sum(dim=1).max())
            features = {k: v[:, :length] if v.dim() == 2 else v for k, v in features.items()}
        return features, self.labels[index]


@dataclass(frozen=True)
class TaskData:
    train: Examples
    test: Examples
    num_classes: int


@dataclass(frozen=True)
class BuiltModel:
    module: nn.Module  # (**features) -> logits
    name: str  # the model actually used, recorded with every result
    lora_targets: tuple[str, ...]  # module-name suffixes that get LoRA adapters
    heads: tuple[str, ...]  # module names of the trainable classification head


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    model_name: str  # the default model, for listings
    load_data: Callable[[SourcesConfig], TaskData]  # a fixed, seeded train/test split
    build_model: Callable[[int, SourcesConfig], BuiltModel]  # num_classes -> pretrained model
    lora_targets: tuple[str, ...]  # the default model's LoRA targets, for listings
    defaults: Mapping[str, Any] = field(default_factory=dict)  # flat options that suit this task
    synthetic: bool = False  # generated data and random weights: for tests, not for conclusions


TASKS: Registry[Task] = Registry("task")


def register_task(task: Task) -> Task:
    return TASKS.add(task.name, task)


def refuse_sources(task: str, sources: SourcesConfig) -> None:
    """Built-in tasks bring their own data and weights: a --model or --data-dir for them is a mistake."""
    if sources.given:
        raise UserError(
            f"{', '.join(sources.given)} applies to the hub tasks (cifar10, sst2, ...; see `dpfl-bench tasks`), "
            f"not to {task}, which loads its own data and model; drop it"
        )
