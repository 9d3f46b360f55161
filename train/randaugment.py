"""RandAugment as timm's ``rand-m9-mstd0.5``, the policy in the ReXNet authors' training command.

RandAugment: Cubuk et al., "RandAugment: Practical automated data augmentation with a reduced search
space", arXiv:1909.13719, with the op ranges of AutoAugment (Cubuk et al., arXiv:1805.09501) as TF's
EfficientNet code scales them. The authors trained with timm (2020, ``timm/data/auto_augment.py``:
``_RAND_TRANSFORMS``, ``rand_augment_ops``, ``AugmentOp``, the ``*_level_to_arg`` functions), which
differs from the paper in ways that matter, and this module follows timm:

* 15 ops, no Identity: AutoContrast, Equalize, Invert, Rotate, Posterize, Solarize, SolarizeAdd, Color,
  Contrast, Brightness, Sharpness, ShearX, ShearY, TranslateXRel, TranslateYRel.
* 2 ops drawn uniformly *with replacement*; each is applied with probability 0.5 (timm's
  ``rand_augment_ops(prob=0.5)``), so an image gets 0, 1 or 2 ops.
* ``mstd0.5``: each applied op draws its own magnitude from N(9, 0.5), clipped to [0, 10].
* Level functions at magnitude m (level m / 10): Rotate +-30 deg, ShearX/Y +-0.3, TranslateX/YRel +-45 % of
  the width/height, each with a random sign; Solarize threshold int(256 * level) (230 at m=9: only the
  brightest pixels invert); Posterize int(4 * level) bits (3 at m=9); SolarizeAdd +int(110 * level) below
  128; Color/Contrast/Brightness/Sharpness factor 0.1 + 1.8 * level (1.72 at m=9, no sign: timm's
  non-"Increasing" variants).
* Geometric ops resample with bilinear or bicubic chosen at random per op (timm's train interpolation
  'random'), and fill with the dataset mean in 0..255 (timm's ``img_mean``: (124, 116, 104) for ImageNet).

Paddle has no RandAugment. Unlike timm, every random choice is drawn up front from a numpy Generator
(``sample``) and then applied without randomness (``apply``), so the draws of a sample are data that tests
can check and that never share a stream with another augmentation stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

MAX_MAGNITUDE = 10.0  # timm's _MAX_LEVEL: magnitudes are on a 0..10 scale
OP_PROB = 0.5  # timm rand_augment_ops(prob=0.5)
RESAMPLE = (Image.BILINEAR, Image.BICUBIC)  # timm _RANDOM_INTERPOLATION


@dataclass(frozen=True)
class OpDraw:
    """One of the ``num_ops`` picks of a sample: which op, whether it runs, and its random arguments."""

    name: str
    applied: bool
    magnitude: float  # after the Gaussian noise and clipping to [0, MAX_MAGNITUDE]
    negate: bool  # the random sign of Rotate, Shear*, Translate*
    resample: int  # PIL filter of the geometric ops


# -- level functions: magnitude (0..10) -> the op's argument, as timm's *_level_to_arg ---------------
def _signed(value: float, negate: bool) -> float:
    return -value if negate else value


def rotate_degrees(m: float, negate: bool) -> float:
    return _signed(m / MAX_MAGNITUDE * 30.0, negate)


def shear_factor(m: float, negate: bool) -> float:
    return _signed(m / MAX_MAGNITUDE * 0.3, negate)


def translate_fraction(m: float, negate: bool) -> float:
    return _signed(m / MAX_MAGNITUDE * 0.45, negate)  # timm hparams translate_pct default 0.45


def solarize_threshold(m: float) -> int:
    return int(m / MAX_MAGNITUDE * 256)


def solarize_add_amount(m: float) -> int:
    return int(m / MAX_MAGNITUDE * 110)


def posterize_bits(m: float) -> int:
    return int(m / MAX_MAGNITUDE * 4)


def enhance_factor(m: float) -> float:
    return m / MAX_MAGNITUDE * 1.8 + 0.1


# -- the ops: (image, draw, fill) -> image; PIL's ImageOps / ImageEnhance / affine transform -----------
Fill = Tuple[int, int, int]
Op = Callable[[Image.Image, OpDraw, Fill], Image.Image]


def _affine(img: Image.Image, matrix: Sequence[float], d: OpDraw, fill: Fill) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, tuple(matrix), resample=d.resample, fillcolor=fill)


def _solarize_add(img: Image.Image, d: OpDraw, fill: Fill) -> Image.Image:
    add = solarize_add_amount(d.magnitude)
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, d: OpDraw, fill: Fill) -> Image.Image:
    """Keep the top ``bits`` bits of each channel. The LUT is ImageOps.posterize's own, written here because
    Pillow 12.3 refuses bits=0, which the magnitudes reach (a black image, as Pillow computed it before)."""
    bits = posterize_bits(d.magnitude)
    if bits >= 8:
        return img
    mask = ~(2 ** (8 - bits) - 1) & 0xFF
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _enhance(kind: Callable[[Image.Image], Any]) -> Op:
    def op(img: Image.Image, d: OpDraw, fill: Fill) -> Image.Image:
        return kind(img).enhance(enhance_factor(d.magnitude))
    return op


OPS: Dict[str, Op] = {  # timm's _RAND_TRANSFORMS, in its order
    "AutoContrast": lambda img, d, fill: ImageOps.autocontrast(img),
    "Equalize": lambda img, d, fill: ImageOps.equalize(img),
    "Invert": lambda img, d, fill: ImageOps.invert(img),
    "Rotate": lambda img, d, fill: img.rotate(rotate_degrees(d.magnitude, d.negate),
                                              resample=d.resample, fillcolor=fill),
    "Posterize": _posterize,
    "Solarize": lambda img, d, fill: ImageOps.solarize(img, solarize_threshold(d.magnitude)),
    "SolarizeAdd": _solarize_add,
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda img, d, fill: _affine(img, (1, shear_factor(d.magnitude, d.negate), 0, 0, 1, 0),
                                           d, fill),
    "ShearY": lambda img, d, fill: _affine(img, (1, 0, 0, shear_factor(d.magnitude, d.negate), 1, 0),
                                           d, fill),
    "TranslateXRel": lambda img, d, fill: _affine(
        img, (1, 0, translate_fraction(d.magnitude, d.negate) * img.size[0], 0, 1, 0), d, fill),
    "TranslateYRel": lambda img, d, fill: _affine(
        img, (1, 0, 0, 0, 1, translate_fraction(d.magnitude, d.negate) * img.size[1]), d, fill),
}
OP_NAMES = tuple(OPS)


def mean_fill(mean: Sequence[float]) -> Fill:
    """timm's ``img_mean``: the normalisation mean (0..1 units) as a 0..255 RGB fill colour."""
    return tuple(min(255, round(255 * m)) for m in mean)  # type: ignore[return-value]


