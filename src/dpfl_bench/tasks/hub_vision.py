"""`cifar10`, `cifar100`, `tiny-imagenet`: the paper's vision tasks, with a timm backbone at 224 px.

Images are decoded once at load (`--workers` processes) and kept in memory as uint8 at their native size
(CIFAR 32 px, Tiny-ImageNet 64 px); the model wrapper resizes and normalizes them on the device, with the
backbone's own input size, mean and std. A per-batch CPU transform pipeline (PIL resize to 224, to tensor,
normalize) in DataLoader workers costs far more than one interpolation on the GPU, and keeps 16x more
bytes per image in flight.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dpfl_bench.config import SourcesConfig
from dpfl_bench.errors import UserError
from dpfl_bench.tasks.base import BuiltModel, Examples, Task, TrainTestSplit, register_task
from dpfl_bench.tasks.hub import column_of, from_hub, load_splits, lora_targets_for, parse_model, split_of

if TYPE_CHECKING:
    from torch import nn

DEFAULT_MODEL = "timm:swin_base_patch4_window7_224.ms_in22k"  # the paper's Swin-B, ImageNet-22k weights
TEST_SPLITS = ("test", "validation", "valid", "val")
VALIDATION_SIZE = 5000  # held out of the training split (see Task.load)


@dataclass(frozen=True)
class VisionData:
    hub_id: str
    image: str  # column names on the hub
    label: str
    test_split: str
    size: int  # native resolution, kept in memory
    num_classes: int  # a mirror with another class count is another dataset


def decode(split: object, image: str, label: str, size: int, workers: int) -> Examples:
    """Images as uint8 [n, size, size, 3] (converted to RGB, resized if a mirror's differ) and labels."""
    import datasets
    import torch

    def to_bytes(batch: dict) -> dict:
        images = [im if im.size == (size, size) else im.resize((size, size)) for im in batch[image]]
        return {"pixels": [np.asarray(im, dtype=np.uint8).tobytes() for im in images], "labels": batch[label]}

    # Raw bytes, not an Array3D column: datasets widens uint8 arrays to int64 on the way out (8x the memory).
    features = datasets.Features({"pixels": datasets.Value("binary"), "labels": datasets.Value("int64")})
    table = split.cast_column(image, datasets.Image(mode="RGB")).map(
        to_bytes, batched=True, num_proc=workers or None, remove_columns=split.column_names,
        features=features, keep_in_memory=True, desc="decoding images",  # no cache files in a read-only mirror
    ).with_format("arrow")[:]
    pixels = np.frombuffer(bytearray().join(table["pixels"].to_pylist()), dtype=np.uint8)
    labels = torch.from_numpy(table["labels"].to_numpy().copy())  # arrow memory is read-only
    return Examples({"pixels": torch.from_numpy(pixels).view(-1, size, size, 3)}, labels)


def num_classes_of(split: object, label: str) -> int:
    feature = split.features[label]
    return feature.num_classes if hasattr(feature, "num_classes") else int(max(split[label])) + 1


def check_timm(name: str) -> None:
    import timm

    if not timm.is_model(name):
        raise UserError(f"timm has no model {name!r}; `timm.list_models()` lists them")


def head_names(network: "nn.Module") -> tuple[str, ...]:
    """The classifier module names of a timm model: one name, or several (distilled DeiT: head, head_dist)."""
    classifier = network.pretrained_cfg.get("classifier") or "head"
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def build_timm(name: str, num_classes: int, model_path: str) -> "nn.Module":
    """A timm model with pretrained weights (hub, or a checkpoint file) and a fresh head for `num_classes`:
    the head is re-initialized even when the pretrained one has the task's shape (it may be fine-tuned)."""
    import timm

    check_timm(name)
    if model_path:
        network = timm.create_model(name, pretrained=False, num_classes=num_classes)
        load_backbone(network, name, model_path)
    else:
        hint = (
            f"on a machine with the hub run `python -c \"import timm, torch; torch.save(timm.create_model('{name}', "
            f"pretrained=True).state_dict(), 'weights.pth')\"`, copy the file here and pass --model-path weights.pth"
        )
        network = from_hub(f"model timm:{name}", lambda: timm.create_model(name, pretrained=True, num_classes=num_classes), hint)
    network.reset_classifier(num_classes)  # under the run's seed, set before the model is built
    return network


def load_backbone(network: "nn.Module", name: str, model_path: str) -> None:
    """Load a timm checkpoint file (a state_dict, or one wrapped in 'state_dict'/'model') into everything but
    the head. Every key outside the head must match: a partial or foreign checkpoint would otherwise leave
    a random backbone behind a run that looks pretrained."""
    from timm.models import load_state_dict

    heads = head_names(network)

    def in_head(key: str) -> bool:
        return any(key.startswith(h + ".") for h in heads)

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    try:
        state = {k: v for k, v in load_state_dict(model_path).items() if not in_head(k)}
        result = network.load_state_dict(state, strict=False)
    except Exception as e:  # not a checkpoint, or one of another architecture or size
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model-path {model_path} does not fit timm:{name}: {why}") from None
    missing = [k for k in result.missing_keys if not in_head(k)]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        found = "; ".join(f"{what} {few(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
        raise UserError(f"--model-path {model_path} does not fit timm:{name}: {found}; save the model's own state_dict()")


def vision_task(name: str, data: VisionData, description: str, defaults: dict) -> Task:
    def timm_name(sources: SourcesConfig) -> str:
        kind, model = parse_model(sources.model, DEFAULT_MODEL)
        if kind != "timm":
            raise UserError(f"{name} takes timm backbones: --model timm:<name>, e.g. timm:vit_base_patch16_224")
        return model

    def load_data(sources: SourcesConfig) -> TrainTestSplit:
        check_timm(timm_name(sources))  # before the slow part
        splits = load_splits(data.hub_id, None, sources, "image")
        train = split_of(splits, ("train",), sources.data_dir)
        test = split_of(splits, (data.test_split, *TEST_SPLITS), sources.data_dir)
        image, label = column_of(train, data.image, ("image", "img")), column_of(train, data.label, ("label",))
        found = num_classes_of(train, label)
        if found != data.num_classes:
            where = f"--data-dir {sources.data_dir}" if sources.data_dir else data.hub_id
            raise UserError(f"{where} has {found} classes, {name} has {data.num_classes}; is it the right dataset?")
        return TrainTestSplit(
            train=decode(train, image, label, data.size, sources.workers),
            test=decode(test, image, label, data.size, sources.workers),
            num_classes=data.num_classes,
        )

    def build_model(num_classes: int, sources: SourcesConfig) -> BuiltModel:
        from dpfl_bench.tasks.models import ImageClassifier

        model = timm_name(sources)
        network = build_timm(model, num_classes, sources.model_path)
        heads = head_names(network)
        classifier = ImageClassifier(network, sources.center_crop)
        return BuiltModel(classifier, f"timm:{model}", lora_targets_for(network, heads), tuple(f"network.{h}" for h in heads))

    return Task(
        name=name, description=description, model_name=DEFAULT_MODEL, load_data=load_data, build_model=build_model,
        lora_targets=("attn.qkv", "attn.proj"), validation_size=VALIDATION_SIZE, defaults=defaults, images=True,
    )


# The paper's vision setting: 8 clients, half sampled each round, Dirichlet 0.1 label skew, batch 16,
# rank 16 with alpha = rank, K = 20 local steps, about 100 rounds.
PAPER_VISION = {
    "clients": 8, "participation": 0.5, "partition": "dirichlet", "dirichlet-alpha": 0.1, "rounds": 100,
    "local-steps": 20, "batch-size": 16, "rank": 16, "lora-alpha": 16.0, "lr": 1e-3,
}
for _name, _data, _what in (
    ("cifar10", VisionData("uoft-cs/cifar10", "img", "label", "test", 32, 10),
     "CIFAR-10 (45,000 train / 5,000 validation / 10,000 test)"),
    ("cifar100", VisionData("uoft-cs/cifar100", "img", "fine_label", "test", 32, 100),
     "CIFAR-100 (45,000 train / 5,000 validation / 10,000 test)"),
    ("tiny-imagenet", VisionData("zh-plus/tiny-imagenet", "image", "label", "valid", 64, 200),
     "Tiny-ImageNet, 200 classes (95,000 train / 5,000 validation / 10,000 test: the official validation split, "
     "its test labels are not public)"),
):
    register_task(vision_task(_name, _data, f"{_what}, Swin-B (ImageNet-22k) at 224 px; hub or --data-dir", PAPER_VISION))
