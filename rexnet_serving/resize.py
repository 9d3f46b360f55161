"""PaddleClas's ResizeImage(resize_short) + CropImage(crop) in OpenCV's own arithmetic, at a cost bounded by
the crop whatever the image's shape.

PaddleClas resizes the whole image so its short side is resize_short (cv2.resize, INTER_LINEAR), then
crops the centre. The resized image is resize_short x (resize_short * aspect ratio): for photos a few
hundred KB, but a 20000x1 strip (a 200-byte PNG within every pixel limit) resizes to 256 x 5,120,000 x 3
= 3.9 GB, and 6-12 s, for one 224 x 224 crop. So crop_window resizes the whole image with cv2.resize
(PaddleClas's own call, fastest for photos) only while the result is at most MAX_RESIZE_BYTES, and past
it computes the crop's window alone (resized_window), equal to cv2.resize's crop bit for bit: what the
resize step holds is known from the image's size before any work (resize_bytes) and bounded for every
shape, one pixel high or wide included.

linear_taps (OpenCV's source coordinates and integer weights along one axis) also drives the Paddle-op
path's interpolation matrices (rexnet_serving.preprocess).
"""
from __future__ import annotations

from typing import Tuple

import cv2
import numpy as np

COEF_SCALE = 2048  # OpenCV's INTER_RESIZE_COEF_SCALE: bilinear weights are multiples of 1/2048
# cv2.resize of a whole image only while the result is at most this: 16 MiB is a 256-high image of aspect
# ratio ~85 (panoramas included); past it only the crop's window is computed, whose working set
# (_window_bytes) is under it for crops up to 295 (ReXNet's is 224).
MAX_RESIZE_BYTES = 16 * 2**20


def resized_size(width: int, height: int, resize_short: int) -> Tuple[int, int]:
    """(width, height) after PaddleClas's ResizeImage(resize_short): Python round() on each side."""
    percent = float(resize_short) / min(width, height)
    return int(round(width * percent)), int(round(height * percent))


def linear_taps(src: int, dst: int, start: int, count: int) -> Tuple[np.ndarray, ...]:
    """Source indices, integer weights (summing to 2048) and edge clamping of output pixels start..start+count
    along one axis, as cv::resize computes them for columns.

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
    w_right = np.rint(frac * np.float32(COEF_SCALE)).astype(np.int32)
    w_left = np.rint((np.float32(1) - frac) * np.float32(COEF_SCALE)).astype(np.int32)
    return left, right, w_left, w_right, low | high


def _row_taps(src: int, dst: int, start: int, count: int) -> Tuple[np.ndarray, ...]:
    """Source rows and integer weights of output rows start..start+count, as cv::resize's vertical pass
    takes them: the weights come from the unclamped position (unlike the columns' in linear_taps), only
    the row indices are clamped to the image."""
    scale = 1.0 / (float(dst) / src)
    pos = ((np.arange(start, start + count, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    top = np.floor(pos)
    frac = pos - top
    top = top.astype(np.int64)
    w_low = np.rint((np.float32(1) - frac) * np.float32(COEF_SCALE)).astype(np.int32)
    w_high = np.rint(frac * np.float32(COEF_SCALE)).astype(np.int32)
    return np.clip(top, 0, src - 1), np.clip(top + 1, 0, src - 1), w_low, w_high


def resized_window(image: np.ndarray, size: Tuple[int, int], top: int, left: int, crop: int) -> np.ndarray:
    """``cv2.resize(image, size, interpolation=INTER_LINEAR)[top:top + crop, left:left + crop]`` for an
    H x W x 3 uint8 image, bit for bit, computing only that window: O(crop^2) memory and time (~2 ms).

    Hand-written because no library resizes a window of a virtual output with OpenCV's coordinates and
    rounding. It replays opencv/modules/imgproc/src/resize.cpp for uint8 INTER_LINEAR: a horizontal pass
    of exact integer sums (weights in 1/2048, columns clamped as linear_taps does) over the pixels the
    window taps, then the vertical pass in VResizeLinear<uchar, int, short>'s fixed point, (((s0 >> 4) *
    b0 >> 16) + ((s1 >> 4) * b1 >> 16) + 2) >> 2, the same in its SIMD lanes (VResizeLinearVec_32s8u)
    and its scalar tail (the vertical weights come from the unclamped position: _row_taps). At exactly
    half size cv::resize switches to INTER_AREA: the rounded mean of each 2 x 2 block.
    tests/test_preprocess.py compares it with cv2.resize over a sweep of sizes.
    """
    height, width = image.shape[:2]
    new_w, new_h = size
    if width == 2 * new_w and height == 2 * new_h:
        block = image[2 * top:2 * (top + crop), 2 * left:2 * (left + crop)].astype(np.uint16)
        sums = block[0::2, 0::2] + block[1::2, 0::2] + block[0::2, 1::2] + block[1::2, 1::2]
        return ((sums + 2) >> 2).astype(np.uint8)
    x_low, x_high, wx_low, wx_high, _ = linear_taps(width, new_w, left, crop)
    y_low, y_high, wy_low, wy_high = _row_taps(height, new_h, top, crop)
    rows, cols = np.unique(np.concatenate([y_low, y_high])), np.unique(np.concatenate([x_low, x_high]))
    source = image[np.ix_(rows, cols)].astype(np.int32)  # at most 2 * crop rows and columns
    x_low, x_high = np.searchsorted(cols, x_low), np.searchsorted(cols, x_high)
    horizontal = source[:, x_low] * wx_low[:, None] + source[:, x_high] * wx_high[:, None]
    upper = horizontal[np.searchsorted(rows, y_low)]
    lower = horizontal[np.searchsorted(rows, y_high)]
    b_upper, b_lower = wy_low[:, None, None], wy_high[:, None, None]
    blended = (((upper >> 4) * b_upper >> 16) + ((lower >> 4) * b_lower >> 16) + 2) >> 2
    return np.clip(blended, 0, 255).astype(np.uint8)


def _window_bytes(crop: int) -> int:
    # int32 crop x crop x 3 planes: the tapped source pixels (at most 2 crop x 2 crop: 4 planes), the
    # horizontal pass (2), the two vertical roundings and their temporaries (8), with room to spare
    return 16 * 4 * 3 * crop * crop


def resize_bytes(width: int, height: int, resize_short: int, crop: int) -> int:
    """What crop_window holds for one width x height image, from the size alone (the image header).

    The whole resized image (uint8, 3 channels) while that is at most MAX_RESIZE_BYTES, else the crop
    window's working set: at most MAX_RESIZE_BYTES for any image at crops up to 295. So the per-request
    memory budget needs only the decoded pixels counted (rexnet_serving.imageio.check_request), as the
    images of a request are preprocessed one at a time.
    """
    new_w, new_h = resized_size(width, height, resize_short)
    whole = 3 * new_w * new_h
    return whole if whole <= MAX_RESIZE_BYTES else _window_bytes(crop)


def crop_window(image: np.ndarray, resize_short: int, crop: int) -> np.ndarray:
    """ResizeImage(resize_short) then CropImage(crop) of one H x W x 3 uint8 image: the crop x crop x 3
    centre, by cv2.resize of the whole image or, past MAX_RESIZE_BYTES, resized_window (equal bit for
    bit)."""
    height, width = image.shape[:2]
    new_w, new_h = resized_size(width, height, resize_short)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    if 3 * new_w * new_h > MAX_RESIZE_BYTES:
        return resized_window(image, (new_w, new_h), top, left, crop)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return resized[top:top + crop, left:left + crop]
