"""Test images: real photos in every size and encoding the service must take.

The photos are scikit-learn's two bundled sample images (china.jpg, flower.jpg: 640x427 RGB
photographs shipped inside the wheel, so nothing downloads). Tests import this module as
``from images import ...``: pytest puts tests/ on sys.path for test modules without __init__.py.
"""
from __future__ import annotations

import functools
import struct
from pathlib import Path
from typing import List, Optional, Tuple

import cv2
import numpy as np

PHOTOS = ("china", "flower")

# The encodings encode() writes: the service's formats plus PNG's colour modes that decode must convert.
FORMATS = ("jpeg", "png", "bmp", "webp", "png-gray", "png-palette", "png-16bit", "png-rgba")
SUFFIX = {"jpeg": ".jpg", "bmp": ".bmp", "webp": ".webp"}

# (photo, (width, height), format, encoder options): odd sizes, portrait and landscape, an upscale,
# a panorama, every format. Kept small enough that a parity sweep over all of them takes seconds.
PHOTO_SET: Tuple[Tuple[str, Optional[Tuple[int, int]], str, dict], ...] = (
    ("china", None, "jpeg", {"quality": 90}),
    ("flower", None, "jpeg", {"quality": 60}),
    ("china", (100, 80), "png", {}),
    ("flower", (257, 256), "bmp", {}),
    ("china", (333, 500), "webp", {"quality": 90}),
    ("flower", (1200, 900), "jpeg", {"quality": 95}),
    ("china", (1024, 256), "jpeg", {"quality": 85}),
    ("flower", (479, 321), "png-gray", {}),
    ("china", (300, 451), "png-palette", {}),
    ("flower", (321, 479), "png-16bit", {}),
    ("china", (256, 256), "png-rgba", {}),
)


@functools.lru_cache(maxsize=None)
def _sample(name: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; choose from {', '.join(PHOTOS)}")
    image = load_sample_image(f"{name}.jpg")
    image.setflags(write=False)
    return image


def photo(name: str = "china", size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """A real RGB uint8 photo, optionally resized (INTER_AREA) to size = (width, height)."""
    image = _sample(name)
    if size is None:
        return image.copy()
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _imencode(suffix: str, image: np.ndarray, params: Optional[List[int]] = None) -> bytes:
    ok, buf = cv2.imencode(suffix, image, params or [])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {suffix}")
    return buf.tobytes()


def encode(image: np.ndarray, fmt: str, **opts) -> bytes:
    """Encode an RGB uint8 image as fmt (one of FORMATS); opts: quality for jpeg/webp."""
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    if fmt == "jpeg":
        return _imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(opts.get("quality", 90))])
    if fmt == "webp":
        return _imencode(".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, int(opts.get("quality", 90))])
    if fmt in ("png", "bmp"):
        return _imencode("." + fmt, bgr)
    if fmt == "png-gray":
        return _imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
    if fmt == "png-16bit":
        # Full 16-bit range with low bits that differ from the high byte, so a decoder that took the
        # wrong byte would be caught.
        wide = bgr.astype(np.int32) * 257 + (np.arange(bgr.size, dtype=np.int32) % 251).reshape(bgr.shape)
        return _imencode(".png", np.clip(wide, 0, 65535).astype(np.uint16))
    if fmt == "png-rgba":
        h, w = image.shape[:2]
        alpha = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))
        return _imencode(".png", np.dstack([bgr, alpha]))
    if fmt == "png-palette":
        import io

        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(image).quantize(colors=64).save(buf, format="PNG")
        return buf.getvalue()
    raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


def bmp_strip(width: int, height: int = 1) -> bytes:
    """An uncompressed 24-bit BMP of width x height grey pixels, built without an encoder: any size, even
    one no decoder takes (OpenCV refuses a side over 2**20)."""
    row = (width * 24 + 31) // 32 * 4
    pixels = b"\x80" * (row * height)
    return (b"BM" + struct.pack("<IHHI", 54 + len(pixels), 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0) + pixels)


def make_photo_set(directory) -> List[Path]:
    """Write PHOTO_SET into directory (deterministic names and bytes); return the paths in order."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, size, fmt, opts in PHOTO_SET:
        image = photo(name, size)
        h, w = image.shape[:2]
        tag = f"_q{opts['quality']}" if "quality" in opts else ""
        path = directory / f"{name}_{w}x{h}_{fmt}{tag}{SUFFIX.get(fmt, '.png')}"
        path.write_bytes(encode(image, fmt, **opts))
        paths.append(path)
    return paths
