"""The CNN: the classic pytorch/examples MNIST net, with its sizes as plain config values, or a deeper net of
conv blocks.

Classic (`blocks` null or empty): conv(1->c1, k) -> ReLU -> conv(c1->c2, k) -> ReLU -> max-pool 2 -> dropout
-> FC(flat->fc_width) -> ReLU -> dropout -> FC(fc_width->10). Options: BatchNorm after each conv, and a max-pool
after the first conv too (the second conv then runs on a quarter of the pixels: about 4x fewer FLOPs, the shape
the speed-record configs use).

Blocks (`blocks` e.g. [[32, 32], [64, 64]]): each block is convs of those output channels (k x k, padding that
keeps the side), each followed by BatchNorm (when batch_norm) and ReLU, then a 2x2 max-pool and dropout
(conv_dropout); then FC(flat->fc_width) -> BatchNorm (when batch_norm) -> ReLU -> dropout -> FC(fc_width->10).
In both, the flattened size is computed from the image size, never hand-written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config_types import shown
from .errors import ConfigError

IMAGE_SIZE = 28
NUM_CLASSES = 10
BLOCKS_EXAMPLE = "[[32, 32], [64, 64]]"


@dataclass(frozen=True)
class ModelConfig:
    conv1_channels: int = 32  # output channels of the first conv
    conv2_channels: int = 64  # output channels of the second conv
    kernel_size: int = 3  # square kernel of every conv; classic: no padding, blocks: padded to keep the side
    conv_dropout: float = 0.25  # dropout after the pooled conv features
    dropout: float = 0.5  # dropout before the classifier
    fc_width: int = 128  # hidden units of the fully connected layer
    batch_norm: bool = False  # BatchNorm after each conv
    pool_each_conv: bool = False  # max-pool 2x2 after each conv, not only after the second
    # conv blocks, each the output channels of its convs: a non-empty list replaces conv1/conv2 and pool_each_conv
    blocks: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        # YAML, the command line and model_config.json give lists: kept as tuples, so the config stays hashable
        object.__setattr__(self, "blocks", check_blocks(self.blocks, self.pool_each_conv) or None)
        if self.blocks and (self.kernel_size < 1 or self.kernel_size % 2 == 0):
            raise ConfigError(f"model.kernel_size={self.kernel_size} must be odd and >= 1 with model.blocks, e.g. "
                              "3: a block's convs pad (kernel_size - 1) / 2 pixels a side to keep the image's side")
        for key in ("conv1_channels", "conv2_channels", "fc_width"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 1")
        if not self.blocks and (self.kernel_size < 1 or pooled_size(self.kernel_size, self.pool_each_conv) < 1):
            largest = max(k for k in range(1, IMAGE_SIZE) if pooled_size(k, self.pool_each_conv) >= 1)
            raise ConfigError(f"model.kernel_size={self.kernel_size} must be in [1, {largest}] so that a "
                              f"{IMAGE_SIZE}x{IMAGE_SIZE} image survives the convs and pools "
                              f"(pool_each_conv={self.pool_each_conv})")
        for key in ("conv_dropout", "dropout"):
            p = getattr(self, key)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"model.{key}={p} must be in [0, 1): it is the probability of zeroing a unit")


def max_blocks(image_size: int = IMAGE_SIZE) -> int:
    """How many 2x2 max-pools an image survives with at least one pixel: 4 for 28 (14, 7, 3, 1)."""
    count = 0
    while image_size // 2 >= 1:
        image_size //= 2
        count += 1
    return count


def check_blocks(blocks: object, pool_each_conv: bool = False) -> tuple[tuple[int, ...], ...]:
    """model.blocks as a tuple of tuples of channels (empty for null or []); ConfigError naming the value and what
    is allowed when it is not a list of 1..max_blocks() non-empty lists of channels >= 1."""
    if blocks is None:
        return ()
    allowed = (f"allowed: a list of at most {max_blocks()} blocks (each ends with a 2x2 max-pool of the "
               f"{IMAGE_SIZE}x{IMAGE_SIZE} image), each a non-empty list of conv output channels >= 1, "
               f"e.g. model.blocks={BLOCKS_EXAMPLE}, or null for the classic net")

    def channels_ok(c: object) -> bool:
        return isinstance(c, int) and not isinstance(c, bool) and c >= 1

    shape_ok = isinstance(blocks, (list, tuple)) and all(
        isinstance(b, (list, tuple)) and b and all(map(channels_ok, b)) for b in blocks)
    if not shape_ok or len(blocks) > max_blocks():
        raise ConfigError(f"model.blocks={shown(blocks)} is not a valid list of conv blocks; {allowed}")
    if blocks and pool_each_conv:
        raise ConfigError("model.pool_each_conv=true does not apply to model.blocks (each block ends with its own "
                          "max-pool); set model.pool_each_conv=false, or model.blocks=null for the classic net")
    return tuple(tuple(b) for b in blocks)


def block_convs(blocks: tuple[tuple[int, ...], ...], image_size: int = IMAGE_SIZE) -> list[tuple[int, int, int]]:
    """(side, in_channels, out_channels) of every conv of the blocks, in order."""
    convs, side, channels = [], image_size, 1
    for block in blocks:
        for out in block:
            convs.append((side, channels, out))
            channels = out
        side //= 2
    return convs


def blocks_output(blocks: tuple[tuple[int, ...], ...], image_size: int = IMAGE_SIZE) -> tuple[int, int]:
    """(channels, side) of the feature map the blocks hand to the FC layer."""
    return blocks[-1][-1], image_size // 2 ** len(blocks)


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


class BlockNet(nn.Module):
    """The net of conv blocks (`model.blocks`); see the module's docstring."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        assert cfg.blocks, "BlockNet needs model.blocks"
        k = cfg.kernel_size
        layers: list[nn.Module] = []
        channels = 1
        for block in cfg.blocks:
            for out in block:
                layers.append(nn.Conv2d(channels, out, k, padding=k // 2, bias=not cfg.batch_norm))
                if cfg.batch_norm:
                    layers.append(nn.BatchNorm2d(out))
                layers.append(nn.ReLU())
                channels = out
            layers += [nn.MaxPool2d(2), nn.Dropout(cfg.conv_dropout)]
        self.features = nn.Sequential(*layers)
        out_channels, side = blocks_output(cfg.blocks)
        self.fc1 = nn.Linear(out_channels * side * side, cfg.fc_width, bias=not cfg.batch_norm)
        self.bn_fc = nn.BatchNorm1d(cfg.fc_width) if cfg.batch_norm else nn.Identity()
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc2 = nn.Linear(cfg.fc_width, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.features(x), 1)
        x = self.dropout(F.relu(self.bn_fc(self.fc1(x))))
        return self.fc2(x)  # logits; the loss applies log-softmax


def build_model(cfg: ModelConfig) -> nn.Module:
    return BlockNet(cfg) if cfg.blocks else Net(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_flops_per_image(cfg: ModelConfig) -> int:
    """Multiply-adds x 2 of one forward pass, x 3 for forward + backward (the usual estimate); convs and FC
    layers only (BatchNorm, ReLU and pooling are a few percent)."""
    if cfg.blocks:
        k = cfg.kernel_size
        out_channels, side = blocks_output(cfg.blocks)
        flat = out_channels * side * side
        macs = sum(s * s * cin * cout * k * k for s, cin, cout in block_convs(cfg.blocks))
        return 3 * 2 * (macs + flat * cfg.fc_width + cfg.fc_width * NUM_CLASSES)
    k, c1, c2 = cfg.kernel_size, cfg.conv1_channels, cfg.conv2_channels
    s1, s2 = conv_sizes(k, cfg.pool_each_conv)
    flat = c2 * pooled_size(k, cfg.pool_each_conv) ** 2
    macs = s1 * s1 * c1 * k * k + s2 * s2 * c2 * c1 * k * k + flat * cfg.fc_width + cfg.fc_width * NUM_CLASSES
    return 3 * 2 * macs
