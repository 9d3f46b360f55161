"""Both preprocessing paths against a plain OpenCV/NumPy reference of PaddleClas's eval preprocessing, and
against each other: preprocess_opencv (the CPU-inference path) and preprocess (Paddle ops, the GPU path,
run here on the CPU).

The reference below is the only other copy of the preprocessing, and it lives here on purpose: it restates
ppcls ResizeImage(resize_short) + CropImage + NormalizeImage + ToCHWImage with cv2 and NumPy, as PaddleClas
runs them, so each library path is checked against the real thing, never against the other library path
alone.
"""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from images import make_photo_set, photo

from rexnet_serving.imageio import decode_image
from rexnet_serving.models import VARIANTS
from rexnet_serving.preprocess import PreprocessConfig, config_for, preprocess, preprocess_opencv, resized_size
from rexnet_serving.resize import MAX_RESIZE_BYTES, crop_window, resize_bytes, resized_window

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


# The two library paths, both returning NumPy here.
PATHS = {"opencv": preprocess_opencv, "paddle": lambda images, cfg: preprocess(images, cfg).numpy()}


def gray_expanded(name: str, size=None) -> np.ndarray:
    """A grayscale photo expanded to three equal channels, as decode_image hands over a gray PNG."""
    gray = cv2.cvtColor(photo(name, size), cv2.COLOR_RGB2GRAY)
    return np.repeat(gray[:, :, None], 3, axis=2)


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory):
    return [(path.name, decode_image(path.read_bytes()))
            for path in make_photo_set(tmp_path_factory.mktemp("photos"))]


# Sizes (width, height) beyond the photo set: exactly the crop, exactly the short side (square, landscape,
# portrait), 2x (OpenCV's area shortcut), tie-rounding of the long side (513 * 0.5 = 256.5), tiny images
# smaller than the crop (upscaled, down to one pixel), odd sizes, extreme aspect ratios and a large
# downscale where INTER_LINEAR skips pixels.
EXTRA_SIZES = [(224, 224), (256, 256), (256, 384), (640, 256), (512, 512), (513, 512), (1, 1), (2, 3), (7, 5),
               (31, 64), (100, 80), (223, 223), (225, 1000), (4000, 300), (2000, 1500), (300, 299), (333, 501),
               (257, 255), (999, 777), (640, 480)]


@pytest.fixture(scope="module")
def cases(photo_set):
    """(name, image): the decoded photo set (every format, incl. gray and palette PNGs), the extra sizes, and
    grayscale-expanded photos, one of them a zero-stride broadcast view."""
    gray = gray_expanded("flower", (479, 321))
    return (photo_set + [(f"china {w}x{h}", photo("china", (w, h))) for w, h in EXTRA_SIZES]
            + [("flower gray 479x321", gray), ("china gray 150x200", gray_expanded("china", (150, 200))),
               ("flower gray broadcast view", np.broadcast_to(gray[:, :, :1], gray.shape))])


def _compare(got: np.ndarray, want: np.ndarray, name: str, stats: list) -> None:
    diff = np.abs(got - want)
    assert got.shape == want.shape, name
    assert diff.max() <= MAX_ABS, (name, float(diff.max()))
    assert diff.mean() <= MEAN_ABS, (name, float(diff.mean()))
    stats.append((float(diff.max()), float(diff.mean()), float((diff > 1e-4).mean())))


def _summary(label: str, stats: list) -> str:
    worst, means, off = (np.array(column) for column in zip(*stats))
    return (f"{label} over {len(stats)} images: max abs diff {worst.max():.4f}, mean abs diff {means.mean():.6f} "
            f"(worst image {means.max():.6f}), {off.mean():.2%} of values one level off")


@pytest.mark.parametrize("path", sorted(PATHS))
def test_parity_with_paddleclas_on_real_photos(path, cases):
    stats: list = []
    for name, image in cases:
        _compare(PATHS[path]([image], CFG)[0], paddleclas_reference(image, CFG), name, stats)
    print("\n" + _summary(f"{path} vs PaddleClas", stats))
    # Paddle ops: the fitted rounding offset halves the one-level differences of a plain round (~8% of values).
    assert np.mean([s[2] for s in stats]) <= 0.06


