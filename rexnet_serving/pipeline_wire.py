"""The wire contract of the Pipeline service, shared by the service and its HTTP and gRPC clients.

It lives here, below both: rexnet_pipelines (which serves it) and rexnet_serving.clients and
rexnet_serving.bench.fake_server (which speak it) import it, and neither side imports the other for it.

Paddle Serving's Pipeline request (pipeline_service.proto of paddle_serving_server 0.9.0) carries string
``key``/``value`` lists and typed ``tensors``; its response carries ``err_no``, ``err_msg`` and
``key``/``value`` strings. On top of that this service defines:

* images: key ``image`` for a one-image request, or ``image_0`` ... ``image_{N-1}`` for several (results
  come back in index order). In ``value`` an image is base64 text; in ``tensors`` it is the encoded file
  itself (``elem_type`` 13, bytes in ``byte_data``), which saves the base64 step over gRPC.
* ``top_k`` (optional, ``value`` text, default 5): how many classes per image, 1..class_num.
* the response: ``err_no`` 0 and key ``results`` whose value is a JSON list with one entry per image
  (rexnet_serving.results wire form). A bad image gets an error entry; the others still succeed.
  When every image failed, ``err_no`` is INVALID_IMAGE but ``results`` is still there.

Nothing here imports Paddle or Paddle Serving, so clients stay light.
"""
from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from rexnet_serving.jsonbody import ascii_uint
from rexnet_serving.results import ImageResult

IMAGE_KEY = "image"
TOP_K_KEY = "top_k"
MODEL_KEY = "model"                  # optional: which served model (default: the service's default model)
MODEL_VERSION_KEY = "model_version"  # optional: which of its served versions (default: the highest)
RESULTS_KEY = "results"
DEFAULT_TOP_K = 5
BYTES_ELEM_TYPE = 13   # pipeline_service.proto Tensor.elem_type for raw bytes in byte_data
STRING_ELEM_TYPE = 12  # Tensor.elem_type for text in str_data

# Matched with fullmatch only: `$` (and match()) would accept "image_0\n", a key that is then rewritten
# to "image_0" and missed in the lookup (an internal error instead of a bad-request answer). At most 9
# ASCII digits: int() refuses 4300 and more (a server fault), and no request holds a billion images.
_INDEXED_IMAGE_KEY = re.compile(r"image_(0|[1-9][0-9]{0,8})")

# err_no values. Paddle Serving reserves 50..99 for "product" (application) errors; the rest are its own
# (pipeline/error_catch.py CustomExceptionCode).
OK = 0
INVALID_REQUEST = 51   # ours: missing/unknown key, bad top_k, unsupported tensor: fix the request
INVALID_IMAGE = 52     # ours: no image of the request could be classified (details per image in results)
REQUEST_TOO_LARGE = 53  # ours: the request's images together exceed the per-request pixel/image budget
OVERLOADED = 54        # ours: refused at once by admission control (too many requests in progress): retry
CLOSED_ERROR = 3001    # Paddle Serving: the DAG is stopping (the service is draining)
NO_SERVICE = 3002      # Paddle Serving: the request named another service
INPUT_PARAMS_ERROR = 5000
TIMEOUT = 6000
RPC_PACKAGE_ERROR = 8000

_OPTIONAL_KEYS = (TOP_K_KEY, MODEL_KEY, MODEL_VERSION_KEY)

# err_no values where sending the same request again cannot help.
BAD_REQUEST_ERRNOS = frozenset({INVALID_REQUEST, INVALID_IMAGE, REQUEST_TOO_LARGE, NO_SERVICE,
                                INPUT_PARAMS_ERROR, RPC_PACKAGE_ERROR})


