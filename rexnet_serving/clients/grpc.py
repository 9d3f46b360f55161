"""gRPC client of the Pipeline service: Paddle Serving's ``PipelineService/inference``.

Images travel as raw bytes in the request's ``tensors`` (elem_type 13, ``byte_data``): no base64 step,
unlike HTTP. Paddle Serving's own PipelineClient cannot send them that way (it ``np.save``s arrays into
byte_data) and prints on every call, so this client builds the Request itself.

Only the generated message module of Paddle Serving is loaded, by file: importing the
``paddle_serving_server.pipeline`` package would create PipelineServingLogs/ in the current directory
and reconfigure the root logger of the client's process.
"""
from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any, List, Optional, Sequence

import grpc

from .. import compat, pipeline_wire
from ..defaults import GRPC_PORT, SERVICE_NAME
from ..results import ImageResult
from .base import BadRequestError, TransientError
from .http import check_response, with_default_port

_PB2 = "paddle_serving_server.pipeline.proto.pipeline_service_pb2"
_METHOD = "/baidu.paddle_serving.pipeline_serving.PipelineService/inference"
_MESSAGE_BYTES = 256 * 1024 * 1024
_TRANSIENT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED,
                    grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# RESOURCE_EXHAUSTED means two things: load shedding (the server's concurrent-RPC cap; retry later) or a
# message over a size limit, which gRPC core reports as "Received message larger than max" (the server's
# or this channel's receive limit) or "Sent message larger than max" (a send limit). The second is the
# request's fault: sending it again cannot help.
_OVERSIZED_MESSAGE = "message larger than max"


def error_class(code: Any, details: str) -> type:
    """BadRequestError or TransientError for a failed RPC's status code and details."""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _OVERSIZED_MESSAGE in (details or "").lower():
        return BadRequestError
    return TransientError if code in _TRANSIENT_CODES else BadRequestError


def pipeline_messages() -> ModuleType:
    """pipeline_service_pb2 (Request, Response, Tensor) without importing its package."""
    module = sys.modules.get(_PB2)
    if module is not None:
        return module
    spec = importlib.util.find_spec("paddle_serving_server")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("paddle-serving-server is not installed (it provides the Pipeline messages)")
    path = f"{list(spec.submodule_search_locations)[0]}/pipeline/proto/pipeline_service_pb2.py"
    spec = compat.pb2_spec(_PB2, path)  # Paddle Serving's old-style _pb2 on protobuf 6 (see compat)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[_PB2] = module
    return module


class GrpcClient:
    """ClassifierClient over gRPC. Thread-safe (one channel; gRPC multiplexes calls)."""

    def __init__(self, address: str = f"127.0.0.1:{GRPC_PORT}", timeout: float = 30.0,
                 service_name: str = SERVICE_NAME, channel: Optional[grpc.Channel] = None) -> None:
        self.address = with_default_port(address, GRPC_PORT)
        self.timeout = timeout
        self.service_name = service_name
        self._pb2 = pipeline_messages()
        self._channel = channel or grpc.insecure_channel(
            self.address, options=[("grpc.max_send_message_length", _MESSAGE_BYTES),
                                   ("grpc.max_receive_message_length", _MESSAGE_BYTES)])
        self._call = self._channel.unary_unary(_METHOD, request_serializer=self._pb2.Request.SerializeToString,
                                               response_deserializer=self._pb2.Response.FromString)

    def request(self, images: Sequence[bytes], top_k: int) -> Any:
        """The Request message: images as bytes tensors, top_k as a key/value pair."""
        tensors = [self._pb2.Tensor(name=key, elem_type=pipeline_wire.BYTES_ELEM_TYPE, byte_data=bytes(image))
                   for key, image in zip(pipeline_wire.image_keys(len(images)), images)]
        return self._pb2.Request(name=self.service_name, key=[pipeline_wire.TOP_K_KEY], value=[str(top_k)],
                                 tensors=tensors)

    def send(self, request: Any) -> Any:
        """Send a Request message; the Response (raises TransientError/BadRequestError on RPC errors)."""
        try:
            return self._call(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            error = error_class(code, details)
            raise error(f"{self.address}: gRPC {getattr(code, 'name', code)}: {details}") from None

    def classify(self, images: Sequence[bytes], top_k: int = pipeline_wire.DEFAULT_TOP_K) -> List[ImageResult]:
        if not images:
            raise ValueError("classify needs at least one image")
        response = self.send(self.request(images, top_k))
        return check_response(response.err_no, response.err_msg, list(response.key), list(response.value),
                              len(images))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "GrpcClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