def test_opencv_path_is_paddleclas_bit_for_bit(cases):
    # The same cv2.resize and NormalizeImage's own float32 arithmetic (tabulated per level): nothing to differ.
    for name, image in cases:
        np.testing.assert_array_equal(preprocess_opencv([image], CFG)[0], paddleclas_reference(image, CFG), name)


def test_the_two_paths_agree(cases):
    stats: list = []
    images = [image for _, image in cases]
    # One batch of every size at once, as a request of mixed photos arrives.
    opencv, paddle_ops = preprocess_opencv(images, CFG), preprocess(images, CFG).numpy()
    for (name, _), got, want in zip(cases, opencv, paddle_ops):
        _compare(got, want, name, stats)
    print("\n" + _summary("opencv vs paddle", stats))


def test_output_shape_dtype_and_place():
    images = [photo("china"), photo("flower")]
    batch = preprocess(images, CFG)
    assert batch.shape == [2, 3, 224, 224]
    assert batch.dtype == paddle.float32
    assert paddle.get_device() == "cpu" and batch.place.is_cpu_place()
    host = preprocess_opencv(images, CFG)
    assert isinstance(host, np.ndarray) and host.shape == (2, 3, 224, 224) and host.dtype == np.float32
    assert host.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("path", sorted(PATHS))
def test_mixed_sizes_in_one_batch_equal_one_by_one(path):
    images = [photo("china"), photo("flower", (333, 500)), photo("china", (100, 80)), photo("flower", (1024, 256))]
    batch = PATHS[path](images, CFG)
    for i, image in enumerate(images):
        np.testing.assert_array_equal(batch[i], PATHS[path]([image], CFG)[0])


def test_device_tensors_equal_numpy_images():
    images = [photo("china", (333, 500)), photo("flower")]
    from_numpy = preprocess(images, CFG).numpy()
    from_tensors = preprocess([paddle.to_tensor(image) for image in images], CFG).numpy()
    np.testing.assert_array_equal(from_tensors, from_numpy)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_non_contiguous_images_are_accepted(path):
    image = photo("china")
    view = image[:, ::-1]  # a mirrored view
    got = PATHS[path]([view], CFG)[0]
    np.testing.assert_array_equal(got, PATHS[path]([np.ascontiguousarray(view)], CFG)[0])
    diff = np.abs(got - paddleclas_reference(np.ascontiguousarray(view), CFG))
    assert diff.max() <= MAX_ABS and diff.mean() <= MEAN_ABS


@pytest.mark.parametrize("size", [(256, 256), (385, 256), (512, 512), (768, 768), (1536, 1024)],
                         ids=["same", "same-short", "half", "third", "quarter"])
def test_paddle_ops_exact_where_opencv_arithmetic_is_exact(size):
    # Unchanged sizes (cv::resize copies), exactly half size (it switches to INTER_AREA) and integer scales
    # (every output pixel sits on or halfway between source pixels) leave OpenCV no truncation to differ by.
    image = photo("flower", size)
    np.testing.assert_allclose(preprocess([image], CFG).numpy()[0], paddleclas_reference(image, CFG), atol=1e-5)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_parity_over_a_sweep_of_sizes(path):
    rng = np.random.default_rng(7)
    sizes = [(int(w), int(h)) for w, h in rng.integers(3, 1600, size=(24, 2))]
    stats: list = []
    for w, h in sizes:
        image = photo("flower" if w % 2 else "china", (w, h))
        _compare(PATHS[path]([image], CFG)[0], paddleclas_reference(image, CFG), f"{w}x{h}", stats)
    print("\n" + _summary(f"{path} vs PaddleClas, random sizes", stats))


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


# Every constant comes from the config (the manifest): other sizes, and other mean/std/scale, in both paths.
OTHER_CONFIGS = [PreprocessConfig(resize_short=256, crop_size=223), PreprocessConfig(resize_short=288, crop_size=250),
                 PreprocessConfig(resize_short=232, crop_size=224), PreprocessConfig(resize_short=64, crop_size=16),
                 PreprocessConfig(resize_short=9, crop_size=5),
                 PreprocessConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), scale=1 / 255.0),
                 PreprocessConfig(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale=1.0)]


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("cfg", OTHER_CONFIGS, ids=["223", "288-250", "232", "64-16", "9-5", "half", "raw"])
def test_other_configs(path, cfg):
    # A prime crop is one band of the Paddle-op path; others split into bands of the nearest divisor.
    # The bounds are in units of one uint8 level divided by the config's std and scale.
    level = cfg.scale / min(cfg.std)
    for image in (photo("china"), photo("flower", (333, 500))):
        got = PATHS[path]([image], cfg)[0]
        want = paddleclas_reference(image, cfg)
        diff = np.abs(got - want)
        assert got.shape == (3, cfg.crop_size, cfg.crop_size)
        assert diff.max() <= 1.01 * level and diff.mean() <= MEAN_ABS / MAX_ABS * level
        np.testing.assert_allclose(got, PATHS["paddle" if path == "opencv" else "opencv"]([image], cfg)[0],
                                   atol=1.01 * level)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("arch", sorted(VARIANTS))
