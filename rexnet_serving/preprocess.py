"""Image preprocessing: the one implementation used by evaluation, the offline predictor and the service.

PaddleClas's eval pipeline for ReXNet (ppcls/data/preprocess/ops/operators.py): decode to RGB (imageio),
ResizeImage(resize_short=256): scale so the short side is 256, each side int(round(side * 256 / short)),
with cv2.resize INTER_LINEAR; CropImage(224): the centre crop starting at ((w - 224) // 2, (h - 224) // 2);
NormalizeImage: (x * 1/255 - mean) / std per RGB channel in float32; ToCHWImage.

preprocess() does all of it as Paddle ops on the current device (paddle.get_device()), so a GPU service
never copies pixels back to the host. It reproduces OpenCV's uint8 INTER_LINEAR, not a float resize:
OpenCV maps output pixel d to source (d + 0.5) * src / dst - 0.5 (clamped at the borders), weighs the two
neighbours with integer weights summing to 2048 (INTER_RESIZE_COEF_BITS = 11) and rounds back to uint8 in
fixed point. Here the same taps and weights are computed for the crop window only, the four neighbours of
each output pixel are gathered from the rows and columns the crop needs, and the fixed-point arithmetic is
replayed in int32, so the crop equals cv2.resize's pixels (a float resize differs by one level on ~10% of
them). Like OpenCV's INTER_LINEAR (unlike INTER_AREA or PIL), nothing is antialiased when downscaling.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Sequence, Tuple, Union

import numpy as np

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


_COEF_SCALE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE: bilinear weights are multiples of 1/2048


def resized_size(width: int, height: int, resize_short: int) -> Tuple[int, int]:
    """(width, height) after PaddleClas's ResizeImage(resize_short): Python round() on each side."""
    percent = float(resize_short) / min(width, height)
    return int(round(width * percent)), int(round(height * percent))


def _taps(src: int, dst: int, start: int, count: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and integer weights (summing to 2048) of output pixels start..start+count along one axis.

    OpenCV's resize computes the position in float32 from a double scale, floors it and clamps both ends to
    the edge pixel with weight 0 on the missing neighbour; the weights are saturate_cast (round to nearest).
    """
    scale = 1.0 / (float(dst) / src)
    pos = ((np.arange(start, start + count, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    left = np.floor(pos)
    frac = pos - left
    left = left.astype(np.int64)
    low, high = left < 0, left >= src - 1
    frac[low | high] = 0
    left[low] = 0
    left[high] = src - 1
    right = np.minimum(left + 1, src - 1)
    w_right = np.rint(frac * np.float32(_COEF_SCALE)).astype(np.int32)
    w_left = np.rint((np.float32(1) - frac) * np.float32(_COEF_SCALE)).astype(np.int32)
    return left, right, w_left, w_right


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


def preprocess(images: Sequence[Union[np.ndarray, "paddle.Tensor"]], cfg: PreprocessConfig) -> "paddle.Tensor":
    """PaddleClas's eval preprocessing of a batch: N float32 CHW crops, [N, 3, crop, crop], on the current device.

    images: H x W x 3 uint8 RGB numpy arrays (decode_image) or uint8 tensors already on the device
    (decode_jpeg_on_device); sizes may differ. Only the source rows and columns the crop needs are copied
    to the device.
    """
    import paddle
    _check_config(cfg)
    if len(images) == 0:
        raise ValueError("preprocess needs at least one image")
    crop, n = cfg.crop_size, len(images)
    quads: List["paddle.Tensor"] = []
    weights_y, weights_x = np.empty((2, n, 1, crop, 1), np.int32), np.empty((2, n, 1, 1, crop), np.int32)
    for index, image in enumerate(images):
        height, width = _shape_of(image, index)
        new_w, new_h = resized_size(width, height, cfg.resize_short)
        y0, y1, weights_y[0, index, 0, :, 0], weights_y[1, index, 0, :, 0] = _taps(
            height, new_h, (new_h - crop) // 2, crop)
        x0, x1, weights_x[0, index, 0, 0], weights_x[1, index, 0, 0] = _taps(width, new_w, (new_w - crop) // 2, crop)
        top, left = int(y0[0]), int(x0[0])
        window = image[top:int(y1[-1]) + 1, left:int(x1[-1]) + 1]
        # Channels first from here on (the output layout); a host image is transposed before its upload.
        if isinstance(window, np.ndarray):
            window = paddle.to_tensor(np.ascontiguousarray(window.transpose(2, 0, 1)))
        else:
            window = paddle.transpose(window, [2, 0, 1])
        # Rows y0 then y1, and within them columns x0 then x1: the four quadrants of the result are the
        # top-left, top-right, bottom-left and bottom-right neighbours of every output pixel.
        rows = paddle.gather(window, paddle.to_tensor(np.concatenate([y0, y1]) - top), axis=1)
        quads.append(paddle.gather(rows, paddle.to_tensor(np.concatenate([x0, x1]) - left), axis=2))
    shape = [n, 3, crop, crop]
    upper_half, lower_half = paddle.split(paddle.stack(quads).astype("int32"), 2, axis=2)
    q00, q01 = paddle.split(upper_half, 2, axis=3)
    q10, q11 = paddle.split(lower_half, 2, axis=3)
    # Paddle's CPU kernels broadcast slowly: weights are expanded to full size, then combined elementwise.
    wy0, wy1 = (paddle.expand(paddle.to_tensor(w), shape) for w in weights_y)
    wx0, wx1 = (paddle.expand(paddle.to_tensor(w), shape) for w in weights_x)
    # OpenCV's fixed point, in int32: the horizontal pass is exact (at most 255 * 2048); its vectorised
    # vertical pass keeps bits 4.. of each row sum and the high 16 bits of each product, then shifts by 2
    # with rounding. Replaying those truncations makes the pixels equal, not just within one level.
    upper = paddle.floor_divide(q00 * wx0 + q01 * wx1, _int32(16))
    lower = paddle.floor_divide(q10 * wx0 + q11 * wx1, _int32(16))
    summed = paddle.floor_divide(upper * wy0, _int32(65536)) + paddle.floor_divide(lower * wy1, _int32(65536))
    resized = paddle.floor_divide(summed + _int32(2), _int32(4)).astype("float32")
    mean = paddle.expand(paddle.to_tensor(np.asarray(cfg.mean, np.float32).reshape(1, 3, 1, 1)), shape)
    std = paddle.expand(paddle.to_tensor(np.asarray(cfg.std, np.float32).reshape(1, 3, 1, 1)), shape)
    return (paddle.scale(resized, float(np.float32(cfg.scale))) - mean) / std


def _int32(value: int) -> "paddle.Tensor":
    import paddle
    return paddle.to_tensor([value], dtype="int32")
