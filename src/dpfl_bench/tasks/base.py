"""What a task is: data, a pretrained model, and where LoRA goes.

A task is registered once with `register_task(Task(...))`. Its model maps a batch's features to logits,
`model(**features) -> Tensor[batch, classes]`, so the federated core never needs to know whether it is
training a text or an image model. Data and model are loaded through the run's `SourcesConfig` (hub or
local mirror); the built model says which of its modules get LoRA and which form the head, since that
depends on the architecture a user picked with `--model`.

A task's `load_data` returns its fixed train/test split; callers load through `Task.load`, which also
carves the task's validation split out of the training data, so no caller can train on it.

Registering and listing tasks imports no torch (`dpfl-bench tasks` answers at once): task modules import
it inside the functions that load data or build models, and their model classes live in `models.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from dpfl_bench.config import SourcesConfig
from dpfl_bench.errors import UserError
from dpfl_bench.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class Examples:
    """Labelled examples held as tensors: `features[name][i]` and `labels[i]` belong to example i."""

    features: Mapping[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> Examples:
        return Examples({k: v[index] for k, v in self.features.items()}, self.labels[index])

    def shortest_first(self, index: torch.Tensor) -> torch.Tensor:
        """An order of the positions of `index` from shortest to longest example (token data; else as they
        are), so that physical passes cut to their longest example carry little padding."""
        import torch

        if "attention_mask" not in self.features:
            return torch.arange(len(index))
        return torch.argsort(self.features["attention_mask"][index].sum(dim=1), stable=True)

    def batch(self, index: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Features and labels of `index`; padded token sequences are cut to the batch's longest."""
        features = {k: v[index] for k, v in self.features.items()}
        if "attention_mask" in features and len(index) > 0:
            length = int(features["attention_mask"].sum(dim=1).max())
            features = {k: v[:, :length] if v.dim() == 2 else v for k, v in features.items()}
        return features, self.labels[index]

    def token_widths(self, features: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
        """(cut, padded) token widths of `features` from `batch`; None for features without tokens."""
        if "attention_mask" not in features:
            return None
        return features["attention_mask"].shape[1], self.features["attention_mask"].shape[1]


@dataclass(frozen=True)
class TrainTestSplit:
    """What a task's `load_data` returns: its fixed train/test split, before the validation carve."""

    train: Examples
    test: Examples
    num_classes: int


@dataclass(frozen=True)
class TaskData:
    """What `Task.load` returns: `val` is carved out of the task's training data and never trained on."""

    train: Examples
    val: Examples
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
    load_data: Callable[[SourcesConfig], TrainTestSplit]  # a fixed, seeded train/test split; callers use `load`
    build_model: Callable[[int, SourcesConfig], BuiltModel]  # num_classes -> pretrained model
    lora_targets: tuple[str, ...]  # the default model's LoRA targets, for listings
    validation_size: int  # training examples held out for validation (at most a fifth of the training split)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # flat options that suit this task
    synthetic: bool = False  # generated data and random weights: for tests, not for conclusions
    images: bool = False  # its model takes images (and --center-crop applies)
    # The size of `load_data`'s training split, read without loading it (so `dpfl-bench privacy` need not)
    count_train: Callable[[SourcesConfig], int] | None = None

    def load(self, sources: SourcesConfig) -> TaskData:
        """The task's data with its validation split carved out of the training data: the same examples
        for every run and seed, so validation scores compare across runs, and none of them trained on.

        The last task loaded from its own files or the hub is kept in this process (nothing changes
        Examples in place), so a sweep's worker loads its data once; a --data-dir is read each time, since
        its files may change."""
        key = (self.name, sources)
        if key in _LOADED:
            return _LOADED[key]
        _LOADED.clear()  # before loading: never two tasks' data at once
        split = self.load_data(sources)
        train_index, val_index = validation_split(len(split.train), self.validation_size, self.name)
        data = TaskData(split.train.subset(train_index), split.train.subset(val_index), split.test, split.num_classes)
        if not sources.data_dir:
            _LOADED[key] = data
        return data

    def train_size(self, sources: SourcesConfig) -> int:
        """How many examples `load(sources).train` holds: counted without loading where the task can."""
        if self.count_train is None:
            return len(self.load(sources).train)
        total = self.count_train(sources)
        return total - held_out(total, self.validation_size, self.name)


_LOADED: dict[tuple[str, SourcesConfig], TaskData] = {}  # see Task.load


def resize_and_crop(images: torch.Tensor, size: tuple[int, int], center_crop: float) -> torch.Tensor:
    """Float images [batch, channels, H, W] resized (bilinear) to `size`, or with `center_crop` < 1 resized to
    size / center_crop and center-cropped to `size` (the authors' 256 then 224 is 0.875, timm's crop_pct)."""
    import torch.nn.functional as F

    if center_crop == 1:
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    larger = tuple(int(s / center_crop) for s in size)  # as torchvision's Resize(int(224 / 0.875)) = 256
    resized = F.interpolate(images, size=larger, mode="bilinear", align_corners=False)
    top, left = (larger[0] - size[0]) // 2, (larger[1] - size[1]) // 2
    return resized[:, :, top : top + size[0], left : left + size[1]]


VALIDATION_SEED = 20240601  # part of every task, independent of the run's --seed


def validation_split(num_train: int, size: int, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices into a training split of `num_train` examples, each in ascending order:
    `size` examples drawn with a fixed seed, or a fifth of the split if that is fewer (so a small local
    mirror of a hub dataset still leaves most of its examples to train on)."""
    count = held_out(num_train, size, task)
    import torch

    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(VALIDATION_SEED))
    return order[count:].sort().values, order[:count].sort().values


def held_out(num_train: int, size: int, task: str) -> int:
    """How many of `num_train` training examples `validation_split` holds out."""
    count = min(size, num_train // 5)
    if count < 1:
        raise UserError(
            f"{task}'s training split has {num_train} examples, too few to hold out a validation split; "
            "a task needs at least 5 training examples"
        )
    return count


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