def test_every_variant_config(path, arch):
    cfg = config_for(arch)
    image = photo("flower", (333, 500))
    got = PATHS[path]([image], cfg)
    assert got.shape == (1, 3, cfg.crop_size, cfg.crop_size)
    assert np.abs(got[0] - paddleclas_reference(image, cfg)).max() <= MAX_ABS


def test_resized_size_rounds_like_paddleclas():
    assert resized_size(640, 427, 256) == (384, 256)
    assert resized_size(333, 500, 256) == (256, 384)
    assert resized_size(513, 512, 256) == (256, 256)  # Python's round(256.5) is 256


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8),
                                 np.zeros((10, 10, 3), np.float32), np.zeros((0, 10, 3), np.uint8)],
                         ids=["gray", "rgba", "float", "empty"])
def test_bad_images_are_named(path, bad):
    with pytest.raises(ValueError, match="image 1"):
        PATHS[path]([photo("china", (32, 32)), bad], CFG)


def test_opencv_path_names_a_device_tensor():
    with pytest.raises(ValueError, match="image 1: the OpenCV path takes numpy arrays, got Tensor"):
        preprocess_opencv([photo("china", (32, 32)), paddle.to_tensor(photo("china", (32, 32)))], CFG)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_bad_requests(path):
    run = PATHS[path]
    with pytest.raises(ValueError, match="at least one"):
        run([], CFG)
    with pytest.raises(ValueError, match="bicubic"):
        run([photo()], PreprocessConfig(interpolation="bicubic"))
    with pytest.raises(ValueError, match="crop_size"):
        run([photo()], PreprocessConfig(resize_short=200, crop_size=224))


def test_batch_time_is_reported():
    # Reported, never asserted (speed targets stay out of tests); min of N: the machine may be shared.
    images = [photo("china" if i % 2 else "flower") for i in range(8)]
    for path in sorted(PATHS):
        for batch in (images[:1], images):
            PATHS[path](batch, CFG)
            times = []
            for _ in range(20):
                start = time.perf_counter()
                PATHS[path](batch, CFG)
                times.append(time.perf_counter() - start)
            print(f"\npreprocess {path}: batch of {len(batch)} 640x427 images on the CPU: "
                  f"min {min(times) / len(batch) * 1e3:.2f} ms per image, median {np.median(times) * 1e3:.1f} ms")


# -- extreme aspect ratios: what the resize may cost ---------------------------------------------------------
# Sizes (width, height) whose whole resized image is over MAX_RESIZE_BYTES, so the OpenCV path computes only
# the crop's window; each still small enough for the reference to resize the whole image here.
STRIPS = [(2000, 7), (7, 2000), (300, 1), (1, 300), (9000, 100), (100, 9000), (4099, 41), (1200, 3)]


