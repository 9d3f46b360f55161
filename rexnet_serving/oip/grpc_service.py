"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` on an OipService.

The servicer is built from the protocol's own definitions (rexnet_serving/oip/proto, see the README
there) and runs on the grpcio/protobuf the service pins. Inputs come as ``raw_input_contents`` (one
per input, the binary form of rexnet_serving.oip.tensors; what tritonclient sends) or typed
``contents`` (``bytes_contents``, ``fp32_contents``, ...); outputs always go back as
``raw_output_contents``, as Triton answers. Errors: INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, ...
with the same messages as REST.

    server = grpc.server(executor, options=...)
    add_to_server(service, server)      # beside any other servicer on the same server
"""
from __future__ import annotations

from typing import Any, List

import grpc

from .proto import open_inference_grpc_pb2 as pb
from .proto import open_inference_grpc_pb2_grpc as pb_grpc
from .service import OipService
from .tensors import (InferRequest, InferResponse, InputTensor, OipError, RequestedOutput, check_shape,
                      datatype_check, invalid, raw_of, tensor_from_list, tensor_from_raw)

SERVICE_NAME = "inference.GRPCInferenceService"

# InferTensorContents field holding each data type in the typed form.
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _parameter(value: Any) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return getattr(value, kind) if kind else None


def parse_infer_request(request: Any) -> InferRequest:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise invalid(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs "
                      "(one per input, or none)")
    inputs: List[InputTensor] = []
    for index, item in enumerate(request.inputs):
        datatype = datatype_check(item.name, item.datatype)
        shape = check_shape(item.name, list(item.shape))
        if raw:
            array = tensor_from_raw(item.name, datatype, shape, raw[index])
        elif datatype in _CONTENTS:
            array = tensor_from_list(item.name, datatype, shape, getattr(item.contents, _CONTENTS[datatype]))
        else:
            raise invalid(f"input '{item.name}': {datatype} data must come in raw_input_contents")
        inputs.append(InputTensor(item.name, datatype, shape, array))
    outputs = None
    if request.outputs:
        outputs = []
        for out in request.outputs:
            k = _parameter(out.parameters["classification"]) if "classification" in out.parameters else 0
            outputs.append(RequestedOutput(out.name, k if k is not None else 0))
    params = {key: _parameter(value) for key, value in request.parameters.items()}
    return InferRequest(inputs=inputs, outputs=outputs, id=request.id, parameters=params)


def encode_infer_response(response: InferResponse) -> Any:
    message = pb.ModelInferResponse(model_name=response.model_name, model_version=response.model_version,
                                    id=response.id)
    for output in response.outputs:
        message.outputs.add(name=output.name, datatype=output.datatype, shape=list(output.shape))
        message.raw_output_contents.append(raw_of(output))
    return message


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The six RPCs of the protocol on an OipService (synchronous grpc.server)."""

    def __init__(self, service: OipService) -> None:
        self.service = service

    @staticmethod
    def _abort(context: grpc.ServicerContext, exc: OipError) -> None:
        context.abort(getattr(grpc.StatusCode, exc.kind), exc.message)

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=self.service.live())

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.service.ready())

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        meta = self.service.server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return pb.ModelReadyResponse(ready=self.service.model_ready(request.name, request.version))
        except OipError as exc:
            self._abort(context, exc)

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            meta = self.service.model_metadata(request.name, request.version)
        except OipError as exc:
            self._abort(context, exc)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]])

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            self.service.model(request.model_name, request.model_version)  # NOT_FOUND before parsing
            parsed = parse_infer_request(request)
            parsed.options = {"timeout_s": context.time_remaining(), "cancel_hook": context.add_callback}
            return encode_infer_response(self.service.infer(request.model_name, request.model_version, parsed))
        except OipError as exc:
            self._abort(context, exc)


def add_to_server(service: OipService, server: grpc.Server) -> OipServicer:
    """Register the protocol's servicer on ``server`` (before ``server.start()``)."""
    servicer = OipServicer(service)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return servicer

