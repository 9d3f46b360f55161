"""Image decoding for every entry point: encoded bytes (or base64 text) to an RGB uint8 array, safely.

Decoding matches PaddleClas's eval reader (ppcls DecodeImage: cv2.imdecode(IMREAD_COLOR), then BGR->RGB),
so what a served model sees equals what it was evaluated on:
  * grayscale and palette images are expanded to three channels, alpha is dropped (not blended),
  * 16-bit images are scaled to 8 bits as OpenCV does (high byte),
  * the EXIF orientation of a JPEG is applied (OpenCV's default for IMREAD_COLOR).
Accepted formats: JPEG, PNG, BMP, WebP (still images). GIF, TIFF, JPEG 2000, HEIF/AVIF, ICO, PSD, PNM and
animated WebP are refused as 'unsupported_format': the service does not promise them.

Untrusted input is checked before the decoder sees it, from the container headers (JPEG ITU T.81
markers, PNG IHDR/IEND per ISO/IEC 15948, BMP BITMAPINFOHEADER, WebP RIFF/VP8/VP8L/VP8X per RFC 9649):
  * the encoded size (DecodeLimits.max_bytes) and the pixel count (DecodeLimits.max_pixels) are checked
    from the header, so a decompression bomb never reaches the decoder;
  * truncation is detected structurally (a JPEG's EOI marker after its scan data, a PNG's IEND chunk, a
    BMP's pixel array length, a WebP's RIFF length), because depending on where a JPEG is cut, libjpeg
    either fails or returns a partly grey image with only a warning on stderr.
The headers are parsed here rather than by Pillow because Pillow's open() applies its own process-wide
decompression-bomb limit (Image.MAX_IMAGE_PIXELS, a global) and cannot tell where a JPEG's scan starts.
Every refusal is an ImageError with a stable .code that the services return per image; so is whatever a
decoder raises on an image that passed these checks (decode_image: 'not_an_image', e.g. OpenCV's cv2.error
for a side over 2**20 pixels), so one image never fails the others of its request.

A request's images are also checked together, from their headers and before any of them is decoded
(check_request): their count and their summed pixel count, which bound the memory one request takes.
Past either limit the whole request is refused (RequestTooLargeError, code "request_too_large").

Import order matters: libpaddle.so (Paddle 2.6) exports its own zlib, and a libz.so.1 first loaded after
`import paddle` binds to it, so libpng then fails ("IDAT: bad parameters to zlib") and zlib compression
crashes (PaddlePaddle/Paddle#70538, PaddleOCR#11776). Importing this module (or cv2, or zlib) before paddle
avoids it; importing it after such a load raises ImportError instead of crashing on the first PNG.
"""
from __future__ import annotations

import base64
import binascii
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Union

import cv2
import numpy as np

if TYPE_CHECKING:  # paddle is imported lazily: decoding needs only OpenCV
    import paddle

ERROR_CODES = ("empty", "too_large", "too_many_pixels", "unsupported_format", "not_an_image", "truncated",
               "invalid_base64")


