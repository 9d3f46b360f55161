"""Client stub and server registration for ``inference.GRPCInferenceService``, from the service's
descriptor (open_inference_grpc_pb2): every unary method it declares, with its message classes.

Written against grpcio's public API instead of generated, because the messages come from a descriptor at
import time (see open_inference_grpc_pb2), not from a .proto compiled here.
"""
from __future__ import annotations

from typing import Any

import grpc

from . import open_inference_grpc_pb2 as pb

_SERVICE = pb.SERVICE.full_name  # "inference.GRPCInferenceService"


def _classes(method: Any) -> tuple:
    return getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)


class GRPCInferenceServiceStub:
    """``stub.ModelInfer(request, timeout=...)`` and the other methods, over a grpc.Channel."""

    def __init__(self, channel: grpc.Channel) -> None:
        for method in pb.SERVICE.methods:
            request, response = _classes(method)
            setattr(self, method.name, channel.unary_unary(
                f"/{_SERVICE}/{method.name}", request_serializer=request.SerializeToString,
                response_deserializer=response.FromString))


class GRPCInferenceServiceServicer:
    """Base class: every method answers UNIMPLEMENTED until a subclass defines it."""

    def __getattr__(self, name: str) -> Any:
        if name in pb.SERVICE.methods_by_name:
            def unimplemented(request: Any, context: grpc.ServicerContext) -> Any:
                context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented")
            return unimplemented
        raise AttributeError(name)


def add_GRPCInferenceServiceServicer_to_server(servicer: Any, server: grpc.Server) -> None:
    handlers = {}
    for method in pb.SERVICE.methods:
        request, response = _classes(method)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name), request_deserializer=request.FromString,
            response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
