"""Training augmentation as timm's ImageNet train transform: crop + flip, RandAugment, random erasing.

The ReXNet authors trained with timm's ``transforms_imagenet_train`` (2020); each stage here follows it:

* ``RandomResizedCropAndInterpolation``: the Inception crop (Szegedy et al. 2015; scale 0.08..1, ratio
  3/4..4/3, 10 attempts, then a centre crop), resized with bilinear or bicubic picked at random per sample
  (timm's train interpolation ``random``), then a horizontal flip with probability 0.5. Paddle's
  ``RandomResizedCrop`` takes one fixed filter and draws from the global ``random`` module, so the crop
  is sampled here (a dozen lines, the torchvision/timm algorithm) from the sample's own stream.
* RandAugment ``rand-m9-mstd0.5``: ``rexnet_train.randaugment``.
* Random erasing: Zhong et al., "Random Erasing Data Augmentation", arXiv:1708.04896, timm's
  ``RandomErasing`` in ``pixel`` mode (per-pixel N(0, 1) noise, area 2 %..1/3, aspect 0.3..3.3,
  10 attempts) applied after normalisation. Paddle's ``RandomErasing`` assumes 0..255 arrays or draws
  from Paddle's global generator, so neither gives a seeded, normalised-space erase.

Randomness: a sample's augmentation depends only on its seed (``derive_seed(seed, epoch, index)``), which
is what makes a resumed run repeat the uninterrupted one. Each stage draws from its own stream, spawned
from that seed with numpy's ``SeedSequence`` (``stage_rngs``): streams seeded alike would make the crop and
the RandAugment choice functions of the same first random number, i.e. correlated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from rexnet_serving.preprocess import PreprocessConfig

from rexnet_train.randaugment import RESAMPLE, OpDraw, RandAugment, mean_fill

STAGES = ("crop", "randaugment", "erase")  # one independent random stream each
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
Box = Tuple[int, int, int, int]  # top, left, height, width


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed for one random stream, e.g. (seed, epoch, sample index)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0]) >> 1


def stage_rngs(seed: int) -> Dict[str, np.random.Generator]:
    """Independent generators, one per stage in ``STAGES``, all determined by ``seed``."""
    children = np.random.SeedSequence(seed).spawn(len(STAGES))
    return {stage: np.random.default_rng(child) for stage, child in zip(STAGES, children)}


def sample_crop(rng: np.random.Generator, width: int, height: int, scale: Sequence[float],
                ratio: Sequence[float]) -> Box:
    """The Inception crop's box (torchvision/timm ``RandomResizedCrop.get_params``)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # Fallback: the largest centre crop with the aspect ratio clamped to the range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_erase(rng: np.random.Generator, height: int, width: int, prob: float,
                 area: Tuple[float, float] = (0.02, 1 / 3),
                 log_ratio: Tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
                 attempts: int = 10) -> Optional[Box]:
    """The rectangle random erasing replaces (timm ``RandomErasing``), or None."""
    if prob <= 0 or rng.random() >= prob:
        return None
    for _ in range(attempts):
        target = rng.uniform(*area) * height * width
        aspect = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if 0 < h < height and 0 < w < width:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


def random_erase(chw: np.ndarray, prob: float, rng: np.random.Generator) -> np.ndarray:
    """Erase one rectangle of a normalised CHW image with N(0, 1) noise, with probability ``prob``."""
    box = sample_erase(rng, chw.shape[1], chw.shape[2], prob)
    return _erase(chw, box, rng)


def _erase(chw: np.ndarray, box: Optional[Box], rng: np.random.Generator) -> np.ndarray:
    if box is not None:
        top, left, h, w = box
        chw[:, top:top + h, left:left + w] = rng.standard_normal((chw.shape[0], h, w), dtype=np.float32)
    return chw


@dataclass
class Draws:
    """Every random choice of one sample, drawn before any pixel is touched."""

    crop: Box
    resample: int
    flip: bool
    ops: List[OpDraw]
    erase: Optional[Box]
    noise_rng: np.random.Generator  # the erase stage's stream, for the noise that fills ``erase``


class TrainTransform:
    """PIL RGB image + per-sample seed -> normalised float32 CHW array."""

    def __init__(self, crop_size: int, crop_scale: Sequence[float], crop_ratio: Sequence[float],
                 hflip_prob: float, interpolation: str, randaugment_ops: int,
                 randaugment_magnitude: float, randaugment_magnitude_std: float,
                 random_erasing_prob: float, normalize: PreprocessConfig) -> None:
        self.crop_size = crop_size
        self.crop_scale = tuple(crop_scale)
        self.crop_ratio = tuple(crop_ratio)
        self.hflip_prob = hflip_prob
        # "random": bilinear or bicubic per sample, and per RandAugment op (timm's train default).
        self.resample = None if interpolation == "random" else INTERPOLATIONS[interpolation]
        self.randaugment = None
        if randaugment_ops > 0:
            self.randaugment = RandAugment(randaugment_ops, randaugment_magnitude,
                                           randaugment_magnitude_std, fill=mean_fill(normalize.mean),
                                           resample=self.resample)
        self.erasing_prob = random_erasing_prob
        self.scale = np.float32(normalize.scale)
        self.mean = np.asarray(normalize.mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(normalize.std, np.float32).reshape(3, 1, 1)

    @classmethod
    def from_config(cls, augment: Dict[str, Any], normalize: PreprocessConfig) -> "TrainTransform":
        return cls(normalize=normalize, **augment)

    def sample(self, seed: int, size: Tuple[int, int]) -> Draws:
        """All draws for an image of ``size`` (width, height), each stage from its own stream."""
        rngs = stage_rngs(seed)
        crop_rng = rngs["crop"]
        box = sample_crop(crop_rng, size[0], size[1], self.crop_scale, self.crop_ratio)
        resample = self.resample if self.resample is not None else \
            RESAMPLE[int(crop_rng.integers(len(RESAMPLE)))]
        flip = bool(crop_rng.random() < self.hflip_prob)
        ops = self.randaugment.sample(rngs["randaugment"]) if self.randaugment is not None else []
        erase = sample_erase(rngs["erase"], self.crop_size, self.crop_size, self.erasing_prob)
        return Draws(box, resample, flip, ops, erase, rngs["erase"])

    def apply(self, img: Image.Image, draws: Draws) -> np.ndarray:
        top, left, h, w = draws.crop
        img = img.crop((left, top, left + w, top + h)).resize((self.crop_size, self.crop_size),
                                                               draws.resample)
        if draws.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            img = self.randaugment.apply(img, draws.ops)
        chw = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) * self.scale
        chw = np.ascontiguousarray((chw - self.mean) / self.std, dtype=np.float32)
        return _erase(chw, draws.erase, draws.noise_rng)

    def __call__(self, img: Image.Image, seed: int) -> np.ndarray:
        return self.apply(img, self.sample(seed, img.size))