class ImageError(ValueError):
    """An input image was refused; .code is one of ERROR_CODES, the message says why in words."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown image error code {code!r}")
        super().__init__(message)
        self.code = code

    def __reduce__(self):
        # Pipeline ops run in worker processes: the error must survive pickling with its code.
        return type(self), (self.code, str(self))


class RequestTooLargeError(ValueError):
    """A request's images together exceed the per-request budget (too many, or too many pixels in
    total): the whole request is refused before any image is decoded. ``.code`` is "request_too_large"."""

    code = "request_too_large"

    def __reduce__(self):
        return type(self), (str(self),)


# Peak memory of decoding and preprocessing one request, measured on the CPU (solid-colour PNGs, OpenCV
# decode and preprocessing, 36 MP per request): 2.9-5.7 MB per megapixel, the high end for one huge
# image (the decoder's own copy) and for many small ones (per-image buffers); one 39 MP image: 5.8 for
# JPEG, PNG and BMP in any aspect ratio (1048576x38 included), 6.7 for WebP; Paddle-op preprocessing
# (the GPU path, run on the CPU) measured up to 6.4. The resize adds at most
# rexnet_serving.resize.MAX_RESIZE_BYTES (16 MiB) whatever the aspect ratio. Through the whole service
# (tests/test_service.py) 64 images of 1 MP raised peak RSS by ~220 MB once Paddle's inference pool had
# grown to its steady state. The default per-request pixel budget keeps one request under
# REQUEST_MEMORY_BUDGET_MB at the conservative PEAK_MB_PER_MEGAPIXEL.
REQUEST_MEMORY_BUDGET_MB = 512
PEAK_MB_PER_MEGAPIXEL = 7.0


@dataclass(frozen=True)
class DecodeLimits:
    """What one encoded image may cost (its size in bytes, its decoded pixel count), and what all the
    images of one request may cost together (their count, their decoded pixels summed).

    The per-request limits bound the memory one request can take: every image of a request is decoded
    before preprocessing, so 64 images of 40 MP each would need ~8 GB. max_request_pixels defaults to
    64 MP: at PEAK_MB_PER_MEGAPIXEL that is ~450 MB, under the 512 MB budget with room for the resize
    (at most 16 MiB, rexnet_serving.resize.MAX_RESIZE_BYTES).
    """

    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    max_request_pixels: int = 64_000_000
    max_request_images: int = 64

    # The service config's keys (``rexnet`` section, rexnet_pipelines.config) for these fields; the
    # config's defaults are these fields' defaults (this class is the one home of the image limits).
    SETTINGS_KEYS: ClassVar[Dict[str, str]] = {
        "max_image_bytes": "max_bytes", "max_image_pixels": "max_pixels",
        "max_request_pixels": "max_request_pixels", "max_images_per_request": "max_request_images"}

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_pixels, self.max_request_pixels, self.max_request_images) <= 0:
            raise ValueError(f"DecodeLimits must be positive, got {self}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "DecodeLimits":
        """The limits from the service config's ``rexnet`` settings (keys of SETTINGS_KEYS; a key left
        out keeps its default)."""
        return cls(**{field: settings[key] for key, field in cls.SETTINGS_KEYS.items() if key in settings})


@dataclass(frozen=True)
class ImageHeader:
    """What the container header says, read without decoding."""

    format: str  # 'jpeg', 'png', 'bmp' or 'webp'
    width: int
    height: int
    # JPEG only (the on-device decoder needs them): EXIF orientation, colour components, sample bits.
    orientation: int = 1
    components: int = 3
    precision: int = 8


_JPEG, _PNG = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the whole IEND chunk: empty, so its CRC is fixed
_UNSUPPORTED = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"), (b"\x76\x2f\x31\x01", "OpenEXR"), (b"#?RADIANCE", "HDR"),
)
_ISO_BMFF_BRANDS = {b"heic": "HEIF", b"heix": "HEIF", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF"}
# SOFn markers carry the frame size; C4 (DHT), C8 (JPG extension) and CC (DAC) share the range but do not.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE_MARKERS = frozenset([0x01]) | frozenset(range(0xD0, 0xD8))


def _u16be(data: bytes, pos: int) -> int:
    return int.from_bytes(data[pos:pos + 2], "big")


def _loaded_objects() -> List[str]:
    """Paths of the shared objects in this process, in load order (glibc's dl_iterate_phdr)."""
    import ctypes

    class _PhdrInfo(ctypes.Structure):
        _fields_ = [("addr", ctypes.c_void_p), ("name", ctypes.c_char_p)]

    names: List[str] = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(_PhdrInfo), ctypes.c_size_t, ctypes.c_void_p)

    def collect(info, size, data):
        names.append((info.contents.name or b"").decode(errors="replace"))
        return 0

    ctypes.CDLL(None).dl_iterate_phdr(callback_type(collect), None)
    return names


def _check_zlib_binding() -> None:
    """Refuse to run where libz.so.1 was loaded as libpaddle's dependency: PNG decoding would crash."""
    if sys.platform != "linux" or not any(m.endswith("libpaddle") for m in sys.modules):
        return
    try:
        names = [os.path.basename(n) for n in _loaded_objects()]
    except (AttributeError, OSError):  # not glibc: nothing to check
        return
    zlib_at = next((i for i, n in enumerate(names) if n.startswith("libz.so")), None)
    paddle_at = next((i for i, n in enumerate(names) if n == "libpaddle.so"), None)
    if zlib_at is not None and paddle_at is not None and paddle_at < zlib_at:
        raise ImportError("paddle was imported before cv2/zlib, so libz.so.1 is bound to libpaddle's bundled "
                          "zlib and PNG decoding would crash (PaddlePaddle/Paddle#70538). Import "
                          "rexnet_serving.imageio (or cv2, or zlib) before paddle.")


