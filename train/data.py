"""Training and evaluation data: PaddleClas list files or class-per-folder trees, and their loaders.

A PaddleClas list file has ``relative/path.jpg label`` per line under an image root (PaddleClas's
``ImageNetDataset``); a class-per-folder tree has ``root/<class name>/<image>`` with class ids given by the
sorted folder names (torchvision's ``ImageFolder`` convention). The class-name file (``id name`` per
line, PaddleClas's label-list format, read by ``rexnet_serving.manifest.read_labels``) travels with the
trained model.

Decoding is ``rexnet_serving.imageio.decode_image`` for both training and evaluation, and evaluation
batches go through ``rexnet_serving.preprocess.preprocess``: the service's own code on the GPU, and within
one uint8 level (on ~5% of values) of its OpenCV path on the CPU, which is PaddleClas's exactly
(tests/test_preprocess.py), so the accuracy measured here is the accuracy the service delivers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import paddle
from PIL import Image

from rexnet_serving.imageio import ImageError, decode_image
from rexnet_serving.manifest import read_labels

from rexnet_train.augment import TrainTransform, derive_seed

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # what decode_image accepts


class DataError(ValueError):
    """A list file, folder tree, class-name file or image that cannot be used."""


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


def read_list_file(list_path: str, root: str) -> List[Sample]:
    """Parse a PaddleClas list file; every image must exist. Errors name the file and line."""
    if not os.path.isfile(list_path):
        raise DataError(f"list file not found: {list_path}")
    samples: List[Sample] = []
    with open(list_path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            # rsplit: the label is the last field, so image paths may contain spaces.
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].isdigit():
                raise DataError(f"{list_path}:{number}: expected '<relative/image/path> <label>' "
                                f"with a non-negative integer label, got {line!r}")
            path = os.path.join(root, parts[0])
            if not os.path.isfile(path):
                raise DataError(f"{list_path}:{number}: image not found: {path}")
            samples.append(Sample(path, int(parts[1])))
    if not samples:
        raise DataError(f"{list_path}: the list file has no samples")
    return samples


def scan_folder_tree(root: str) -> Tuple[List[Sample], List[str]]:
    """Samples and class names of ``root/<class>/<image>``; classes are the sorted folder names."""
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise DataError(f"{root}: no class folders (expected {root}/<class name>/<image>)")
    samples: List[Sample] = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        for dirpath, _, files in sorted(os.walk(folder)):
            samples += [Sample(os.path.join(dirpath, f), label) for f in sorted(files)
                        if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not samples:
        raise DataError(f"{root}: the class folders hold no images ({', '.join(IMAGE_EXTENSIONS)})")
    return samples, classes


def load_split(root: Optional[str], list_path: Optional[str], what: str) -> Tuple[List[Sample],
                                                                                   Optional[List[str]]]:
    """A split from a list file (no class names) or a folder tree (class names from folders)."""
    if not root:
        raise DataError(f"Data.{what}_root is not set")
    if list_path:
        return read_list_file(list_path, root), None
    return scan_folder_tree(root)


def load_class_names(path: str) -> List[str]:
    try:
        return read_labels(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"class-name file: {exc}") from None


def check_labels(samples: Sequence[Sample], class_num: int, source: str) -> None:
    bad = [s for s in samples if s.label >= class_num]
    if bad:
        raise DataError(f"{source}: label {bad[0].label} of {bad[0].path} is out of range for "
                        f"Arch.class_num={class_num} ({len(bad)} samples affected)")


def read_image(path: str) -> np.ndarray:
    """Decode a file with the service's decoder: HxWx3 uint8 RGB."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return decode_image(data)
    except ImageError as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from None


class TrainDataset(paddle.io.Dataset):
    """Augmented samples; the augmentation of sample i in epoch e depends only on (seed, e, i)."""

    def __init__(self, samples: Sequence[Sample], transform: TrainTransform, seed: int) -> None:
        super().__init__()
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        # DataLoader workers are forked per epoch (persistent_workers=False), so they see this value.
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        sample = self.samples[index]
        image = Image.fromarray(read_image(sample.path))
        chw = self.transform(image, derive_seed(self.seed, self.epoch, index))
        return chw, np.asarray(sample.label, dtype=np.int64)


class EvalDataset(paddle.io.Dataset):
    """Decoded, unprocessed images: the batch goes through the service's ``preprocess``."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        super().__init__()
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[np.ndarray, int]:
        sample = self.samples[index]
        return read_image(sample.path), sample.label


def _eval_collate(batch: Sequence[Tuple[np.ndarray, int]]) -> Tuple[List[np.ndarray], np.ndarray]:
    # Images keep their own sizes: resizing is preprocess()'s job, as in the service.
    return [image for image, _ in batch], np.asarray([label for _, label in batch], dtype=np.int64)


def train_loader(dataset: TrainDataset, batch_size: int, num_workers: int, world_size: int,
                 rank: int) -> Tuple[paddle.io.DataLoader, paddle.io.DistributedBatchSampler]:
    """Shuffled, per-rank shards of equal length (DistributedBatchSampler pads the last one)."""
    sampler = paddle.io.DistributedBatchSampler(dataset, batch_size=batch_size, num_replicas=world_size,
                                                rank=rank, shuffle=True, drop_last=False)
    loader = paddle.io.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                  use_shared_memory=num_workers > 0)
    return loader, sampler


def eval_loader(dataset: EvalDataset, batch_size: int, num_workers: int, world_size: int,
                rank: int) -> paddle.io.DataLoader:
    """Rank r evaluates samples r, r+W, r+2W, ...: no padding, so every sample is counted once.

    (DistributedBatchSampler would repeat samples to even out the shards, which is right for training
    and wrong for accuracy; evaluation runs no collective op per batch, so uneven shards are fine.)
    """
    shard = paddle.io.Subset(dataset, list(range(rank, len(dataset), world_size)))
    sampler = paddle.io.BatchSampler(shard, batch_size=batch_size, shuffle=False, drop_last=False)
    return paddle.io.DataLoader(shard, batch_sampler=sampler, num_workers=num_workers,
                                collate_fn=_eval_collate, use_shared_memory=False)
