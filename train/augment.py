"""Training augmentation: random-resized crop + flip, RandAugment, random erasing; seeded per sample.

* Random-resized crop ("Inception crop", Szegedy et al. 2015) and horizontal flip are Paddle's own
  ``paddle.vision.transforms``.
* RandAugment: Cubuk et al., "RandAugment: Practical automated data augmentation with a reduced search
  space", arXiv:1909.13719 — N ops drawn uniformly from 14, all at one magnitude M on a 0..10 scale, with
  the magnitude ranges of AutoAugment (Cubuk et al. 2018). Optional Gaussian noise on M per op (timm's
  ``mstd``, used by the ReXNet authors). Paddle has no RandAugment, so it is written here on PIL.
* Random erasing: Zhong et al., "Random Erasing Data Augmentation", arXiv:1708.04896, in the per-pixel
  Gaussian mode ("remode pixel") applied after normalisation. Paddle's ``RandomErasing`` draws its
  noise from Paddle's global generator for tensors and assumes 0..255 data for arrays, so neither gives a
  seeded, normalised-space erase; the erase itself is a slice assignment.

Every random choice comes from the per-sample seed passed in, so a sample's augmentation depends only on
(seed, epoch, index): that is what makes a resumed run repeat the uninterrupted one exactly.
"""
from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Callable, Dict, Iterator, Sequence, Tuple

import numpy as np
from paddle.vision import transforms as T
from PIL import Image, ImageEnhance, ImageOps

from rexnet_serving.preprocess import PreprocessConfig

MAX_MAGNITUDE = 10.0
FILL = (128, 128, 128)  # grey for pixels that affine ops move in from outside the image


def _signed(rng: random.Random, value: float) -> float:
    return value if rng.random() < 0.5 else -value


def _affine(img: Image.Image, matrix: Tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=FILL)


# Each op: (image, level in [0, 1], rng) -> image. Levels map to AutoAugment's ranges.
def _identity(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    return img


def _auto_contrast(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    return ImageOps.autocontrast(img)


def _equalize(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    return ImageOps.equalize(img)


def _rotate(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    return img.rotate(_signed(rng, 30.0 * level), resample=Image.BILINEAR, fillcolor=FILL)


def _solarize(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    return ImageOps.solarize(img, int(256 - 256 * level))


def _posterize(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    return ImageOps.posterize(img, int(8 - 4 * level))


def _enhancer(kind: Callable[[Image.Image], Any]) -> Callable[[Image.Image, float, random.Random],
                                                              Image.Image]:
    def op(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
        return kind(img).enhance(1.0 + _signed(rng, 0.9 * level))
    op.__name__ = kind.__name__
    return op


def _shear_x(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    return _affine(img, (1, _signed(rng, 0.3 * level), 0, 0, 1, 0))


def _shear_y(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    return _affine(img, (1, 0, 0, _signed(rng, 0.3 * level), 1, 0))


def _translate_x(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    # AutoAugment: up to 150 px of a 331 px image, i.e. 45% of the width.
    return _affine(img, (1, 0, _signed(rng, 0.45 * level) * img.size[0], 0, 1, 0))


def _translate_y(img: Image.Image, level: float, rng: random.Random) -> Image.Image:
    return _affine(img, (1, 0, 0, 0, 1, _signed(rng, 0.45 * level) * img.size[1]))


RANDAUGMENT_OPS: Dict[str, Callable[[Image.Image, float, random.Random], Image.Image]] = {
    "Identity": _identity,
    "AutoContrast": _auto_contrast,
    "Equalize": _equalize,
    "Rotate": _rotate,
    "Solarize": _solarize,
    "Color": _enhancer(ImageEnhance.Color),
    "Posterize": _posterize,
    "Contrast": _enhancer(ImageEnhance.Contrast),
    "Brightness": _enhancer(ImageEnhance.Brightness),
    "Sharpness": _enhancer(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
}


class RandAugment:
    """Apply ``num_ops`` ops chosen uniformly (with replacement, as in the paper) at ``magnitude``."""

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.0) -> None:
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.ops = list(RANDAUGMENT_OPS.values())

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        for _ in range(self.num_ops):
            op = rng.choice(self.ops)
            m = self.magnitude
            if self.magnitude_std > 0:
                m = min(MAX_MAGNITUDE, max(0.0, rng.gauss(m, self.magnitude_std)))
            img = op(img, m / MAX_MAGNITUDE, rng)
        return img


def random_erase(chw: np.ndarray, prob: float, rng: np.random.Generator,
                 area: Tuple[float, float] = (0.02, 1 / 3), log_ratio: Tuple[float, float] = (
                     math.log(0.3), math.log(1 / 0.3)), attempts: int = 10) -> np.ndarray:
    """Erase one rectangle of a normalised CHW image with N(0, 1) noise, with probability ``prob``."""
    if prob <= 0 or rng.random() >= prob:
        return chw
    channels, height, width = chw.shape
    for _ in range(attempts):
        target = rng.uniform(*area) * height * width
        aspect = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if 0 < h < height and 0 < w < width:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            chw[:, top:top + h, left:left + w] = rng.standard_normal((channels, h, w), dtype=np.float32)
            return chw
    return chw


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed ``random`` and ``numpy.random`` (which Paddle's transforms draw from), then restore them."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed for one random stream, e.g. (seed, epoch, sample index)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0]) >> 1


class TrainTransform:
    """PIL RGB image + per-sample seed -> normalised float32 CHW array."""

    def __init__(self, crop_size: int, crop_scale: Sequence[float], crop_ratio: Sequence[float],
                 hflip_prob: float, randaugment_ops: int, randaugment_magnitude: float,
                 randaugment_magnitude_std: float, random_erasing_prob: float,
                 normalize: PreprocessConfig) -> None:
        self.crop_flip = T.Compose([
            T.RandomResizedCrop(crop_size, scale=tuple(crop_scale), ratio=tuple(crop_ratio),
                                interpolation=normalize.interpolation),
            T.RandomHorizontalFlip(hflip_prob),
        ])
        self.randaugment = (RandAugment(randaugment_ops, randaugment_magnitude,
                                        randaugment_magnitude_std) if randaugment_ops > 0 else None)
        self.erasing_prob = random_erasing_prob
        self.scale = np.float32(normalize.scale)
        self.mean = np.asarray(normalize.mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(normalize.std, np.float32).reshape(3, 1, 1)

    @classmethod
    def from_config(cls, augment: Dict[str, Any], normalize: PreprocessConfig) -> "TrainTransform":
        return cls(normalize=normalize, **augment)

    def __call__(self, img: Image.Image, seed: int) -> np.ndarray:
        with seeded_global_rngs(seed):
            img = self.crop_flip(img)
        py_rng = random.Random(seed)
        np_rng = np.random.default_rng(seed)
        if self.randaugment is not None:
            img = self.randaugment(img, py_rng)
        chw = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) * self.scale
        chw = (chw - self.mean) / self.std
        return random_erase(np.ascontiguousarray(chw, dtype=np.float32), self.erasing_prob, np_rng)

