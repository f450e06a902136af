"""What a task is: data, a pretrained model, and where LoRA goes.

A task is registered once with `register_task(Task(...))`. Its model maps a batch's features to logits,
`model(**features) -> Tensor[batch, classes]`, so the federated core never needs to know whether it is
training a text or an image model.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

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
class Task:
    name: str
    description: str
    model_name: str  # recorded with every result
    load_data: Callable[[], TaskData]  # a fixed, seeded train/test split
    build_model: Callable[[int], nn.Module]  # num_classes -> pretrained model, (**features) -> logits
    lora_targets: tuple[str, ...]  # module-name suffixes that get LoRA adapters
    head: str  # module name of the trainable classification head
    defaults: Mapping[str, Any] = field(default_factory=dict)  # flat options that suit this task
    synthetic: bool = False  # generated data and random weights: for tests, not for conclusions


TASKS: Registry[Task] = Registry("task")


def register_task(task: Task) -> Task:
    return TASKS.add(task.name, task)
