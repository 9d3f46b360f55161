"""Building blocks shared by the model families: conv+BN(+activation) runs and squeeze-excitation.

Helpers append layers to a list instead of wrapping them in a Sequential so that a family's state-dict
names stay flat (``features.1.weight``, ``out.4._mean``): those names are PaddleClas's and are the
contract that lets its released ``.pdparams`` load unchanged.
"""
from __future__ import annotations

from typing import List, Optional, Type

import paddle
from paddle import nn


def append_conv_bn(
    layers: List[nn.Layer],
    in_channels: int,
    out_channels: int,
    kernel_size: int = 1,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    act: Optional[Type[nn.Layer]] = None,
) -> None:
    """Append Conv2D (no bias: BN follows) + BatchNorm2D, then ``act()`` when given."""
    layers.append(
        nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                  groups=groups, bias_attr=False))
    layers.append(nn.BatchNorm2D(out_channels))
    if act is not None:
        layers.append(act())


class SqueezeExcite(nn.Layer):
    """Squeeze-and-excitation with BN+ReLU in the bottleneck, as in ReXNet (not the plain SE-Net one)."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        squeezed = channels // reduction
        self.avg_pool = nn.AdaptiveAvgPool2D(1)
        self.fc = nn.Sequential(
            nn.Conv2D(channels, squeezed, 1),
            nn.BatchNorm2D(squeezed),
            nn.ReLU(),
            nn.Conv2D(squeezed, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return x * self.fc(self.avg_pool(x))
