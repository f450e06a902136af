"""The classifiers the built-in tasks put around their networks, so that every model is called as
`model(**features) -> logits`. Imported when a model is built: listing tasks needs no torch."""

import torch
from torch import nn

from dpfl_bench.tasks.base import resize_and_crop

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class GrayscaleClassifier(nn.Module):
    """uint8 grayscale images [batch, 28, 28] -> normalized RGB at `image_size` -> pretrained network."""

    def __init__(self, network: nn.Module, image_size: int, center_crop: float = 1.0) -> None:
        super().__init__()
        self.network = network
        self.image_size = image_size
        self.center_crop = center_crop
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.unsqueeze(1).float().div(255)
        x = resize_and_crop(x, (self.image_size, self.image_size), self.center_crop).expand(-1, 3, -1, -1)
        return self.network((x - self.mean) / self.std)


class ImageClassifier(nn.Module):
    """uint8 RGB images [batch, H, W, 3] -> resized to a timm backbone's input and normalized -> logits."""

    def __init__(self, network: nn.Module, center_crop: float = 1.0) -> None:
        super().__init__()
        cfg = network.pretrained_cfg
        self.network = network
        self.center_crop = center_crop
        self.size = tuple(cfg["input_size"][1:])
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float().div(255)
        x = resize_and_crop(x, self.size, self.center_crop)
        return self.network((x - self.mean) / self.std)


class MeanPooledClassifier(nn.Module):
    """A sentence encoder, mean pooling over real tokens, and a linear head: how all-MiniLM-L6-v2 was
    trained to be used (its [CLS] pooler is weaker: a linear probe on 3,000 snippets scores 0.67 with the
    pooler against 0.74 with mean pooling)."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1))


class SequenceClassifier(nn.Module):
    """A transformers sequence-classification model called as model(**features) -> logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **features: torch.Tensor) -> torch.Tensor:
        return self.model(**features).logits