def test_extreme_aspect_ratios_are_paddleclas_bit_for_bit():
    for width, height in STRIPS:
        assert resize_bytes(width, height, 256, 224) < 3 * np.prod(resized_size(width, height, 256)), (width, height)
        image = np.random.default_rng(width * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
        np.testing.assert_array_equal(preprocess_opencv([image], CFG)[0], paddleclas_reference(image, CFG),
                                      f"{width}x{height}")


def _sizes_for_the_window() -> list:
    rng = np.random.default_rng(11)
    sizes = [(1, 1), (2, 2), (5, 5), (1, 257), (257, 1), (3, 1000), (1000, 3), (224, 224), (256, 256),
             (640, 480), (480, 640), (512, 1024), (1024, 512), (1536, 1024), (4000, 512), (513, 512), (333, 777)]
    sizes += [(int(w), int(h)) for w, h in rng.integers(1, 1500, size=(40, 2))]
    sizes += [(int(w), 1 + int(w) // int(a)) for w, a in zip(rng.integers(50, 3000, 20), rng.integers(5, 60, 20))]
    return sizes


@pytest.mark.parametrize("cfg", [CFG, PreprocessConfig(resize_short=9, crop_size=5),
                                 PreprocessConfig(resize_short=288, crop_size=250),
                                 PreprocessConfig(resize_short=13, crop_size=13)],
                         ids=["256-224", "9-5", "288-250", "13-13"])
def test_the_crop_window_equals_cv2_resize_bit_for_bit(cfg):
    # The window is computed alone for any size (upscales, downscales, exact halves, borders), equal to
    # cv2.resize of the whole image cropped: so it may stand in for it wherever that would be too large.
    # A crop as wide as the resized image reaches the ends of its rows, where OpenCV's SIMD loop hands over
    # to its scalar tail.
    for width, height in _sizes_for_the_window():
        image = np.random.default_rng(width + 7 * height).integers(0, 256, (height, width, 3), dtype=np.uint8)
        new_w, new_h = resized_size(width, height, cfg.resize_short)
        top, left, crop = (new_h - cfg.crop_size) // 2, (new_w - cfg.crop_size) // 2, cfg.crop_size
        want = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)[top:top + crop, left:left + crop]
        np.testing.assert_array_equal(resized_window(image, (new_w, new_h), top, left, crop), want,
                                      f"{width}x{height}")


def test_the_resize_cost_is_bounded_for_every_shape():
    # The cost model, from the header's size alone: what the OpenCV path's resize holds for one image.
    assert resize_bytes(640, 427, 256, 224) == 3 * 384 * 256  # a photo: the whole resized image, as PaddleClas
    shapes = [(1, 1), (1, 2**20), (2**20, 1), (20000, 1), (1, 20000), (40, 1_000_000), (1_000_000, 40),
              (6000, 6000), (8000, 5000), (2**20, 38), (300, 1)]
    for resize_short, crop in ((256, 224), (288, 250), (320, 295)):
        for width, height in shapes:
            assert resize_bytes(width, height, resize_short, crop) <= MAX_RESIZE_BYTES, (width, height, crop)


_STRIPS_UNDER_A_MEMORY_LIMIT = """
import resource, sys
import numpy as np
from rexnet_serving.preprocess import PreprocessConfig, preprocess_opencv
size = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + 512 * 2**20, resource.RLIM_INFINITY))
for width, height in ((20000, 1), (1, 20000), (2**20, 1), (1, 2**20), (2**20, 38)):
    image = np.full((height, width, 3), 77, np.uint8)
    batch = preprocess_opencv([image], PreprocessConfig())
    assert batch.shape == (1, 3, 224, 224), batch.shape
print("ok")
"""


def test_one_pixel_strips_preprocess_within_half_a_gigabyte():
    """A 20000x1 image (a 200-byte PNG) once cost 256 * 20000 * 256 * 3 = 3.9 GB of resized pixels: here a
    child process may map only 512 MB more than it has, and every strip up to OpenCV's longest side passes."""
    import subprocess
    import sys
    from conftest import REPO_ROOT
    run = subprocess.run([sys.executable, "-c", _STRIPS_UNDER_A_MEMORY_LIMIT], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_the_two_paths_agree_on_strips():
    # The Paddle-op path computes only the crop's window by construction; on strips it agrees with the
    # OpenCV path within one level, as on photos.
    for width, height in ((20000, 1), (1, 20000), (3000, 2), (2, 3000)):
        image = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
        diff = np.abs(preprocess([image], CFG).numpy() - preprocess_opencv([image], CFG))
        assert diff.max() <= MAX_ABS, (width, height, float(diff.max()))


def test_the_cost_model_holds_what_the_resize_allocates():
    # NumPy and OpenCV's Python arrays report their buffers to tracemalloc: the model is checked, not trusted.
    import tracemalloc
    for width, height in ((640, 427), (427, 640), (4000, 3000), (20000, 1), (1, 20000), (9000, 100), (3, 1)):
        image = np.full((height, width, 3), 9, np.uint8)
        tracemalloc.start()
        crop_window(image, 256, 224)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak <= resize_bytes(width, height, 256, 224) + 65536, (width, height, peak)