class RequestError(ValueError):
    """The request as a whole is malformed (answered with err_no INVALID_REQUEST)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def image_keys(count: int) -> List[str]:
    """The keys a client uses for ``count`` images: ``image`` for one, ``image_0..`` for several."""
    if count < 1:
        raise ValueError("a request needs at least one image")
    return [IMAGE_KEY] if count == 1 else [f"{IMAGE_KEY}_{i}" for i in range(count)]


def order_image_keys(keys: Sequence[str]) -> List[str]:
    """Check the image keys of a request and return them in result order; raises RequestError."""
    if not keys:
        raise RequestError("missing_image", "the request has no image: send key 'image' (or "
                                            "'image_0', 'image_1', ...) with a base64 value")
    if IMAGE_KEY in keys:
        if len(keys) > 1:
            raise RequestError("invalid_key", "use either 'image' (one image) or 'image_0', "
                                              "'image_1', ... (several), not both")
        return [IMAGE_KEY]
    indices = sorted(int(_INDEXED_IMAGE_KEY.fullmatch(k).group(1)) for k in keys)
    if indices != list(range(len(indices))):
        raise RequestError("invalid_key", f"image keys must be image_0 ... image_{len(indices) - 1} "
                                          f"without gaps, got {', '.join(sorted(keys))}")
    return [f"{IMAGE_KEY}_{i}" for i in indices]


def is_image_key(key: str) -> bool:
    return key == IMAGE_KEY or _INDEXED_IMAGE_KEY.fullmatch(key) is not None


def parse_top_k(text: Optional[str], max_top_k: int, default: int = DEFAULT_TOP_K) -> int:
    """``top_k`` from its request text: an integer in 1..max_top_k; raises RequestError."""
    if text is None:
        return min(default, max_top_k)
    try:
        value = int(str(text).strip())
    except ValueError:
        raise RequestError("invalid_top_k", f"top_k must be an integer, got {text!r}") from None
    if not 1 <= value <= max_top_k:
        raise RequestError("invalid_top_k", f"top_k must be between 1 and {max_top_k} "
                                            f"(the model's class count), got {value}")
    return value


def parse_fields(fields: Mapping[str, Any], max_images: int, max_top_k: int,
                 default_top_k: int) -> Tuple[List[Any], int]:
    """The payloads (in result order) and top_k of a request's fields; RequestError when malformed."""
    unknown = [k for k in fields if k not in _OPTIONAL_KEYS and not is_image_key(k)]
    if unknown:
        raise RequestError("unknown_key", f"unknown key(s) {', '.join(sorted(k[:40] for k in unknown))}: send 'image' "
                                          "(or 'image_0', 'image_1', ...) and optionally 'top_k', 'model', "
                                          "'model_version'")
    keys = order_image_keys([k for k in fields if is_image_key(k)])
    if len(keys) > max_images:
        raise RequestError("too_many_images",
                           f"{len(keys)} images in one request, over the limit of {max_images}")
    top_k = fields.get(TOP_K_KEY)
    if top_k is not None and not isinstance(top_k, str):
        raise RequestError("invalid_top_k", "top_k must be sent as text (a key/value pair)")
    return [fields[k] for k in keys], parse_top_k(top_k, max_top_k, default_top_k)


def model_of(fields: Mapping[str, Any]) -> Tuple[Optional[str], Optional[int]]:
    """The model name and version a request asks for (None: the default / the highest served)."""
    name, version = fields.get(MODEL_KEY), fields.get(MODEL_VERSION_KEY)
    if name is not None and (not isinstance(name, str) or not name):
        raise RequestError("unknown_model", "model must be a model name sent as text")
    if version is None:
        return name, None
    number = ascii_uint(version)  # not isdigit(): it accepts "²", which int() refuses
    if number is None:
        raise RequestError("unknown_model", f"model_version must be a version number (ASCII digits), got "
                                            f"{str(version)[:40]!r}")
    return name, number


def encode_results(results: Sequence[ImageResult]) -> str:
    return json.dumps([r.to_dict() for r in results], ensure_ascii=False)


def decode_results(text: str) -> List[ImageResult]:
    return [ImageResult.from_dict(entry) for entry in json.loads(text)]


def results_from_response(err_no: int, err_msg: str, keys: Sequence[str],
                          values: Sequence[str]) -> Tuple[Optional[List[ImageResult]], str]:
    """The per-image results of a response, or (None, message) when it carries none."""
    fields: Dict[str, str] = dict(zip(keys, values))
    if RESULTS_KEY in fields:
        return decode_results(fields[RESULTS_KEY]), err_msg
    return None, err_msg or f"the service answered err_no {err_no} without results"