_check_zlib_binding()


def _u16le(data: bytes, pos: int) -> int:
    return int.from_bytes(data[pos:pos + 2], "little")


def _u32le(data: bytes, pos: int) -> int:
    return int.from_bytes(data[pos:pos + 4], "little")


def _truncated(fmt: str, what: str) -> ImageError:
    return ImageError("truncated", f"the {fmt} data is truncated: {what}")


def _exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of IFD0 in an EXIF TIFF block; 1 (upright) when absent or damaged."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for i in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            break
        if int.from_bytes(tiff[entry:entry + 2], order) == 0x0112:
            value = int.from_bytes(tiff[entry + 8:entry + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def _jpeg_header(data: bytes) -> ImageHeader:
    pos, n, frame, orientation = 2, len(data), None, 1
    while True:
        if pos >= n:
            raise _truncated("JPEG", "it ends inside the header, before any image data")
        if data[pos] != 0xFF:
            raise ImageError("not_an_image", f"the JPEG data is damaged: no marker at byte {pos}")
        while pos < n and data[pos] == 0xFF:  # markers may be preceded by fill bytes
            pos += 1
        if pos >= n:
            raise _truncated("JPEG", "it ends inside the header, before any image data")
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE_MARKERS:
            continue
        if marker == 0xD9:
            raise ImageError("not_an_image", "the JPEG data has no image: end marker before any scan")
        if pos + 2 > n:
            raise _truncated("JPEG", "it ends inside the header, before any image data")
        length = _u16be(data, pos)
        if length < 2:
            raise ImageError("not_an_image", f"the JPEG data is damaged: bad segment length at byte {pos}")
        end = pos + length
        if end > n:
            raise _truncated("JPEG", "it ends inside the header, before any image data")
        if marker in _SOF_MARKERS:
            if length < 8:
                raise ImageError("not_an_image", "the JPEG data is damaged: short frame header")
            frame = (data[pos + 2], _u16be(data, pos + 3), _u16be(data, pos + 5), data[pos + 7])
        elif marker == 0xE1 and data[pos + 2:pos + 8] == b"Exif\x00\x00":
            orientation = _exif_orientation(data[pos + 8:end])
        elif marker == 0xDA:
            if frame is None:
                raise ImageError("not_an_image", "the JPEG data is damaged: scan before the frame header")
            # Entropy-coded data stuffs every 0xFF with 0x00, so FF D9 after the first scan can only be
            # the EOI marker: without one, the file was cut short.
            if data.rfind(b"\xff\xd9") < end:
                raise _truncated("JPEG", "no end-of-image marker after the scan data")
            precision, height, width, components = frame
            return ImageHeader("jpeg", width, height, orientation, components, precision)
        pos = end


def _png_header(data: bytes) -> ImageHeader:
    if len(data) < 24:
        raise _truncated("PNG", "it ends inside the header")
    if data[12:16] != b"IHDR":
        raise ImageError("not_an_image", "the PNG data is damaged: it does not start with an IHDR chunk")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data.rfind(_PNG_IEND) < 0:
        raise _truncated("PNG", "no IEND chunk")
    return ImageHeader("png", width, height)


def _bmp_header(data: bytes) -> ImageHeader:
    if len(data) < 26:
        raise _truncated("BMP", "it ends inside the header")
    dib = _u32le(data, 14)
    if dib == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height, bpp, compression = _u16le(data, 18), _u16le(data, 20), _u16le(data, 24), 0
    elif dib >= 40:
        if len(data) < 34:
            raise _truncated("BMP", "it ends inside the header")
        width = int.from_bytes(data[18:22], "little", signed=True)
        height = abs(int.from_bytes(data[22:26], "little", signed=True))  # negative: rows stored top-down
        bpp, compression = _u16le(data, 28), _u32le(data, 30)
    else:
        raise ImageError("not_an_image", f"the BMP data is damaged: unknown header size {dib}")
    if compression in (0, 3, 6) and width > 0 and bpp in (1, 4, 8, 16, 24, 32):  # uncompressed rows
        row_bytes = (width * bpp + 31) // 32 * 4
        if _u32le(data, 10) + row_bytes * height > len(data):
            raise _truncated("BMP", "the pixel array is shorter than the header says")
    return ImageHeader("bmp", width, height)


def _webp_header(data: bytes) -> ImageHeader:
    if len(data) < 30:
        raise _truncated("WebP", "it ends inside the header")
    if len(data) < _u32le(data, 4) + 8:
        raise _truncated("WebP", "shorter than its RIFF length")
    chunk = data[12:16]
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise ImageError("not_an_image", "the WebP data is damaged: bad VP8 frame header")
        return ImageHeader("webp", _u16le(data, 26) & 0x3FFF, _u16le(data, 28) & 0x3FFF)
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            raise ImageError("not_an_image", "the WebP data is damaged: bad VP8L signature")
        bits = _u32le(data, 21)
        return ImageHeader("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        if data[20] & 0x02:
            raise ImageError("unsupported_format", "animated WebP is not supported; send a still image")
        width = int.from_bytes(data[24:27], "little") + 1
        return ImageHeader("webp", width, int.from_bytes(data[27:30], "little") + 1)
    raise ImageError("not_an_image", f"the WebP data is damaged: unknown first chunk {chunk!r}")


def read_header(data: bytes) -> ImageHeader:
    """Identify the format and read the size from the header alone; ImageError if refused."""
    if data.startswith(_JPEG):
        return _jpeg_header(data)
    if data.startswith(_PNG):
        return _png_header(data)
    if data.startswith(b"BM"):
        return _bmp_header(data)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return _webp_header(data)
    for magic, name in _UNSUPPORTED:
        if data.startswith(magic):
            raise ImageError("unsupported_format", f"{name} images are not supported; send JPEG, PNG, BMP or WebP")
    if data[4:8] == b"ftyp" and data[8:12] in _ISO_BMFF_BRANDS:
        name = _ISO_BMFF_BRANDS[data[8:12]]
        raise ImageError("unsupported_format", f"{name} images are not supported; send JPEG, PNG, BMP or WebP")
    raise ImageError("not_an_image", "the data is not a JPEG, PNG, BMP or WebP image")


def check_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> ImageHeader:
    """Every check decode_image makes before decoding: emptiness, size, format, pixel count, truncation."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"image data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError("empty", "the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError("too_large", f"the image is {len(data)} bytes, over the limit of {limits.max_bytes}")
    header = read_header(bytes(data) if not isinstance(data, bytes) else data)
    if header.width <= 0 or header.height <= 0:
        raise ImageError("not_an_image", f"the {header.format} header gives an empty size "
                                         f"{header.width}x{header.height}")
    pixels = header.width * header.height
    if pixels > limits.max_pixels:
        raise ImageError("too_many_pixels", f"the image is {header.width}x{header.height} = {pixels} pixels, "
                                            f"over the limit of {limits.max_pixels}")
    return header


def decoder_refusal(fmt: str, decoder: str, exc: BaseException) -> ImageError:
    """The image's own error for an exception a decoder raised on it: the header passed every check, but
    the decoder has limits of its own (OpenCV refuses a side over 2**20, CV_IO_MAX_IMAGE_WIDTH, with
    cv2.error) or chokes on the data. Its message kept on one line, without the library's source path."""
    text = " ".join(str(exc).split())
    if "error: " in text:  # "OpenCV(4.11.0) /io/.../loadsave.cpp:75: error: (-215:Assertion failed) ..."
        text = text.split("error: ", 1)[1]
    return ImageError("not_an_image", f"the {fmt} image could not be decoded ({decoder}: {text[:300]})")


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Decode JPEG/PNG/BMP/WebP bytes to an H x W x 3 uint8 RGB C-contiguous array, as PaddleClas does.

    Whatever the decoder raises on the image (not only what check_image refuses) becomes its ImageError,
    so one bad image never fails the request or the run it is part of.
    """
    header = check_image(data, limits)
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except Exception as exc:  # noqa: BLE001 - cv2.error and anything else the decoder raises on this image
        raise decoder_refusal(header.format, "OpenCV", exc) from None
    if bgr is None:
        raise ImageError("not_an_image", f"the {header.format} data is damaged and could not be decoded")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr)


def base64_bytes(text: Union[str, bytes], limits: DecodeLimits = DecodeLimits()) -> bytes:
    """The encoded file inside base64 text (standard alphabet, padded, no line breaks); ImageError for
    invalid base64 or a file over limits.max_bytes (refused before the text is decoded)."""
    if isinstance(text, str):
        try:
            text = text.encode("ascii")
        except UnicodeEncodeError:
            raise ImageError("invalid_base64", "the base64 text contains non-ASCII characters") from None
    if not isinstance(text, (bytes, bytearray)):
        raise TypeError(f"base64 image must be str or bytes, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ImageError("empty", "the image is empty (no base64 text)")
    # Refuse oversized payloads before spending memory on decoding them.
    if len(text) // 4 * 3 - 2 > limits.max_bytes:
        raise ImageError("too_large", f"the base64 text encodes about {len(text) // 4 * 3} bytes, over the "
                                      f"limit of {limits.max_bytes}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        hint = " (send the bare base64, without a 'data:...;base64,' prefix)" if text.startswith(b"data:") else ""
        raise ImageError("invalid_base64", f"the image is not valid base64: {exc}{hint}") from None


def check_request(payloads: Sequence[Union[bytes, str]],
                  limits: DecodeLimits = DecodeLimits()) -> List[Union[bytes, ImageError]]:
    """Each payload's encoded file (base64 text decoded, once) or the ImageError refusing it, after
    checking the request as a whole from the image headers: RequestTooLargeError when it holds more
    than limits.max_request_images images or more than limits.max_request_pixels pixels in total.

    Call it before decoding any image of the request; decode what it returns. An image refused on its
    own (check_image) counts for nothing in the total: decoding refuses it at no cost. The files are
    held together, but they are no bigger than the request body that carried them.
    """
    if len(payloads) > limits.max_request_images:
        raise RequestTooLargeError(f"{len(payloads)} images in one request, over the limit of "
                                   f"{limits.max_request_images}")
    files: List[Union[bytes, ImageError]] = []
    total = 0
    for payload in payloads:
        try:
            data = bytes(payload) if isinstance(payload, (bytes, bytearray, memoryview)) \
                else base64_bytes(payload, limits)
            header = check_image(data, limits)
        except ImageError as exc:
            files.append(exc)
            continue
        files.append(data)
        total += header.width * header.height
    if total > limits.max_request_pixels:
        raise RequestTooLargeError(f"the request's images decode to {total} pixels together, over the "
                                   f"per-request limit of {limits.max_request_pixels}; send fewer or "
                                   f"smaller images per request")
    return files


def decode_jpeg_on_device(data: bytes, limits: DecodeLimits = DecodeLimits()) -> "Optional[paddle.Tensor]":
    """Decode a JPEG on the GPU with nvJPEG (paddle.vision.ops.decode_jpeg) to an H x W x 3 uint8 RGB tensor.

    Returns None, so the caller falls back to decode_image, unless Paddle was built with CUDA, the current
    device is a GPU, the data is an 8-bit grey or YCbCr JPEG without an EXIF rotation that passes every
    check of check_image (nvJPEG ignores EXIF orientation, which OpenCV applies), and nvJPEG decodes it.
    nvJPEG's IDCT may differ from libjpeg's by a level or two on some pixels.
    UNTESTED: no GPU exists where this project is tested; only its None branches run in the tests.
    """
    import paddle
    if not paddle.is_compiled_with_cuda() or not paddle.get_device().startswith("gpu"):
        return None
    try:
        header = check_image(data, limits)
    except ImageError:
        return None
    if header.format != "jpeg" or header.orientation != 1 or header.components not in (1, 3) \
            or header.precision != 8:
        return None
    # decode_jpeg reads the bytes from a CPU tensor and allocates its CHW output on the GPU; the transpose
    # copies it to HWC, so the CHW buffer is released when this frame returns. nvJPEG refuses some JPEGs
    # libjpeg takes (and raises on damaged data): OpenCV then decodes the image, or refuses it itself.
    try:
        encoded = paddle.to_tensor(np.frombuffer(data, np.uint8), place=paddle.CPUPlace())
        chw = paddle.vision.ops.decode_jpeg(encoded, mode="rgb")
        return paddle.transpose(chw, [1, 2, 0]).contiguous()
    except Exception:  # noqa: BLE001 - any failure of the device decoder falls back to the CPU's
        return None
