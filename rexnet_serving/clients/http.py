"""HTTP client of the Pipeline service: ``POST /{name}/prediction`` (Paddle Serving's HTTP API).

Body (Paddle Serving's Pipeline JSON): ``{"key": ["image", "top_k"], "value": ["<base64>", "5"]}``;
several images go as ``image_0``, ``image_1``, ... (rexnet_serving.pipeline_wire). The answer carries
``err_no``/``err_msg`` and the per-image results as JSON text under key ``results``.
"""
from __future__ import annotations

import base64
from typing import Any, Dict, List, Optional, Sequence

import requests

from .. import pipeline_wire
from ..defaults import HTTP_PORT, SERVICE_NAME
from ..results import ImageResult
from .base import BadRequestError, ClientError, TransientError

# Overload (429, 503: load shedding or draining) and gateway failures are worth retrying; every other
# status, 413 (request body over the size limit) included, is the request's fault. Likewise err_no
# OVERLOADED (54) is retryable and REQUEST_TOO_LARGE (53) is not (pipeline_wire.BAD_REQUEST_ERRNOS).
_RETRYABLE_STATUS = {429, 500, 502, 503, 504}


def with_default_port(address: str, port: int) -> str:
    """``host`` -> ``host:port``; ``host:port`` unchanged."""
    return address if ":" in address.rsplit("]", 1)[-1] else f"{address}:{port}"


def check_response(err_no: int, err_msg: str, keys: Sequence[str], values: Sequence[str],
                   count: int) -> List[ImageResult]:
    """The per-image results of a Pipeline response, or the client error it stands for."""
    results, message = pipeline_wire.results_from_response(err_no, err_msg, keys, values)
    if results is not None and err_no in (pipeline_wire.OK, pipeline_wire.INVALID_IMAGE):
        if len(results) != count:
            raise ClientError(f"sent {count} images but got {len(results)} results")
        return results  # INVALID_IMAGE: every image failed, each result says why
    if err_no == pipeline_wire.OK:
        raise ClientError(f"the service answered without results: {message}")
    error = BadRequestError if err_no in pipeline_wire.BAD_REQUEST_ERRNOS else TransientError
    raise error(f"err_no {err_no}: {message}")


class HttpClient:
    """ClassifierClient over HTTP/JSON. Thread-safe (one requests.Session, pooled connections)."""

    def __init__(self, address: str = f"127.0.0.1:{HTTP_PORT}", timeout: float = 30.0,
                 service_name: str = SERVICE_NAME, session: Optional[requests.Session] = None) -> None:
        address = with_default_port(address, HTTP_PORT)
        self.url = f"{address if '://' in address else 'http://' + address}/{service_name}/prediction"
        self.timeout = timeout
        self._session = session or requests.Session()

    def request_body(self, images: Sequence[bytes], top_k: int) -> Dict[str, Any]:
        keys = pipeline_wire.image_keys(len(images))
        values = [base64.b64encode(image).decode("ascii") for image in images]
        return {"key": keys + [pipeline_wire.TOP_K_KEY], "value": values + [str(top_k)]}

    def post(self, body: Any) -> Dict[str, Any]:
        """Send a raw JSON body; the decoded JSON answer (raises TransientError/BadRequestError)."""
        try:
            reply = self._session.post(self.url, json=body, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientError(f"{self.url}: {exc}") from None
        except requests.RequestException as exc:
            raise ClientError(f"{self.url}: {exc}") from None
        if reply.status_code != 200:
            error = TransientError if reply.status_code in _RETRYABLE_STATUS else BadRequestError
            raise error(f"{self.url}: HTTP {reply.status_code}: {reply.text.strip()[:500]}")
        try:
            return reply.json()
        except ValueError:
            raise ClientError(f"{self.url}: the answer is not JSON: {reply.text[:200]!r}") from None

    def classify(self, images: Sequence[bytes], top_k: int = pipeline_wire.DEFAULT_TOP_K) -> List[ImageResult]:
        if not images:
            raise ValueError("classify needs at least one image")
        answer = self.post(self.request_body(images, top_k))
        # The gateway (grpc-gateway JSON) leaves out fields at their default: err_no 0, empty lists.
        return check_response(int(answer.get("err_no", 0)), answer.get("err_msg", ""),
                              answer.get("key", []), answer.get("value", []), len(images))

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> "HttpClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
