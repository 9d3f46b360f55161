"""Image preprocessing: the one implementation used by evaluation, the offline predictor and the service.

PaddleClas's eval pipeline for ReXNet: decode to RGB, resize the short side to 256 (bilinear), centre-crop
224, scale by 1/255, subtract the ImageNet mean and divide by the std, HWC -> CHW.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessConfig:
    resize_short: int = 256
    crop_size: int = 224
    interpolation: str = "bilinear"
    scale: float = 1.0 / 255.0
    mean: Tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: Tuple[float, float, float] = field(default=IMAGENET_STD)
    channel_order: str = "RGB"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "PreprocessConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {', '.join(sorted(unknown))}")
        values = dict(data)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)


def config_for(arch: str) -> PreprocessConfig:
    """The eval preprocessing of a model, from its row in the variant table."""
    from .models import VARIANTS
    variant = VARIANTS[arch]
    return PreprocessConfig(resize_short=variant.resize_short, crop_size=variant.input_size)
