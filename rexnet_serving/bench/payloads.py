"""The images a benchmark sends: real photos, JPEG-encoded once before the load starts.

By default scikit-learn's two bundled photographs (china.jpg, flower.jpg, 640x427; shipped inside the
wheel, so nothing downloads) at several sizes and both orientations, as a camera or a web upload would
give them; or every JPEG/PNG/BMP/WebP file of a directory (``--images DIR``). The bytes are read into
memory once, so the load generator never touches the disk or an encoder while timing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
JPEG_QUALITY = 90
# (width, height) of the generated photos: thumbnails to ~1 MP, landscape and portrait.
PHOTO_SIZES: Tuple[Tuple[int, int], ...] = ((320, 213), (480, 320), (640, 427), (427, 640),
                                            (800, 533), (1024, 683), (1200, 800))


class PayloadError(ValueError):
    """No usable images (empty directory, unreadable file, missing scikit-learn)."""


@dataclass(frozen=True)
class Payload:
    name: str
    data: bytes
    width: int
    height: int


def _sample_photo(name: str) -> np.ndarray:
    try:
        from sklearn.datasets import load_sample_image
    except ImportError:
        raise PayloadError("generating the benchmark photos needs scikit-learn (pip install "
                           "'rexnet-serving[bench]'), or pass --images DIR") from None
    return load_sample_image(f"{name}.jpg")


def generate_photos(directory: Path) -> List[Path]:
    """Write the default photo set into ``directory`` (deterministic bytes); the paths, in order."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("china", "flower"):
        rgb = _sample_photo(name)
        for width, height in PHOTO_SIZES:
            source = rgb if (width >= height) == (rgb.shape[1] >= rgb.shape[0]) else np.rot90(rgb)
            interpolation = cv2.INTER_AREA if width < source.shape[1] else cv2.INTER_CUBIC
            image = cv2.resize(np.ascontiguousarray(source), (width, height), interpolation=interpolation)
            ok, buf = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise PayloadError("OpenCV could not encode a JPEG")
            path = directory / f"{name}_{width}x{height}.jpg"
            path.write_bytes(buf.tobytes())
            paths.append(path)
    return paths


def load_payloads(directory: Path) -> List[Payload]:
    """Every image file of ``directory`` (sorted by name), checked to decode."""
    if not directory.is_dir():
        raise PayloadError(f"--images: {directory} is not a directory")
    payloads = []
    for path in sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        data = path.read_bytes()
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise PayloadError(f"--images: {path} is not a decodable image")
        payloads.append(Payload(path.name, data, image.shape[1], image.shape[0]))
    if not payloads:
        raise PayloadError(f"--images: no {'/'.join(IMAGE_SUFFIXES)} files in {directory}")
    return payloads


def describe(payloads: Sequence[Payload]) -> Dict[str, float]:
    """Size statistics for the report."""
    sizes = np.array([len(p.data) for p in payloads], np.float64)
    pixels = np.array([p.width * p.height for p in payloads], np.float64)
    return {"count": len(payloads), "mean_kb": round(float(sizes.mean()) / 1024, 1),
            "min_kb": round(float(sizes.min()) / 1024, 1), "max_kb": round(float(sizes.max()) / 1024, 1),
            "mean_megapixels": round(float(pixels.mean()) / 1e6, 3),
            "formats": sorted({Path(p.name).suffix.lower().lstrip(".") for p in payloads})}