class RandAugment:
    """``num_ops`` picks with replacement from ``OPS``, each applied with probability ``OP_PROB``.

    ``resample`` restricts the geometric ops' filter to one PIL filter (timm: a fixed train
    interpolation); ``None`` picks bilinear or bicubic at random per op.
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5,
                 fill: Fill = (128, 128, 128), resample: Optional[int] = None) -> None:
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.fill = fill
        self.resample = resample

    def sample(self, rng: np.random.Generator) -> List[OpDraw]:
        draws = []
        for _ in range(self.num_ops):
            name = OP_NAMES[int(rng.integers(len(OP_NAMES)))]
            applied = bool(rng.random() < OP_PROB)
            m = self.magnitude
            if self.magnitude_std > 0:
                m = float(rng.normal(m, self.magnitude_std))
            m = min(MAX_MAGNITUDE, max(0.0, m))
            negate = bool(rng.random() < 0.5)
            resample = self.resample if self.resample is not None else \
                RESAMPLE[int(rng.integers(len(RESAMPLE)))]
            draws.append(OpDraw(name, applied, m, negate, resample))
        return draws

    def apply(self, img: Image.Image, draws: Sequence[OpDraw]) -> Image.Image:
        for d in draws:
            if d.applied:
                img = OPS[d.name](img, d, self.fill)
        return img
