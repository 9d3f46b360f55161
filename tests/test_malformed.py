"""Malformed input on every front door is the protocol's bad-request error naming the field, never a
server fault (HTTP 500, err_no 10000, gRPC UNAVAILABLE/INTERNAL, bRPC EINTERNAL).

One table per protocol, one rexnet-serve for all of them (Pipeline HTTP and gRPC, v2 REST and gRPC) and
one in-process bRPC server for the tensor feed: unicode digits, huge integers, deep nesting, nulls, wrong
types, overflowing shapes. Each row says what is sent and the words the error must contain.
"""
from __future__ import annotations

import base64
import json
import socket
from pathlib import Path
from typing import Any, Iterator, Tuple

import grpc
import pytest
import requests

from brpc_wire import responses
from images import encode, photo
from servers import ServiceProcess
from rexnet_serving import pipeline_wire
pytestmark = pytest.mark.server

MODEL = "scored"
B64 = base64.b64encode(encode(photo("china", (64, 48)), "jpeg")).decode()
DEEP = 200_000
INVALID_ARGUMENT = 3  # the gateway's JSON error code (gRPC INVALID_ARGUMENT)


@pytest.fixture(scope="module")
def service(scored_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    work = tmp_path_factory.mktemp("malformed")
    (work / "repo" / MODEL).mkdir(parents=True)
    (work / "repo" / MODEL / "3").symlink_to(scored_model_dir, target_is_directory=True)
    svc = ServiceProcess(work / "repo", work, model_flag="--model-repository")
    try:
        yield svc
    finally:
        svc.stop()


# -- Pipeline HTTP: (JSON body text, HTTP status, words of the error) -----------------------------------------
def _fields(**extra: str) -> str:
    keys, values = ["image"] + list(extra), [B64] + list(extra.values())
    return json.dumps({"key": keys, "value": values})


PIPELINE_HTTP = {
    "null tensor": ('{"tensors": [null]}', 400, "tensors[0]"),
    "tensor of wrong type": ('{"tensors": ["image"]}', 400, "tensors[0]"),
    "tensor field of wrong type": ('{"tensors": [{"elem_type": 1, "float_data": "x"}]}', 400, "tensors[0]"),
    "tensor shape past 2**64": (f'{{"tensors": [{{"shape": [{2**64}]}}]}}', 400, "tensors[0]"),
    "INT64 data 2**70": (f'{{"tensors": [{{"elem_type": 0, "int64_data": [{2**70}]}}]}}', 400, "tensors[0]"),
    "INT64 data 1e400": ('{"tensors": [{"elem_type": 0, "int64_data": [1e400]}]}', 400, "tensors[0]"),
    "float tensor": ('{"tensors": [{"name": "x", "elem_type": 1, "float_data": [0.5]}]}', 200, "elem_type"),
    "deep nesting": ('{"key": ' + "[" * DEEP + "]" * DEEP + "}", 400, "nests"),
    "null key": ('{"key": [null], "value": ["x"]}', 400, "key"),
    "key not a list": ('{"key": "image", "value": ["x"]}', 400, "key"),
    "body not an object": ("[1, 2]", 400, "JSON object"),
    "not JSON": ("{'key': 1}", 400, "not valid JSON"),
    "unknown field": ('{"keys": []}', 400, "'keys'"),
    "logid unicode digit": ('{"logid": "\u00b2"}', 400, "logid"),
    "logid 2**70": (f'{{"logid": {2**70}}}', 400, "logid"),
    "logid a float": ('{"logid": 1.5}', 400, "logid"),
    "model_version unicode digit": (_fields(model_version="\u00b2"), 200, "model_version"),
    "model_version 5000 digits": (_fields(model_version="7" * 5000), 200, "model_version"),
    "image key with 5000 digits": (json.dumps({"key": ["image_" + "1" * 5000], "value": [B64]}), 200, "unknown key"),
    "top_k unicode digit": (_fields(top_k="\u00b2"), 200, "top_k"),
    "top_k 5000 digits": (_fields(top_k="9" * 5000), 200, "top_k"),
    "keys without values": ('{"key": ["image", "top_k"], "value": ["x"]}', 200, "2 keys but 1 values"),
}


@pytest.mark.parametrize("body, status, words", PIPELINE_HTTP.values(), ids=PIPELINE_HTTP.keys())
def test_pipeline_http(service: ServiceProcess, body: str, status: int, words: str) -> None:
    reply = requests.post(service.url, data=body.encode(), headers={"Content-Type": "application/json"}, timeout=60)
    assert reply.status_code == status, reply.text[:300]
    answer = reply.json()
    if status == 400:
        assert answer["code"] == INVALID_ARGUMENT and words in answer["message"], answer
    else:
        assert answer["err_no"] == pipeline_wire.INVALID_REQUEST and words in answer["err_msg"], answer


# -- Pipeline gRPC: Paddle's own PipelineClient, and the raw message where it cannot send a case ---------------
PIPELINE_GRPC = {
    "model_version unicode digit": ({"image": B64, "model_version": "\u00b2"}, "model_version"),
    "model_version 5000 digits": ({"image": B64, "model_version": "7" * 5000}, "model_version"),
    "image key with 5000 digits": ({"image_" + "1" * 5000: B64}, "unknown key"),
    "top_k unicode digit": ({"image": B64, "top_k": "\u00b2"}, "top_k"),
    "top_k 5000 digits": ({"image": B64, "top_k": "9" * 5000}, "top_k"),
    "no image": ({"top_k": "1"}, "image"),
}


@pytest.fixture(scope="module")
def pipeline_client(service: ServiceProcess) -> Any:
    from paddle_serving_server.pipeline import PipelineClient
    client = PipelineClient()
    client.connect([f"127.0.0.1:{service.grpc}"])
    return client


@pytest.mark.parametrize("feed, words", PIPELINE_GRPC.values(), ids=PIPELINE_GRPC.keys())
def test_pipeline_grpc(pipeline_client: Any, feed: dict, words: str) -> None:
    reply = pipeline_client.predict(feed_dict=feed, fetch=["results"])
    assert reply.err_no == pipeline_wire.INVALID_REQUEST and words in reply.err_msg, (reply.err_no, reply.err_msg)


@pytest.mark.parametrize("tensor, words", [
    ({"name": "image", "elem_type": 1, "float_data": [0.5] * 10, "shape": [10]}, "elem_type"),
    ({"name": "image", "elem_type": 0, "int64_data": [2**62], "shape": [2**31 - 1, 2**31 - 1]}, "elem_type"),
], ids=["float tensor", "int64 tensor with an overflowing shape"])
def test_pipeline_grpc_raw_tensors(service: ServiceProcess, tensor: dict, words: str) -> None:
    from paddle_serving_server.pipeline.proto import pipeline_service_pb2, pipeline_service_pb2_grpc
    request = pipeline_service_pb2.Request(name="rexnet", tensors=[pipeline_service_pb2.Tensor(**tensor)])
    with grpc.insecure_channel(f"127.0.0.1:{service.grpc}") as channel:
        reply = pipeline_service_pb2_grpc.PipelineServiceStub(channel).inference(request, timeout=60)
    assert reply.err_no == pipeline_wire.INVALID_REQUEST and words in reply.err_msg, (reply.err_no, reply.err_msg)


# -- v2 REST: (body, extra headers, words of the 400's error) -----------------------------------------------
def _v2(inputs: Any) -> str:
    return json.dumps({"inputs": inputs})


def _image_input(**overrides: Any) -> dict:
    return {"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64], **overrides}


BINARY = _v2([{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 4}}])
V2_REST = {
    "header length unicode digit": (BINARY + "\0\0\0\0", {"Inference-Header-Content-Length": "\u00b2"},
                                    "Inference-Header-Content-Length"),
    "header length 5000 digits": (BINARY + "\0\0\0\0", {"Inference-Header-Content-Length": "9" * 5000},
                                  "Inference-Header-Content-Length"),
    "deep nesting": ('{"inputs": ' + "[" * DEEP + "]" * DEEP + "}", {}, "nests"),
    "null inputs": ('{"inputs": null}', {}, "inputs"),
    "null input": ('{"inputs": [null]}', {}, "each input"),
    "null data element": (_v2([_image_input(data=[None])]), {}, "BYTES data must be strings"),
    "shape 2**64": (_v2([_image_input(shape=[2**64])]), {}, "shape"),
    "shape unicode digit": (_v2([_image_input(shape=["\u00b2"])]), {}, "shape"),
    "shape of booleans": (_v2([_image_input(shape=[True])]), {}, "shape"),
    "shape overflowing int64": (_v2([_image_input(shape=[2**32, 2**32])]), {}, f"holds {2**64} elements"),
    "INT64 data 2**70": (_v2([{"name": "x", "datatype": "INT64", "shape": [1], "data": [2**70]}]), {}, "INT64"),
    "INT64 data 1e400": ('{"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [1e400]}]}', {},
                         "INT64"),
    "FP32 data of strings": (_v2([{"name": "x", "datatype": "FP32", "shape": [1], "data": ["a"]}]), {}, "FP32"),
    "unknown datatype": (_v2([_image_input(datatype="FP128")]), {}, "datatype"),
    "binary size unicode digit": (_v2([_image_input(parameters={"binary_data_size": "\u00b2"})]), {},
                                  "binary_data_size"),
    "id not a string": ('{"id": 5, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}',
                        {}, "'id'"),
}


@pytest.mark.parametrize("body, headers, words", V2_REST.values(), ids=V2_REST.keys())
def test_v2_rest(service: ServiceProcess, body: str, headers: dict, words: str) -> None:
    reply = requests.post(f"http://127.0.0.1:{service.oip_http}/v2/models/{MODEL}/infer", data=body.encode(),
                          headers={"Content-Type": "application/json", **headers}, timeout=60)
    assert reply.status_code == 400, reply.text[:300]
    assert words in reply.json()["error"], reply.json()


# -- v2 gRPC -----------------------------------------------------------------------------------------------
def _tensor(**fields: Any) -> Any:
    from rexnet_serving.oip.proto import open_inference_grpc_pb2 as pb
    contents = fields.pop("contents", None)
    tensor = pb.ModelInferRequest.InferInputTensor(**fields)
    if contents is not None:
        tensor.contents.CopyFrom(pb.InferTensorContents(**contents))
    return tensor


V2_GRPC = {
    "shape overflowing int64": ({"inputs": [_tensor(name="image", datatype="BYTES", shape=[2**32, 2**32],
                                                    contents={"bytes_contents": [b"x"]})]}, f"holds {2**64} elements"),
    "negative shape": ({"inputs": [_tensor(name="image", datatype="BYTES", shape=[-1],
                                           contents={"bytes_contents": [b"x"]})]}, "shape"),
    "unknown datatype": ({"inputs": [_tensor(name="image", datatype="\u00b2", shape=[1])]}, "datatype"),
    "raw contents count": ({"inputs": [_tensor(name="image", datatype="BYTES", shape=[1])],
                            "raw_input_contents": [b"", b""]}, "raw_input_contents"),
    "BYTES element past the end": ({"inputs": [_tensor(name="image", datatype="BYTES", shape=[1])],
                                    "raw_input_contents": [b"\xff\xff\xff\x7f"]}, "runs past the end"),
    "FP32 data missing": ({"inputs": [_tensor(name="x", datatype="FP32", shape=[1, 3, 224, 224],
                                              contents={"fp32_contents": [0.5]})]}, "holds 150528 elements"),
}


@pytest.mark.parametrize("fields, words", V2_GRPC.values(), ids=V2_GRPC.keys())
def test_v2_grpc(service: ServiceProcess, fields: dict, words: str) -> None:
    from rexnet_serving.oip.proto import open_inference_grpc_pb2 as pb
    from rexnet_serving.oip.proto import open_inference_grpc_pb2_grpc as pb_grpc
    with grpc.insecure_channel(f"127.0.0.1:{service.oip_grpc}") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(pb.ModelInferRequest(model_name=MODEL, **fields),
                                                                 timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert words in caught.value.details(), caught.value.details()


# -- bRPC tensor and image feeds ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def brpc_port(random_model_dir: Path) -> Iterator[int]:
    from rexnet_serving.brpc.server import NativeServer, ServerOptions
    from rexnet_serving.brpc.service import ModelService
    server = NativeServer(ModelService(random_model_dir, cpu_threads=1), ServerOptions(port=0, workers=1))
    port = server.start()
    yield port
    server.stop()


def _brpc_tensor(**fields: Any) -> Any:
    from rexnet_serving.brpc.tensors import Tensor
    return Tensor(**fields)


BRPC = {
    "x with an overflowing shape": ([dict(alias_name="x", elem_type=1, shape=[2**31 - 1] * 4, float_data=[0.5])],
                                    "do not fill shape"),
    "x with a negative shape": ([dict(alias_name="x", elem_type=1, shape=[-1, 3, 224, 224])], "negative dimension"),
    "x of the wrong elem_type": ([dict(alias_name="x", elem_type=0, shape=[1], int64_data=[2**62])], "elem_type"),
    "unknown feed": ([dict(alias_name="\u00b2", elem_type=1, shape=[1], float_data=[0.5])], "unknown feed"),
    "top_k of 2**63-1": ([dict(alias_name="image", elem_type=20, shape=[1], data=[B64]),
                          dict(alias_name="top_k", elem_type=0, shape=[1], int64_data=[2**63 - 1])], "top_k"),
    "top_k a float": ([dict(alias_name="image", elem_type=20, shape=[1], data=[B64]),
                       dict(alias_name="top_k", elem_type=1, shape=[1], float_data=[1.0])], "top_k"),
    "1000 empty image strings": ([dict(alias_name="image", elem_type=20, shape=[1], data=[""] * 1000)],
                                 "1000 images in one request"),
    "100,000 empty image strings": ([dict(alias_name="image", elem_type=20, shape=[1], data=[""] * 100_000)],
                                    "refused before parsing"),
    "image of elem_type float": ([dict(alias_name="image", elem_type=1, shape=[1], float_data=[0.5])],
                                 "elem_type"),
}


@pytest.mark.parametrize("tensors, words", BRPC.values(), ids=BRPC.keys())
def test_brpc(brpc_port: int, tensors: list, words: str) -> None:
    from rexnet_serving.brpc.framing import Errno, encode_frame, request_meta
    from rexnet_serving.brpc.tensors import Request
    request = Request(tensor=[_brpc_tensor(**t) for t in tensors], fetch_var_names=[])
    meta = request_meta("baidu.paddle_serving.predictor.general_model.GeneralModelService", "inference", 1)
    with socket.create_connection(("127.0.0.1", brpc_port), timeout=60) as sock:
        sock.sendall(encode_frame(meta, request.SerializeToString()))
        (answer,) = responses(sock, 1)
    response: Tuple[int, str] = (answer.meta.response.error_code, answer.meta.response.error_text)
    assert response[0] == Errno.EREQUEST and words in response[1], response
