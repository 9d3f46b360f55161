"""Decoding: PaddleClas's cv2 decode for every accepted format and colour mode, and every refusal code."""
from __future__ import annotations

import base64
import io
import pickle
import struct
import subprocess
import sys
import time
import zlib

import cv2
import numpy as np
import pytest
from images import FORMATS, bmp_strip, encode, make_photo_set, photo

from rexnet_serving import imageio
from rexnet_serving.imageio import (ERROR_CODES, DecodeLimits, ImageError, check_image, check_request, decode_image,
                                    decode_jpeg_on_device, read_header)

from conftest import REPO_ROOT


def paddleclas_decode(data: bytes) -> np.ndarray:
    """ppcls DecodeImage(to_rgb=True): cv2.imdecode(IMREAD_COLOR), then BGR -> RGB."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def refusal(data, **limits) -> str:
    with pytest.raises(ImageError) as err:
        decode_image(data, DecodeLimits(**limits))
    assert str(err.value), "an ImageError must say what is wrong"
    return err.value.code


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory):
    return make_photo_set(tmp_path_factory.mktemp("photos"))


def test_photo_set_decodes_as_paddleclas_does(photo_set):
    assert len(photo_set) >= 10
    for path in photo_set:
        data = path.read_bytes()
        image = decode_image(data)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, path.name
        assert image.flags["C_CONTIGUOUS"], path.name
        header = read_header(data)
        assert (header.width, header.height) == (image.shape[1], image.shape[0]), path.name
        np.testing.assert_array_equal(image, paddleclas_decode(data), err_msg=path.name)


@pytest.mark.parametrize("fmt", FORMATS)
def test_colour_modes_become_rgb_like_cv2(fmt):
    rgb = photo("flower", (64, 48))
    data = encode(rgb, fmt, quality=95)
    image = decode_image(data)
    np.testing.assert_array_equal(image, paddleclas_decode(data))
    assert image.shape == (48, 64, 3)
    if fmt in ("png", "bmp", "png-rgba"):  # lossless, and alpha is dropped rather than blended
        np.testing.assert_array_equal(image, rgb)
    if fmt == "png-gray":
        assert (image[:, :, 0] == image[:, :, 1]).all() and (image[:, :, 1] == image[:, :, 2]).all()
    if fmt == "png-16bit":  # OpenCV keeps the high byte
        wide = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert wide.dtype == np.uint16
        np.testing.assert_array_equal(image, (wide >> 8).astype(np.uint8)[:, :, ::-1])


def exif_jpeg(orientation: int) -> bytes:
    """A JPEG of a 64x48 photo with an EXIF APP1 carrying the given Orientation tag."""
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1)
    tiff += struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    app1 = b"Exif\x00\x00" + tiff
    jpeg = encode(photo("china", (64, 48)), "jpeg")
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def test_exif_orientation_is_applied_like_cv2():
    data = exif_jpeg(6)  # rotate 90 degrees clockwise
    assert read_header(data).orientation == 6
    image = decode_image(data)
    assert image.shape == (64, 48, 3)
    np.testing.assert_array_equal(image, paddleclas_decode(data))
    assert read_header(exif_jpeg(1)).orientation == 1


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    return data[: int(len(data) * keep)]


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header (IHDR, tiny IDAT, IEND) claiming width x height pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))


def bomb_jpeg(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) is rewritten to claim width x height pixels."""
    data = bytearray(encode(photo("china", (64, 48)), "jpeg"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def pil_encode(fmt: str) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(photo("china", (32, 24))).save(buf, format=fmt)
    return buf.getvalue()


JPEG = encode(photo(), "jpeg", quality=90)
REFUSALS = [
    ("empty", lambda: b"", {}),
    ("not_an_image", lambda: np.random.default_rng(0).bytes(4096), {}),
    ("not_an_image", lambda: b"%PDF-1.4\n" + b"0" * 100, {}),
    ("truncated", lambda: truncated(JPEG), {}),
    ("truncated", lambda: JPEG[:300], {}),  # cut inside the header
    ("truncated", lambda: JPEG[:-2], {}),  # only the end-of-image marker missing
    ("truncated", lambda: truncated(encode(photo(), "png")), {}),
    ("truncated", lambda: truncated(encode(photo(), "bmp")), {}),
    ("truncated", lambda: truncated(encode(photo(), "webp")), {}),
    ("unsupported_format", lambda: pil_encode("GIF"), {}),
    ("unsupported_format", lambda: pil_encode("TIFF"), {}),
    ("too_many_pixels", lambda: bomb_png(100_000, 100_000), {}),
    ("too_many_pixels", lambda: bomb_jpeg(60_000, 60_000), {}),
    ("too_many_pixels", lambda: JPEG, {"max_pixels": 640 * 427 - 1}),
    ("too_large", lambda: JPEG, {"max_bytes": len(JPEG) - 1}),
]


@pytest.mark.parametrize("code,make,limits", REFUSALS,
                         ids=[f"{code}-{i}" for i, (code, _, _) in enumerate(REFUSALS)])
def test_refusals_have_stable_codes(code, make, limits):
    assert refusal(make(), **limits) == code


@pytest.mark.parametrize("data", [bomb_png(100_000, 100_000), bomb_jpeg(60_000, 60_000)], ids=["png", "jpeg"])
def test_bombs_never_reach_the_decoder(data, monkeypatch):
    def decoder_reached(*args, **kwargs):
        raise AssertionError("the decoder was called on a decompression bomb")
    monkeypatch.setattr(imageio.cv2, "imdecode", decoder_reached)
    assert refusal(data) == "too_many_pixels"


def test_limits_at_the_boundary_are_accepted():
    assert decode_image(JPEG, DecodeLimits(max_bytes=len(JPEG), max_pixels=640 * 427)).shape == (427, 640, 3)


def test_base64():
    """Base64 text as the front doors hand it over: check_request decodes it once, refusing bad text per
    image with the image's own error; decode_image then decodes the file."""
    text = base64.b64encode(JPEG).decode("ascii")
    (data,) = check_request([text])
    np.testing.assert_array_equal(decode_image(data), decode_image(JPEG))
    assert imageio.base64_bytes(text.encode("ascii")) == JPEG
    bad = ["not base64!!", text[:-1], "data:image/jpeg;base64," + text, "é" + text]
    for refused, payload in zip(check_request(bad), bad):
        assert isinstance(refused, ImageError) and refused.code == "invalid_base64", payload[:30]
    assert "data:" in str(check_request(["data:image/jpeg;base64," + text])[0])
    assert check_request([""])[0].code == "empty"
    # Refused from the text length, before decoding.
    assert check_request([text], DecodeLimits(max_bytes=len(JPEG) // 2))[0].code == "too_large"
    # Valid base64 of a truncated image: the image's own code, found before decoding.
    assert check_request([base64.b64encode(truncated(JPEG)).decode("ascii")])[0].code == "truncated"


def test_image_error_is_a_value_error_that_pickles_with_its_code():
    err = ImageError("truncated", "cut short")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert (again.code, str(again)) == ("truncated", "cut short")
    with pytest.raises(ValueError):
        ImageError("no_such_code", "x")
    assert set(ERROR_CODES) == {"empty", "too_large", "too_many_pixels", "unsupported_format", "not_an_image",
                                "truncated", "invalid_base64"}


def test_bytes_like_inputs_and_type_errors():
    expected = decode_image(JPEG)
    np.testing.assert_array_equal(decode_image(bytearray(JPEG)), expected)
    np.testing.assert_array_equal(decode_image(memoryview(JPEG)), expected)
    with pytest.raises(TypeError):
        decode_image("not bytes")
    with pytest.raises(ValueError):
        DecodeLimits(max_bytes=0)


def test_check_image_reads_headers_of_every_format(photo_set):
    for path in photo_set:
        header = check_image(path.read_bytes())
        assert header.format in ("jpeg", "png", "bmp", "webp")


def test_on_device_decoding_declines_without_a_gpu():
    # The GPU branch itself cannot run here (no CUDA build, no GPU): only its fallback is tested.
    assert decode_jpeg_on_device(JPEG) is None


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_paddle_imported_first_is_refused_with_a_clear_error():
    """libpaddle's bundled zlib breaks PNG decoding when paddle is imported before cv2/zlib."""
    broken = _run("import paddle\nimport rexnet_serving.imageio")
    assert broken.returncode != 0 and "imported before cv2/zlib" in broken.stderr
    fine = _run("import rexnet_serving.imageio as io, paddle\n"
                "import numpy as np, cv2\n"
                "ok, png = cv2.imencode('.png', np.full((8, 8, 3), 9, np.uint8))\n"
                "assert io.decode_image(png.tobytes()).max() == 9\n")
    assert fine.returncode == 0, fine.stderr[-2000:]


def test_decode_time_is_reported():
    decode_image(JPEG)
    runs = 50
    start = time.perf_counter()
    for _ in range(runs):
        decode_image(JPEG)
    per_image = (time.perf_counter() - start) / runs
    print(f"\ndecode_image: 640x427 JPEG q90 ({len(JPEG)} bytes): {per_image * 1e3:.2f} ms")


# -- the per-request budget ----------------------------------------------------------------------------
def solid_png(width: int, height: int, value: int = 80) -> bytes:
    """A one-colour PNG: kilobytes on the wire, width x height x 3 bytes once decoded."""
    return encode(np.full((height, width, 3), value, np.uint8), "png")


def test_request_pixels_are_summed_from_headers():
    small = solid_png(300, 200)
    both = [small, base64.b64encode(small).decode()]
    assert imageio.check_request(both, DecodeLimits(max_request_pixels=2 * 300 * 200)) == [small, small]
    with pytest.raises(imageio.RequestTooLargeError):
        imageio.check_request(both, DecodeLimits(max_request_pixels=2 * 300 * 200 - 1))
    # images refused on their own count for nothing (decoding refuses them at no cost) and come back as
    # their errors
    files = imageio.check_request([small, b"not an image", "%%%", b""], DecodeLimits(max_request_pixels=60_000))
    assert files[0] == small and [f.code for f in files[1:]] == ["not_an_image", "invalid_base64", "empty"]


def test_a_request_over_the_pixel_budget_is_refused_before_decoding(monkeypatch):
    big = solid_png(2000, 1500)  # 3 MP
    limits = DecodeLimits(max_pixels=4_000_000, max_request_pixels=8_000_000)
    assert imageio.check_request([big, big], limits) == [big, big]
    decoded = []
    monkeypatch.setattr(imageio.cv2, "imdecode", lambda *a: decoded.append(a))
    with pytest.raises(imageio.RequestTooLargeError, match="9000000 pixels together.*limit of 8000000") as info:
        imageio.check_request([big, big, big], limits)
    assert info.value.code == "request_too_large" and isinstance(info.value, ValueError)
    assert not decoded
    assert pickle.loads(pickle.dumps(info.value)).args == info.value.args


def test_a_request_over_the_image_count_is_refused():
    small = solid_png(8, 8)
    assert len(imageio.check_request([small] * 3, DecodeLimits(max_request_images=3))) == 3
    with pytest.raises(imageio.RequestTooLargeError, match="4 images in one request, over the limit of 3"):
        imageio.check_request([small] * 4, DecodeLimits(max_request_images=3))
    for bad in ("max_request_pixels", "max_request_images"):
        with pytest.raises(ValueError):
            DecodeLimits(**{bad: 0})


def test_default_request_budget_fits_the_memory_budget():
    from rexnet_serving.resize import MAX_RESIZE_BYTES
    limits = DecodeLimits()
    # decoded pixels at the worst measured rate, plus the one resize in progress (bounded for any shape)
    assert (limits.max_request_pixels / 1e6 * imageio.PEAK_MB_PER_MEGAPIXEL + MAX_RESIZE_BYTES / 2**20
            <= imageio.REQUEST_MEMORY_BUDGET_MB)
    assert limits.max_request_pixels >= limits.max_pixels  # one image at the per-image limit still fits


# -- what the decoder itself refuses ---------------------------------------------------------------------
@pytest.mark.parametrize("width,height", [(2_000_000, 1), (1, 2_000_000)], ids=["wide", "tall"])
def test_a_decoder_exception_is_the_images_error(width, height):
    # 2 MP in 6 MB passes every limit and every header check; cv2.imdecode raises cv2.error on a side
    # over 2**20 (its CV_IO_MAX_IMAGE_WIDTH/HEIGHT). That is this image's refusal, not the caller's crash.
    data = bmp_strip(width, height)
    assert check_image(data).width == width
    with pytest.raises(ImageError, match=r"could not be decoded \(OpenCV: .*CV_IO_MAX_IMAGE") as err:
        decode_image(data)
    assert err.value.code == "not_an_image" and "\n" not in str(err.value)
    # the largest side OpenCV takes decodes
    assert decode_image(bmp_strip(1 << 20)).shape == (1, 1 << 20, 3)
