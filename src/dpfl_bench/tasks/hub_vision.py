"""`cifar10`, `cifar100`, `tiny-imagenet`: the paper's vision tasks, with a timm backbone at 224 px.

Images are decoded once at load (`--workers` processes) and kept in memory as uint8 at their native size
(CIFAR 32 px, Tiny-ImageNet 64 px); the model wrapper resizes and normalizes them on the device, with the
backbone's own input size, mean and std. A per-batch CPU transform pipeline (PIL resize to 224, to tensor,
normalize) in DataLoader workers costs far more than one interpolation on the GPU, and keeps 16x more
bytes per image in flight.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpfl_bench.config import SourcesConfig
from dpfl_bench.errors import UserError
from dpfl_bench.tasks.base import BuiltModel, Examples, Task, TaskData, register_task
from dpfl_bench.tasks.hub import column_of, from_hub, load_splits, lora_targets_for, parse_model, split_of

DEFAULT_MODEL = "timm:swin_base_patch4_window7_224.ms_in22k"  # the paper's Swin-B, ImageNet-22k weights
TEST_SPLITS = ("test", "validation", "valid", "val")


@dataclass(frozen=True)
class VisionData:
    hub_id: str
    image: str  # column names on the hub
    label: str
    test_split: str
    size: int  # native resolution, kept in memory


class ImageClassifier(nn.Module):
    """uint8 RGB images [batch, H, W, 3] -> resized to the backbone's input and normalized -> logits."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        cfg = network.pretrained_cfg
        self.network = network
        self.size = tuple(cfg["input_size"][1:])
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float().div(255)
        x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.network((x - self.mean) / self.std)


def decode(split: object, image: str, label: str, size: int, workers: int) -> Examples:
    """Images as uint8 [n, size, size, 3] (converted to RGB, resized if a mirror's differ) and labels."""
    import datasets

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


def build_timm(name: str, num_classes: int, model_path: str) -> nn.Module:
    """A timm model with pretrained weights (hub, or a checkpoint file) and a new head for `num_classes`.
    timm drops the checkpoint's classifier when its class count differs from the model's."""
    import timm

    check_timm(name)
    if model_path:
        try:
            return timm.create_model(name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay={"file": model_path})
        except RuntimeError as e:  # a checkpoint of another architecture or size
            raise UserError(f"--model-path {model_path} does not fit timm:{name}: {str(e).splitlines()[0]}") from None
    hint = (
        f"on a machine with the hub run `python -c \"import timm, torch; torch.save(timm.create_model('{name}', "
        f"pretrained=True).state_dict(), 'weights.pth')\"`, copy the file here and pass --model-path weights.pth"
    )
    return from_hub(f"model timm:{name}", lambda: timm.create_model(name, pretrained=True, num_classes=num_classes), hint)


def vision_task(name: str, data: VisionData, description: str, defaults: dict) -> Task:
    def timm_name(sources: SourcesConfig) -> str:
        kind, model = parse_model(sources.model, DEFAULT_MODEL)
        if kind != "timm":
            raise UserError(f"{name} takes timm backbones: --model timm:<name>, e.g. timm:vit_base_patch16_224")
        return model

    def load_data(sources: SourcesConfig) -> TaskData:
        check_timm(timm_name(sources))  # before the slow part
        splits = load_splits(data.hub_id, None, sources, "image")
        train = split_of(splits, ("train",), sources.data_dir)
        test = split_of(splits, (data.test_split, *TEST_SPLITS), sources.data_dir)
        image, label = column_of(train, data.image, ("image", "img")), column_of(train, data.label, ("label",))
        return TaskData(
            train=decode(train, image, label, data.size, sources.workers),
            test=decode(test, image, label, data.size, sources.workers),
            num_classes=num_classes_of(train, label),
        )

    def build_model(num_classes: int, sources: SourcesConfig) -> BuiltModel:
        model = timm_name(sources)
        network = build_timm(model, num_classes, sources.model_path)
        heads = (network.pretrained_cfg["classifier"],)
        return BuiltModel(ImageClassifier(network), f"timm:{model}", lora_targets_for(network, heads), tuple(f"network.{h}" for h in heads))

    return Task(
        name=name, description=description, model_name=DEFAULT_MODEL, load_data=load_data, build_model=build_model,
        lora_targets=("attn.qkv", "attn.proj"), defaults=defaults,
    )


# The paper's vision setting: 8 clients, half sampled each round, Dirichlet 0.1 label skew, batch 16,
# rank 16 with alpha = rank, K = 20 local steps, about 100 rounds.
PAPER_VISION = {
    "clients": 8, "participation": 0.5, "partition": "dirichlet", "dirichlet-alpha": 0.1, "rounds": 100,
    "local-steps": 20, "batch-size": 16, "rank": 16, "lora-alpha": 16.0, "lr": 1e-3,
}
for _name, _data, _what in (
    ("cifar10", VisionData("uoft-cs/cifar10", "img", "label", "test", 32), "CIFAR-10 (50,000 train / 10,000 test)"),
    ("cifar100", VisionData("uoft-cs/cifar100", "img", "fine_label", "test", 32), "CIFAR-100 (50,000 train / 10,000 test)"),
    ("tiny-imagenet", VisionData("zh-plus/tiny-imagenet", "image", "label", "valid", 64),
     "Tiny-ImageNet, 200 classes (100,000 train / 10,000 validation, its test labels are not public)"),
):
    register_task(vision_task(_name, _data, f"{_what}, Swin-B (ImageNet-22k) at 224 px; hub or --data-dir", PAPER_VISION))
