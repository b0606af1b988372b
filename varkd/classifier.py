"""The small classifier whose penultimate features define the embedded metric space.

Inception-v3 features mean little on 32x32 digits, so the embedded study measures FID / IS / precision / recall in the
feature space of a classifier trained on the real data (see `varkd.metrics`). A 3-conv + FC head reached ~97% held-out
accuracy in the prototype; a global-average-pooling head did much worse, hence the flatten + FC.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from varkd.images import to_model_input


@dataclass
class ClassifierConfig:
    """Widths are `channels`, 2*channels, 4*channels (e.g. 32, 64, 128); each conv block halves the resolution."""

    channels: int = 32
    feature_dim: int = 128
    num_classes: int = 10
    image_size: int = 32
    in_channels: int = 3

    def __post_init__(self):
        for name in ("channels", "feature_dim", "num_classes", "image_size", "in_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ClassifierConfig.{name} must be a positive int, got {value!r}")
        if self.num_classes < 2:
            raise ValueError(f"ClassifierConfig.num_classes must be >= 2, got {self.num_classes}")
        if self.image_size % 8:
            raise ValueError(
                f"ClassifierConfig.image_size must be divisible by 8 (three 2x poolings), got {self.image_size}"
            )


class Classifier(nn.Module):
    """3 x (conv3x3 -> BN -> ReLU -> maxpool) -> flatten -> FC(feature_dim) -> BN -> ReLU -> linear head.

    Input is float NCHW in [-1, 1] (`varkd.images.to_model_input`). The BN before the feature ReLU keeps every
    feature unit alive (without it about half of 128 units were zero on all data, shrinking the metric space). The
    head has no bias, so its logits are exactly what torch-fidelity calls `logits_unbiased` (the Inception Score layer).
    """

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or ClassifierConfig()
        widths = [config.in_channels, config.channels, 2 * config.channels, 4 * config.channels]
        blocks = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        self.convs = nn.Sequential(*blocks)
        side = config.image_size // 8
        self.fc = nn.Sequential(
            nn.Linear(widths[-1] * side * side, config.feature_dim, bias=False), nn.BatchNorm1d(config.feature_dim)
        )
        self.head = nn.Linear(config.feature_dim, config.num_classes, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations [B, feature_dim]: the space FID / precision / recall are measured in."""
        return F.relu(self.fc(self.convs(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def classifier_loss(model: Classifier, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on float NCHW [-1, 1] images; logs hold python floats `loss` and `acc` for the training log."""
    logits = model(images)
    loss = F.cross_entropy(logits, labels)
    acc = (logits.argmax(1) == labels).float().mean()
    return loss, {"loss": loss.item(), "acc": acc.item()}


@torch.no_grad()
def accuracy(model: Classifier, images_uint8, labels, batch_size: int = 500) -> float:
    """Held-out accuracy on uint8 NHWC images, in eval mode (restores the previous mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    labels = torch.as_tensor(np.asarray(labels)).long()
    correct = 0
    for start in range(0, len(labels), batch_size):
        x = to_model_input(images_uint8[start : start + batch_size]).to(device)
        correct += (model(x).argmax(1).cpu() == labels[start : start + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(labels)
