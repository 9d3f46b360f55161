"""The Pipeline front doors' translation: Paddle's Pipeline Request/Response <-> the typed request/answer.

The Pipeline's HTTP (rexnet_pipelines.http_front builds a Request-like object from JSON) and gRPC
(:class:`PipelineServicer`, PipelineClient works as is) front doors call :func:`answer`: the Request's
``key``/``value`` lists and ``tensors`` become a rexnet_pipelines.request.ClassifyRequest (the contract
is rexnet_serving.pipeline_wire's), the ClassifyAnswer becomes ``err_no``/``err_msg`` and the ``results``
key. Nothing past this module sees the wire format.

Bytes tensors (elem_type 13) are taken as the encoded image. Paddle Serving's stock RequestOp passes
byte_data to ``np.load(allow_pickle=True)``, which unpickles whatever a client sends (code execution);
here those bytes are never interpreted, only decoded as an image (in the prepare op).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import grpc
from paddle_serving_server.pipeline.proto import pipeline_service_pb2, pipeline_service_pb2_grpc

from rexnet_serving import pipeline_wire

from .frontdoor import FrontDoor, Watch, serve_grpc, watch_rpc
from .request import ClassifyAnswer, ClassifyRequest
from .settings import RexnetSettings


def to_request(message: Any) -> ClassifyRequest:
    """The typed request of a Pipeline Request (Paddle's protobuf message, or any object with its
    fields); pipeline_wire.RequestError when it is malformed. Its top-k and image count are checked against
    the model it names in the prepare op, which knows the model."""
    if len(message.key) != len(message.value):
        raise pipeline_wire.RequestError("invalid_request", f"{len(message.key)} keys but {len(message.value)} values")
    fields: Dict[str, Any] = {}
    problems: List[str] = []

    def put(name: str, value: Any) -> None:
        if name in fields:
            problems.append(f"key {name!r} appears more than once")
        fields[name] = value

    for key, value in zip(message.key, message.value):
        put(key, value)
    for tensor in message.tensors:
        if tensor.elem_type == pipeline_wire.BYTES_ELEM_TYPE:
            put(tensor.name, tensor.byte_data)
        elif tensor.elem_type == pipeline_wire.STRING_ELEM_TYPE:
            put(tensor.name, "".join(tensor.str_data))
        else:
            problems.append(f"tensor {tensor.name!r} has elem_type {tensor.elem_type}; send images as bytes "
                            f"(elem_type {pipeline_wire.BYTES_ELEM_TYPE}) or base64 values")
    if problems:
        raise pipeline_wire.RequestError("invalid_request", problems[0])
    model, version = pipeline_wire.model_of(fields)
    unknown = [k for k in fields if k not in (pipeline_wire.TOP_K_KEY, pipeline_wire.MODEL_KEY, pipeline_wire.MODEL_VERSION_KEY)
               and not pipeline_wire.is_image_key(k)]
    if unknown:
        raise pipeline_wire.RequestError("unknown_key", f"unknown key(s) {', '.join(sorted(k[:40] for k in unknown))}: "
                                                   "send 'image' (or 'image_0', 'image_1', ...) and optionally "
                                                   "'top_k', 'model', 'model_version'")
    keys = pipeline_wire.order_image_keys([k for k in fields if pipeline_wire.is_image_key(k)])
    return ClassifyRequest(images=[fields[k] for k in keys], top_k=_top_k(fields.get(pipeline_wire.TOP_K_KEY)),
                           model=model, version=version, log_id=message.logid)


def _top_k(text: Any) -> Optional[int]:
    if text is None:
        return None
    if not isinstance(text, str):
        raise pipeline_wire.RequestError("invalid_top_k", "top_k must be sent as text (a key/value pair)")
    try:
        return int(text.strip())
    except ValueError:
        raise pipeline_wire.RequestError("invalid_top_k", f"top_k must be an integer, got {text!r}") from None


def to_response(answer: ClassifyAnswer) -> Any:
    """The Pipeline Response of an answer: ``results`` whenever there are any (also with INVALID_IMAGE)."""
    response = pipeline_service_pb2.Response(err_no=answer.status, err_msg=answer.message)
    if answer.results:
        response.key.append(pipeline_wire.RESULTS_KEY)
        response.value.append(pipeline_wire.encode_results(answer.results))
    return response


def answer(front: FrontDoor, message: Any, timeout_s: Optional[float] = None, watch: Optional[Watch] = None) -> Any:
    """The Pipeline Response to a Pipeline Request, through ``front``."""
    if message.name and message.name != front.name:
        return to_response(front.refuse(pipeline_wire.NO_SERVICE, f"unknown service {message.name!r}: this server "
                                                             f"serves {front.name!r} (POST /{front.name}/prediction)"))
    return to_response(front.call(lambda: to_request(message), timeout_s, watch))


class PipelineServicer(pipeline_service_pb2_grpc.PipelineServiceServicer):
    """Paddle Serving's PipelineService over gRPC, through the front door (PipelineClient works as is)."""

    def __init__(self, front: FrontDoor) -> None:
        self.front = front

    def inference(self, request: Any, context: Any) -> Any:
        return answer(self.front, request, context.time_remaining(), lambda ticket: watch_rpc(context, ticket))


def start_grpc_server(front: FrontDoor, host: str, port: int, workers: int, limits: RexnetSettings) -> grpc.Server:
    """The PipelineService on ``host:port``; raises OSError when the port cannot be bound."""
    return serve_grpc(lambda server: pipeline_service_pb2_grpc.add_PipelineServiceServicer_to_server(
        PipelineServicer(front), server), host, port, workers, limits)
