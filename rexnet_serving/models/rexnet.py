"""ReXNet (Rank eXpansion Network), V1, with PaddleClas's layer names.

Paper: Han et al., "Rethinking Channel Dimensions for Efficient Model Design", CVPR 2021,
arXiv:2007.00992. Layer indices follow the official ClovaAI implementation, which PaddleClas kept, so
``ReXNet_*_pretrained.pdparams`` from PaddleClas load strictly and ClovaAI's ``rexnetv1_*.pth`` convert
by renaming BN statistics only (see ``rexnet_serving.convert``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import paddle
from paddle import nn

from .layers import SqueezeExcite, append_conv_bn

# The architecture's fixed constants (paper, Table 1 and Section 4).
STAGE_DEPTHS = (1, 2, 2, 3, 3, 5)
STAGE_STRIDES = (1, 2, 2, 2, 1, 2)
STAGE_USE_SE = (False, False, True, True, True, True)
STEM_CHANNELS = 32
FIRST_BLOCK_CHANNELS = 16
LAST_BLOCK_CHANNELS = 180  # block outputs grow linearly from 16 by 180/16 per block
EXPANSION = 6  # every block but the first
SE_REDUCTION = 12
PENULTIMATE_CHANNELS = 1280


@dataclass(frozen=True)
class ReXNetVariant:
    """One row of the variant table: everything that differs between ReXNet_1_0 ... ReXNet_3_0."""

    width_mult: float
    dropout: float = 0.2
    input_size: int = 224
    resize_short: int = 256  # PaddleClas eval: resize short side, then centre-crop input_size


VARIANTS: Dict[str, ReXNetVariant] = {
    "ReXNet_1_0": ReXNetVariant(width_mult=1.0),
    "ReXNet_1_3": ReXNetVariant(width_mult=1.3),
    "ReXNet_1_5": ReXNetVariant(width_mult=1.5),
    "ReXNet_2_0": ReXNetVariant(width_mult=2.0),
    "ReXNet_3_0": ReXNetVariant(width_mult=3.0),
}


def scaled_channels(channels: float, width_mult: float) -> int:
    return int(round(channels * width_mult))


class LinearBottleneck(nn.Layer):
    """Inverted bottleneck: [1x1 expand, BN, Swish] -> 3x3 depthwise, BN -> [SE] -> ReLU6 -> 1x1, BN.

    With stride 1 the input is added to the first ``in_channels`` outputs only ("partial residual":
    channels grow from block to block, so a full identity shortcut does not fit).
    """

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int,
                 use_se: bool, se_reduction: int = SE_REDUCTION) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.use_shortcut = stride == 1 and in_channels <= out_channels
        layers: List[nn.Layer] = []
        dw_channels = in_channels
        if expansion != 1:
            dw_channels = in_channels * expansion
            append_conv_bn(layers, in_channels, dw_channels, act=nn.Swish)
        append_conv_bn(layers, dw_channels, dw_channels, kernel_size=3, stride=stride, padding=1,
                       groups=dw_channels)
        if use_se:
            layers.append(SqueezeExcite(dw_channels, se_reduction))
        layers.append(nn.ReLU6())
        append_conv_bn(layers, dw_channels, out_channels)
        self.out = nn.Sequential(*layers)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = self.out(x)
        if not self.use_shortcut:
            return out
        if out.shape[1] == self.in_channels:
            return out + x
        # slice + add + concat rather than in-place slice assignment: the latter exports as
        # set_value ops, which Paddle2ONNX rejects and which split TensorRT engines.
        head = out[:, :self.in_channels] + x
        return paddle.concat([head, out[:, self.in_channels:]], axis=1)


class ReXNetV1(nn.Layer):
    """ReXNet-V1 classifier; returns plain logits of shape [N, class_num]."""

    def __init__(self, width_mult: float = 1.0, class_num: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        if width_mult < 1.0:
            # The official code rescales the stem and first block so that they do not shrink below
            # 32/16 channels; the five published widths are all >= 1.0, which is what is tested.
            raise ValueError(f"width_mult must be >= 1.0, got {width_mult}")
        self.width_mult = width_mult
        self.class_num = class_num

        expansions, strides, use_ses = [], [], []
        for stage, depth in enumerate(STAGE_DEPTHS):
            expansions += [1 if stage == 0 else EXPANSION] * depth
            strides += [STAGE_STRIDES[stage]] + [1] * (depth - 1)
            use_ses += [STAGE_USE_SE[stage]] * depth
        num_blocks = len(strides)

        features: List[nn.Layer] = []
        stem = scaled_channels(STEM_CHANNELS, width_mult)
        append_conv_bn(features, 3, stem, kernel_size=3, stride=2, padding=1, act=nn.Swish)

        in_channels, planes = stem, float(FIRST_BLOCK_CHANNELS)
        for i in range(num_blocks):
            if i > 0:
                planes += LAST_BLOCK_CHANNELS / num_blocks
            out_channels = scaled_channels(planes, width_mult)
            features.append(LinearBottleneck(in_channels, out_channels, expansions[i], strides[i],
                                             use_ses[i]))
            in_channels = out_channels

        self.num_features = int(PENULTIMATE_CHANNELS * width_mult)
        append_conv_bn(features, in_channels, self.num_features, act=nn.Swish)
        features.append(nn.AdaptiveAvgPool2D(1))
        self.features = nn.Sequential(*features)
        self.output = nn.Sequential(
            nn.Dropout(dropout),
            nn.Conv2D(self.num_features, class_num, 1),
        )

    def reset_classifier(self, class_num: int) -> None:
        """Replace the classifier with a freshly initialised one for ``class_num`` classes."""
        self.class_num = class_num
        self.output[1] = nn.Conv2D(self.num_features, class_num, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = self.output(self.features(x))
        return paddle.flatten(x, start_axis=1)


def _create(name: str, pretrained: Optional[str] = None, **kwargs: Any) -> ReXNetV1:
    variant = VARIANTS[name]
    kwargs.setdefault("dropout", variant.dropout)
    model = ReXNetV1(width_mult=variant.width_mult, **kwargs)
    if pretrained:
        from .weights import load_weights
        load_weights(model, pretrained)
    return model


def ReXNet_1_0(pretrained: Optional[str] = None, **kwargs: Any) -> ReXNetV1:
    return _create("ReXNet_1_0", pretrained, **kwargs)


def ReXNet_1_3(pretrained: Optional[str] = None, **kwargs: Any) -> ReXNetV1:
    return _create("ReXNet_1_3", pretrained, **kwargs)


def ReXNet_1_5(pretrained: Optional[str] = None, **kwargs: Any) -> ReXNetV1:
    return _create("ReXNet_1_5", pretrained, **kwargs)


def ReXNet_2_0(pretrained: Optional[str] = None, **kwargs: Any) -> ReXNetV1:
    return _create("ReXNet_2_0", pretrained, **kwargs)


def ReXNet_3_0(pretrained: Optional[str] = None, **kwargs: Any) -> ReXNetV1:
    return _create("ReXNet_3_0", pretrained, **kwargs)
