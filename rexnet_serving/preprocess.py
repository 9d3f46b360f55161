"""Image preprocessing: PaddleClas's eval preprocessing in two implementations, one per inference device.

PaddleClas's eval pipeline for ReXNet (ppcls/data/preprocess/ops/operators.py): decode to RGB (imageio),
ResizeImage(resize_short=256): scale so the short side is 256, each side int(round(side * 256 / short)),
with cv2.resize INTER_LINEAR; CropImage(224): the centre crop starting at ((w - 224) // 2, (h - 224) // 2);
NormalizeImage: (x * 1/255 - mean) / std per RGB channel in float32; ToCHWImage.

Why two paths, and which runs where (rexnet_serving.classifier.preprocess_images picks by the inference
device; the constants of both come from one PreprocessConfig, the export's manifest):

- preprocess_opencv(), when inference runs on the CPU: PaddleClas's own arithmetic on the host, a NumPy
  batch. cv2.resize of the whole image (its cost follows the output size, ~0.1 ms for a photo; resizing
  only the crop's window with another call cannot reproduce resize's source coordinates exactly), the crop
  as a view, then per channel one cv2.LUT pass from uint8 levels straight into the preallocated
  [N, 3, S, S] batch: the 256-entry table holds NormalizeImage's float32 result for each level, so the
  output equals PaddleClas's exactly. Measured on this 2-core CPU (min of 40, noisy shared machine), the
  fastest of: NumPy (x - mean) * inv_std then a CHW copy (~0.6 ms/image), two NumPy ufunc passes per
  channel (~0.2), cv2.addWeighted per channel (~0.17), cv2.dnn.blobFromImagesWithParams (~0.17 at batch 1,
  slower at 8), the LUT (~0.16, bit-exact).
  Extreme aspect ratios are the exception: a 20000x1 strip would resize to 256 x 5,120,000 pixels
  (3.9 GB) for one 224 x 224 crop, so past rexnet_serving.resize.MAX_RESIZE_BYTES only the crop's window
  is computed (rexnet_serving.resize.crop_window: the same result bit for bit, bounded by the crop).
- preprocess(), when it runs on the GPU: Paddle ops on the current device (paddle.get_device()), so a GPU
  service never copies pixels back to the host, and images decoded by nvJPEG stay on the device. It is
  also what training evaluation uses (a tensor for the Paddle model). On the CPU it costs over 10x the OpenCV
  path (Paddle's per-op overhead), which is why the CPU path does not use it.

The Paddle-op path follows OpenCV's uint8 INTER_LINEAR: output pixel d maps to source
(d + 0.5) * src / dst - 0.5 (clamped at the borders) and blends its two neighbours with OpenCV's integer
weights (multiples of 1/2048, INTER_RESIZE_COEF_BITS = 11), computed for the crop window only. Bilinear
resizing is separable, so the crop of one image is two matrix products, Ry @ X @ Rx^T, with small
interpolation matrices holding those weights: GEMMs are the best-optimised ops on both the CPU (MKL) and the
GPU, where Paddle's elementwise CPU kernels cost more than the arithmetic they do. The vertical pass is
banded (each block of 32 output rows multiplies only the source rows it taps), the horizontal pass starts
its accumulator at the rounding offset (addmm). The sums of the whole batch are then floored to uint8
levels and normalised by one per-channel op (batch_norm in inference mode).

The sums are exact but OpenCV's fixed point is not: its SIMD vertical pass truncates each row product, so
it sometimes rounds a quarter level low. A rounding offset fitted to that (see _TWO_TAP_ROUNDING) leaves
~5% of pixels one level off cv2.resize on photos (never more than one level; mean abs diff ~0.001 in
normalised units), and none at unchanged sizes and integer scales. (Replaying the fixed point exactly took
~15 int32 elementwise ops per pixel, 5-10x slower on the CPU.) Like OpenCV's INTER_LINEAR (unlike INTER_AREA
or PIL), nothing is antialiased when downscaling.

GPU note (untested here, no GPU): with TF32 matmuls (Paddle's default on Ampere and later) the second pass
rounds its input to 11 significant bits, up to 1/16 level: still within one level of OpenCV.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from .resize import COEF_SCALE, crop_window, linear_taps, resized_size

if TYPE_CHECKING:
    import paddle

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


# OpenCV's vector vertical pass floors each of its two row products (mulhi) before rounding their sum, which
# often lowers a result by a quarter level; rounding the exact sum a little low there (x + 0.375, not x + 0.5)
# is the best single threshold (measured against cv2.resize on photos) and halves the one-level differences.
_TWO_TAP_ROUNDING = 0.375
_HALF = 0.5
_BAND_ROWS = 32  # output rows per band of the vertical pass: big enough for MKL, small enough to skip zeros
_PLAN_CACHE = 32  # plans per (source size, device): a batch of phone photos shares a handful of sizes

Selection = Union[slice, np.ndarray]


def _band_rows(crop: int) -> int:
    """Rows per band: the divisor of crop nearest _BAND_ROWS within a factor of two, else one band."""
    divisors = [d for d in range(_BAND_ROWS // 2, 2 * _BAND_ROWS + 1) if crop % d == 0]
    return min(divisors, key=lambda d: abs(d - _BAND_ROWS)) if divisors else crop


def _row_bands(src: int, dst: int, crop: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The vertical pass: the source rows to upload (one equal-height band per block of output rows: the rows
    the block taps, repeated at the end to pad), the [bands, rows per band, band height] weight blocks, and the
    rounding offset of each output row.

    A band holds at most 2 * rows-per-band source rows whatever the scale (a downscale skips rows).
    """
    low, high, w_low, w_high, clamped = linear_taps(src, dst, (dst - crop) // 2, crop)
    block = _band_rows(crop)
    bands = crop // block
    taps = [np.unique(np.concatenate([low[i:i + block], high[i:i + block]])) for i in range(0, crop, block)]
    height = max(len(band) for band in taps)
    rows = np.concatenate([np.pad(band, (0, height - len(band)), mode="edge") for band in taps])
    weights = np.zeros((bands, block, height), np.float32)
    band, row = np.divmod(np.arange(crop), block)
    # Each tap's position in its band: one search over all bands, each band's rows offset past the previous.
    keys = (np.arange(bands)[:, None] * src + rows.reshape(bands, height)).reshape(-1)
    for tap, weight in ((low, w_low), (high, w_high)):
        position = np.searchsorted(keys, band * src + tap) - band * height
        # add.at, not assignment: at a clamped border both taps are the same row (weights 2048 and 0).
        np.add.at(weights, (band, row, position), weight / np.float32(COEF_SCALE))
    # Measured against cv2.resize: a row on a source row (weights 2048, 0) or halfway between two (1024, 1024:
    # even integer scales) rounds at one half like the scalar code, except where the edge clamps it.
    exact = ((w_high == 0) | (w_high == COEF_SCALE // 2)) & ~clamped
    return rows, weights, np.where(exact, _HALF, _TWO_TAP_ROUNDING).astype(np.float32)


def _columns(src: int, dst: int, crop: int) -> Tuple[Selection, np.ndarray]:
    """The horizontal pass: the source columns to upload and the [columns, crop] weight matrix over them.

    The columns are the crop's window, or only the columns it taps when that is fewer (a downscale by more
    than 2x skips columns), so the matrix stays at most 2 * crop tall whatever the photo's size.
    """
    low, high, w_low, w_high, _ = linear_taps(src, dst, (dst - crop) // 2, crop)
    start, stop = int(low[0]), int(high[-1]) + 1
    tapped = np.unique(np.concatenate([low, high]))
    select: Selection = tapped if len(tapped) < stop - start else slice(start, stop)
    lines = tapped if isinstance(select, np.ndarray) else np.arange(start, stop)
    weights = np.zeros((len(lines), crop), np.float32)
    out = np.arange(crop)
    np.add.at(weights, (np.searchsorted(lines, low), out), w_low / np.float32(COEF_SCALE))
    np.add.at(weights, (np.searchsorted(lines, high), out), w_high / np.float32(COEF_SCALE))
    return select, weights


@dataclass(frozen=True)
class _Plan:
    """Everything that resizes and crops one source size on one device: floor(Ry @ X @ Rx^T + offset)."""
    rows: np.ndarray  # the band rows, in band order
    cols: Selection
    width: int  # number of columns uploaded
    row_index: "paddle.Tensor"  # rows and cols (when a gather) on the device, for device images
    col_index: Optional["paddle.Tensor"]
    ry: "paddle.Tensor"  # [bands, rows per band, band height]
    rx_t: "paddle.Tensor"  # [width, crop]
    offset: "paddle.Tensor"  # [3 * crop, 1]: the rounding offset of each output row, per channel


@functools.lru_cache(maxsize=_PLAN_CACHE)
def _plan(height: int, width: int, resize_short: int, crop: int, device: str) -> _Plan:
    import paddle
    new_w, new_h = resized_size(width, height, resize_short)
    rows, ry, offset = _row_bands(height, new_h, crop)
    cols, rx_t = _columns(width, new_w, crop)
    if width == 2 * new_w and height == 2 * new_h:
        # cv::resize switches INTER_LINEAR to INTER_AREA at exactly half size: (a + b + c + d + 2) >> 2.
        offset = np.full(crop, _HALF, np.float32)
    col_index = None if isinstance(cols, slice) else paddle.to_tensor(cols)
    return _Plan(rows, cols, rx_t.shape[0], paddle.to_tensor(rows), col_index, paddle.to_tensor(ry),
                 paddle.to_tensor(rx_t), paddle.to_tensor(np.tile(offset, 3).reshape(-1, 1)))


@functools.lru_cache(maxsize=8)
def _moments(cfg: PreprocessConfig, device: str) -> Tuple["paddle.Tensor", "paddle.Tensor"]:
    """batch_norm's running mean and variance that make it (x * scale - mean) / std on 0..255 levels."""
    import paddle
    scale = np.float64(np.float32(cfg.scale))
    mean = np.asarray(cfg.mean, np.float64) / scale
    std = np.asarray(cfg.std, np.float64) / scale
    return paddle.to_tensor(mean.astype(np.float32)), paddle.to_tensor((std ** 2).astype(np.float32))


def _stage(image: Union[np.ndarray, "paddle.Tensor"], plan: _Plan) -> "paddle.Tensor":
    """The pixels the crop needs, [3, band rows, width] uint8 on the device.

    A host image is cut and made channels-first by NumPy before its upload (Paddle's CPU transpose of uint8
    is ~30x slower, and only the needed bytes travel); a device image is cut and transposed by Paddle where
    it is.
    """
    import paddle
    if isinstance(image, np.ndarray):
        if isinstance(plan.cols, slice):
            window = image[:, plan.cols][plan.rows]
        else:
            window = image[np.ix_(plan.rows, plan.cols)]
        return paddle.to_tensor(np.ascontiguousarray(window.transpose(2, 0, 1)))
    window = paddle.gather(image, plan.row_index, axis=0)
    window = window[:, plan.cols] if plan.col_index is None else paddle.gather(window, plan.col_index, axis=1)
    return paddle.transpose(window, [2, 0, 1])


def _shape_of(image: Union[np.ndarray, "paddle.Tensor"], index: int) -> Tuple[int, int]:
    shape = tuple(image.shape)
    dtype = str(image.dtype)
    if len(shape) != 3 or shape[2] != 3 or not dtype.endswith("uint8") or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"image {index}: expected an H x W x 3 uint8 RGB image, got shape {list(shape)} {dtype}")
    return shape[0], shape[1]


def _check_config(cfg: PreprocessConfig) -> None:
    if cfg.interpolation != "bilinear" or cfg.channel_order != "RGB":
        raise ValueError(f"preprocess implements bilinear resizing of RGB images, not {cfg.interpolation!r} "
                         f"{cfg.channel_order!r}")
    if not 0 < cfg.crop_size <= cfg.resize_short:
        raise ValueError(f"crop_size {cfg.crop_size} must be positive and at most resize_short {cfg.resize_short}")


def _check_batch(images: Sequence[Any], cfg: PreprocessConfig) -> List[Tuple[int, int]]:
    """(height, width) of every image, after checking the config and every image (named by its index)."""
    _check_config(cfg)
    if len(images) == 0:
        raise ValueError("preprocess needs at least one image")
    return [_shape_of(image, index) for index, image in enumerate(images)]


@functools.lru_cache(maxsize=8)
def _level_tables(cfg: PreprocessConfig) -> Tuple[np.ndarray, ...]:
    """Per RGB channel, a [256, 1] float32 table: NormalizeImage's (x * scale - mean) / std of each uint8 level,
    in its own float32 arithmetic, so looking a level up gives PaddleClas's value bit for bit."""
    levels = np.arange(256, dtype=np.float32)[:, None]
    table = (levels * np.float32(cfg.scale) - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return tuple(np.ascontiguousarray(table[:, channel:channel + 1]) for channel in range(3))


def preprocess_opencv(images: Sequence[np.ndarray], cfg: PreprocessConfig) -> np.ndarray:
    """PaddleClas's eval preprocessing on the host, as PaddleClas computes it: [N, 3, crop, crop] float32 NumPy.

    The CPU-inference path (see the module docstring). images: H x W x 3 uint8 RGB numpy arrays (decode_image);
    sizes may differ, views are fine.
    """
    for index, image in enumerate(images):
        if not isinstance(image, np.ndarray):
            raise ValueError(f"image {index}: the OpenCV path takes numpy arrays, got {type(image).__name__} "
                             "(device tensors go through preprocess())")
    _check_batch(images, cfg)
    crop, tables = cfg.crop_size, _level_tables(cfg)
    out = np.empty((len(images), 3, crop, crop), np.float32)
    for image, planes in zip(images, out):
        window = crop_window(image, cfg.resize_short, crop)
        # One pass per channel from uint8 levels into the batch: OpenCV writes into a dst of the right
        # shape and type in place (each plane of the batch is a contiguous crop x crop float32 array).
        for channel, table, plane in zip(cv2.split(window), tables, planes):
            cv2.LUT(channel, table, dst=plane)
    return out


def preprocess(images: Sequence[Union[np.ndarray, "paddle.Tensor"]], cfg: PreprocessConfig) -> "paddle.Tensor":
    """PaddleClas's eval preprocessing of a batch: N float32 CHW crops, [N, 3, crop, crop], on the current device.

    The GPU-inference path, and training evaluation's (see the module docstring). images: H x W x 3 uint8 RGB
    numpy arrays (decode_image) or uint8 tensors already on the device (decode_jpeg_on_device); sizes may
    differ. Only the source rows and columns the crop needs are copied to the device.
    """
    import paddle
    import paddle.nn.functional as F
    sizes = _check_batch(images, cfg)
    device, crop = paddle.get_device(), cfg.crop_size
    crops = []
    # One image at a time: batching the GEMMs of same-size images was measured slower (cache-bound).
    for image, (height, width) in zip(images, sizes):
        plan = _plan(height, width, cfg.resize_short, crop, device)
        bands, _, band_height = plan.ry.shape
        pixels = _stage(image, plan).astype("float32").reshape([3, bands, band_height, plan.width])
        vertical = paddle.matmul(plan.ry, pixels).reshape([3 * crop, plan.width])
        crops.append(paddle.addmm(plan.offset, vertical, plan.rx_t).reshape([1, 3, crop, crop]))
    levels = paddle.floor(crops[0] if len(crops) == 1 else paddle.concat(crops))
    running_mean, running_var = _moments(cfg, device)
    # (x * scale - mean) / std as one per-channel op: Paddle's CPU kernels broadcast slowly.
    return F.batch_norm(levels, running_mean, running_var, training=False, epsilon=0.0)
