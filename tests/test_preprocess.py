"""preprocess() against a plain OpenCV/NumPy reference of PaddleClas's eval preprocessing.

The reference below is the only other copy of the preprocessing, and it lives here on purpose: it restates
ppcls ResizeImage(resize_short) + CropImage + NormalizeImage + ToCHWImage with cv2 and NumPy, as PaddleClas
runs them, so the Paddle-op implementation is checked against the real thing.
"""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from images import make_photo_set, photo

from rexnet_serving.imageio import decode_image
from rexnet_serving.models import VARIANTS
from rexnet_serving.preprocess import PreprocessConfig, config_for, preprocess, resized_size

import paddle  # noqa: E402  (after imageio: see its note on libpaddle's zlib)

MAX_ABS = 0.018  # one uint8 level is 1/255/0.225 = 0.0174 in normalised units
MEAN_ABS = 0.003
CFG = PreprocessConfig()


def paddleclas_reference(image: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """ppcls eval ops on one HWC uint8 RGB image, in OpenCV and NumPy: a CHW float32 array."""
    h, w = image.shape[:2]
    percent = float(cfg.resize_short) / min(w, h)
    new_w, new_h = int(round(w * percent)), int(round(h * percent))
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    left, top = (new_w - cfg.crop_size) // 2, (new_h - cfg.crop_size) // 2
    crop = resized[top:top + cfg.crop_size, left:left + cfg.crop_size, :]
    mean = np.array(cfg.mean).reshape((1, 1, 3)).astype("float32")
    std = np.array(cfg.std).reshape((1, 1, 3)).astype("float32")
    normalized = (crop.astype("float32") * np.float32(cfg.scale) - mean) / std
    return normalized.transpose((2, 0, 1))


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory):
    return [(path.name, decode_image(path.read_bytes()))
            for path in make_photo_set(tmp_path_factory.mktemp("photos"))]


# Sizes (width, height) beyond the photo set: exactly the crop, exactly the short side, 2x (OpenCV's
# area shortcut), tie-rounding of the long side (513 * 0.5 = 256.5), tiny upscales, extreme aspect ratios
# and a large downscale where INTER_LINEAR skips pixels.
EXTRA_SIZES = [(224, 224), (256, 256), (512, 512), (513, 512), (7, 5), (31, 64), (225, 1000), (4000, 300),
               (2000, 1500), (300, 299), (640, 480)]


def test_parity_with_paddleclas_over_the_photo_set(photo_set):
    cases = photo_set + [(f"china {w}x{h}", photo("china", (w, h))) for w, h in EXTRA_SIZES]
    worst_max, means, off = 0.0, [], []
    for name, image in cases:
        got = preprocess([image], CFG).numpy()[0]
        want = paddleclas_reference(image, CFG)
        diff = np.abs(got - want)
        print(f"{name:40s} {image.shape[1]:5d}x{image.shape[0]:<5d} max {diff.max():.4f} mean {diff.mean():.6f}")
        assert diff.max() <= MAX_ABS, name
        assert diff.mean() <= MEAN_ABS, name
        worst_max = max(worst_max, float(diff.max()))
        means.append(float(diff.mean()))
        off.append(float((diff > 1e-4).mean()))
    print(f"parity over {len(cases)} images: max abs diff {worst_max:.4f}, mean abs diff {np.mean(means):.6f}, "
          f"{np.mean(off):.2%} of values one level off")
    # The fitted rounding offset halves the one-level differences of a plain round (~8% of values).
    assert np.mean(off) <= 0.06


def test_output_shape_dtype_and_place():
    batch = preprocess([photo("china"), photo("flower")], CFG)
    assert batch.shape == [2, 3, 224, 224]
    assert batch.dtype == paddle.float32
    assert paddle.get_device() == "cpu" and batch.place.is_cpu_place()


def test_mixed_sizes_in_one_batch_equal_one_by_one():
    images = [photo("china"), photo("flower", (333, 500)), photo("china", (100, 80)), photo("flower", (1024, 256))]
    batch = preprocess(images, CFG).numpy()
    for i, image in enumerate(images):
        np.testing.assert_array_equal(batch[i], preprocess([image], CFG).numpy()[0])


def test_device_tensors_equal_numpy_images():
    images = [photo("china", (333, 500)), photo("flower")]
    from_numpy = preprocess(images, CFG).numpy()
    from_tensors = preprocess([paddle.to_tensor(image) for image in images], CFG).numpy()
    np.testing.assert_array_equal(from_tensors, from_numpy)


def test_non_contiguous_images_are_accepted():
    image = photo("china")
    view = image[:, ::-1]  # a mirrored view
    got = preprocess([view], CFG).numpy()[0]
    np.testing.assert_array_equal(got, preprocess([np.ascontiguousarray(view)], CFG).numpy()[0])
    diff = np.abs(got - paddleclas_reference(np.ascontiguousarray(view), CFG))
    assert diff.max() <= MAX_ABS and diff.mean() <= MEAN_ABS


