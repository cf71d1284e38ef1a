"""The CNN: the classic pytorch/examples MNIST net, with its sizes as plain config values.

conv(1->c1, k) -> ReLU -> conv(c1->c2, k) -> ReLU -> max-pool 2 -> dropout -> FC(flat->fc_width) -> ReLU
-> dropout -> FC(fc_width->10). The flattened size is computed from the image size, never hand-written.
Options: BatchNorm after each conv, and a max-pool after the first conv too (the second conv then runs on a
quarter of the pixels: about 4x fewer FLOPs, the shape the speed-record configs use).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError

IMAGE_SIZE = 28
NUM_CLASSES = 10


@dataclass(frozen=True)
class ModelConfig:
    conv1_channels: int = 32  # output channels of the first conv
    conv2_channels: int = 64  # output channels of the second conv
    kernel_size: int = 3  # square kernel of both convs, no padding
    conv_dropout: float = 0.25  # dropout after the pooled conv features
    dropout: float = 0.5  # dropout before the classifier
    fc_width: int = 128  # hidden units of the fully connected layer
    batch_norm: bool = False  # BatchNorm after each conv
    pool_each_conv: bool = False  # max-pool 2x2 after each conv, not only after the second

    def __post_init__(self) -> None:
        for key in ("conv1_channels", "conv2_channels", "fc_width"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 1")
        if self.kernel_size < 1 or pooled_size(self.kernel_size, self.pool_each_conv) < 1:
            largest = max(k for k in range(1, IMAGE_SIZE) if pooled_size(k, self.pool_each_conv) >= 1)
            raise ConfigError(f"model.kernel_size={self.kernel_size} must be in [1, {largest}] so that a "
                              f"{IMAGE_SIZE}x{IMAGE_SIZE} image survives the convs and pools "
                              f"(pool_each_conv={self.pool_each_conv})")
        for key in ("conv_dropout", "dropout"):
            p = getattr(self, key)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"model.{key}={p} must be in [0, 1): it is the probability of zeroing a unit")


def conv_sizes(kernel_size: int, pool_each_conv: bool, image_size: int = IMAGE_SIZE) -> tuple[int, int]:
    """Output sides of the two unpadded convs."""
    first = image_size - (kernel_size - 1)
    return first, (first // 2 if pool_each_conv else first) - (kernel_size - 1)


def pooled_size(kernel_size: int, pool_each_conv: bool = False, image_size: int = IMAGE_SIZE) -> int:
    """Side of the feature map that is flattened into the FC layer."""
    return conv_sizes(kernel_size, pool_each_conv, image_size)[1] // 2


class Net(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c1, c2, k = cfg.conv1_channels, cfg.conv2_channels, cfg.kernel_size
        self.conv1 = nn.Conv2d(1, c1, k, bias=not cfg.batch_norm)
        self.bn1 = nn.BatchNorm2d(c1) if cfg.batch_norm else nn.Identity()
        self.conv2 = nn.Conv2d(c1, c2, k, bias=not cfg.batch_norm)
        self.bn2 = nn.BatchNorm2d(c2) if cfg.batch_norm else nn.Identity()
        self.dropout1 = nn.Dropout(cfg.conv_dropout)
        self.pool_each_conv = cfg.pool_each_conv
        self.fc1 = nn.Linear(c2 * pooled_size(k, cfg.pool_each_conv) ** 2, cfg.fc_width)
        self.dropout2 = nn.Dropout(cfg.dropout)
        self.fc2 = nn.Linear(cfg.fc_width, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if self.pool_each_conv:
            x = F.max_pool2d(x, 2)
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.dropout1(F.max_pool2d(x, 2))
        x = self.dropout2(F.relu(self.fc1(torch.flatten(x, 1))))
        return self.fc2(x)  # logits; the loss applies log-softmax


def build_model(cfg: ModelConfig) -> Net:
    return Net(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_flops_per_image(cfg: ModelConfig) -> int:
    """Multiply-adds x 2 of one forward pass, x 3 for forward + backward (the usual estimate)."""
    k, c1, c2 = cfg.kernel_size, cfg.conv1_channels, cfg.conv2_channels
    s1, s2 = conv_sizes(k, cfg.pool_each_conv)
    flat = c2 * pooled_size(k, cfg.pool_each_conv) ** 2
    macs = s1 * s1 * c1 * k * k + s2 * s2 * c2 * c1 * k * k + flat * cfg.fc_width + cfg.fc_width * NUM_CLASSES
    return 3 * 2 * macs