@pytest.mark.parametrize("size", [(256, 256), (385, 256), (512, 512), (768, 768), (1536, 1024)],
                         ids=["same", "same-short", "half", "third", "quarter"])
def test_exact_where_opencv_arithmetic_is_exact(size):
    # Unchanged sizes (cv::resize copies), exactly half size (it switches to INTER_AREA) and integer scales
    # (every output pixel sits on or halfway between source pixels) leave OpenCV no truncation to differ by.
    image = photo("flower", size)
    np.testing.assert_allclose(preprocess([image], CFG).numpy()[0], paddleclas_reference(image, CFG), atol=1e-5)


def test_parity_over_a_sweep_of_sizes():
    rng = np.random.default_rng(7)
    sizes = [(int(w), int(h)) for w, h in rng.integers(3, 1600, size=(24, 2))]
    worst_max, means = 0.0, []
    for w, h in sizes:
        image = photo("flower" if w % 2 else "china", (w, h))
        diff = np.abs(preprocess([image], CFG).numpy()[0] - paddleclas_reference(image, CFG))
        assert diff.max() <= MAX_ABS, (w, h)
        assert diff.mean() <= MEAN_ABS, (w, h)
        worst_max, means = max(worst_max, float(diff.max())), means + [float(diff.mean())]
    print(f"parity over {len(sizes)} random sizes: max abs diff {worst_max:.4f}, mean abs diff {np.mean(means):.6f}")


def test_runs_of_one_size_equal_one_by_one():
    # Consecutive same-size images share one set of ops; the result must not depend on the company.
    images = [photo("china"), photo("flower"), photo("china", (2000, 1500)), photo("flower", (2000, 1500)),
              photo("china")]
    batch = preprocess(images, CFG).numpy()
    for i, image in enumerate(images):
        np.testing.assert_array_equal(batch[i], preprocess([image], CFG).numpy()[0])


def test_device_tensors_mixed_with_numpy_images():
    # Large downscales upload only the tapped rows and columns (a gather on the device).
    images = [photo("china", (2000, 1500)), photo("flower", (2000, 1500)), photo("china", (31, 64))]
    from_numpy = preprocess(images, CFG).numpy()
    mixed = [images[0], paddle.to_tensor(images[1]), paddle.to_tensor(images[2])]
    np.testing.assert_array_equal(preprocess(mixed, CFG).numpy(), from_numpy)


@pytest.mark.parametrize("resize_short,crop", [(256, 223), (288, 250), (232, 224), (64, 16), (9, 5)])
def test_other_crop_sizes(resize_short, crop):
    # A prime crop is one band; others split into bands of the nearest divisor.
    cfg = PreprocessConfig(resize_short=resize_short, crop_size=crop)
    for image in (photo("china"), photo("flower", (333, 500))):
        got = preprocess([image], cfg).numpy()[0]
        diff = np.abs(got - paddleclas_reference(image, cfg))
        assert got.shape == (3, crop, crop)
        assert diff.max() <= MAX_ABS and diff.mean() <= MEAN_ABS


@pytest.mark.parametrize("arch", sorted(VARIANTS))
def test_every_variant_config(arch):
    cfg = config_for(arch)
    image = photo("flower", (333, 500))
    got = preprocess([image], cfg).numpy()
    assert got.shape == (1, 3, cfg.crop_size, cfg.crop_size)
    assert np.abs(got[0] - paddleclas_reference(image, cfg)).max() <= MAX_ABS


def test_resized_size_rounds_like_paddleclas():
    assert resized_size(640, 427, 256) == (384, 256)
    assert resized_size(333, 500, 256) == (256, 384)
    assert resized_size(513, 512, 256) == (256, 256)  # Python's round(256.5) is 256


@pytest.mark.parametrize("bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8),
                                 np.zeros((10, 10, 3), np.float32), np.zeros((0, 10, 3), np.uint8)],
                         ids=["gray", "rgba", "float", "empty"])
def test_bad_images_are_named(bad):
    with pytest.raises(ValueError, match="image 1"):
        preprocess([photo("china", (32, 32)), bad], CFG)


def test_bad_requests():
    with pytest.raises(ValueError, match="at least one"):
        preprocess([], CFG)
    with pytest.raises(ValueError, match="bicubic"):
        preprocess([photo()], PreprocessConfig(interpolation="bicubic"))
    with pytest.raises(ValueError, match="crop_size"):
        preprocess([photo()], PreprocessConfig(resize_short=200, crop_size=224))


def test_batch_time_is_reported():
    images = [photo("china" if i % 2 else "flower") for i in range(8)]
    for batch in (images[:1], images):
        preprocess(batch, CFG)
        times = []
        for _ in range(10):
            start = time.perf_counter()
            preprocess(batch, CFG).numpy()
            times.append(time.perf_counter() - start)
        print(f"\npreprocess: batch of {len(batch)} 640x427 images on {paddle.get_device()}: "
              f"median {np.median(times) * 1e3:.1f} ms")
