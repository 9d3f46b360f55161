"""The Open Inference Protocol core (rexnet_serving.oip) on a real export: handle_rest called directly,
the gRPC servicer on a real grpc.server, and the official tritonclient (HTTP and gRPC, the test extra's,
in a child process) against a tiny real server on 127.0.0.1 (a stdlib http.server around
handle_rest, a grpc.server with the servicer): the way rexnet-serve mounts them."""
from __future__ import annotations

import base64
import json
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Tuple

import grpc
import numpy as np
import pytest

from conftest import REPO_ROOT, SCORED_CLASSES, tritonclient_report
from images import encode, photo
from rexnet_serving.classifier import Classifier
from rexnet_serving.oip import ClassifierModel, OipService
from rexnet_serving.oip.grpc_service import add_to_server
from rexnet_serving.oip.proto import open_inference_grpc_pb2 as pb
from rexnet_serving.oip.proto import open_inference_grpc_pb2_grpc as pb_grpc
from rexnet_serving.oip.rest import handle_rest
from rexnet_serving.oip.tensors import serialize_bytes

MODEL = "scored"
SIZE = 224


@pytest.fixture(scope="module")
def classifier(scored_model_dir: Path) -> Classifier:
    return Classifier(scored_model_dir, mkldnn=False, max_batch=4)


@pytest.fixture(scope="module")
def service(classifier: Classifier) -> OipService:
    return OipService([ClassifierModel(classifier, MODEL, "1", max_images=4),
                       ClassifierModel(classifier, MODEL, "2", max_images=4)])


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return encode(photo("china", (320, 240)), "jpeg", quality=90)


BAD = b"\xff\xd8\xff\xe0 this is no jpeg"
BAD_CODE = "truncated"


def rest(service: OipService, method: str, path: str, body=None, headers=None) -> Tuple[int, dict, bytes]:
    data = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
    return handle_rest(service, method, path, headers or {}, data)


def rest_json(service: OipService, method: str, path: str, body=None, headers=None) -> Tuple[int, dict]:
    status, _, data = rest(service, method, path, body, headers)
    return status, json.loads(data)


# -- REST, called directly ----------------------------------------------------------------------------
def test_rest_health_and_metadata(service: OipService) -> None:
    assert rest(service, "GET", "/v2/health/live")[0] == 200
    assert rest(service, "GET", "/v2/health/ready")[0] == 200
    status, meta = rest_json(service, "GET", "/v2")
    assert status == 200 and meta["name"] == "rexnet-serving"
    assert set(meta["extensions"]) >= {"classification", "binary_tensor_data"}
    status, meta = rest_json(service, "GET", f"/v2/models/{MODEL}")
    assert status == 200 and meta["versions"] == ["1", "2"] and meta["platform"] == "paddle_inference"
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                              {"name": "x", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE]}]
    assert meta["outputs"][0] == {"name": "probs", "datatype": "FP32", "shape": [-1, SCORED_CLASSES]}
    assert rest_json(service, "GET", f"/v2/models/{MODEL}/versions/2")[1]["versions"] == ["2"]
    assert rest(service, "GET", f"/v2/models/{MODEL}/versions/1/ready")[0] == 200
    status, body = rest_json(service, "GET", f"/v2/models/{MODEL}/versions/9/ready")
    assert status == 404 and "has no version '9'" in body["error"]
    status, body = rest_json(service, "GET", "/v2/models/nope")
    assert status == 404 and body["error"].startswith("unknown model 'nope'")
    assert rest(service, "GET", "/v3/anything")[0] == 404
    assert rest(service, "GET", f"/v2/models/{MODEL}/infer")[0] == 405


def test_not_ready_is_503(classifier: Classifier) -> None:
    state = {"ready": False}
    service = OipService([ClassifierModel(classifier, MODEL)], ready=lambda: state["ready"])
    assert rest(service, "GET", "/v2/health/ready")[0] == 503
    assert rest(service, "GET", f"/v2/models/{MODEL}/ready")[0] == 503
    state["ready"] = True
    assert rest(service, "GET", "/v2/health/ready")[0] == 200


def test_rest_json_images_match_the_classifier(service: OipService, classifier: Classifier, jpeg: bytes) -> None:
    body = {"id": "a1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                                    "data": [base64.b64encode(x).decode() for x in (jpeg, BAD, jpeg)]}],
            "outputs": [{"name": "probs"}]}
    status, out = rest_json(service, "POST", f"/v2/models/{MODEL}/infer", body)
    assert status == 200 and out["id"] == "a1" and out["model_version"] == "2"
    by_name = {o["name"]: o for o in out["outputs"]}
    assert set(by_name) == {"probs", "errors"}  # errors added: one image was refused
    probs = np.array(by_name["probs"]["data"], np.float32).reshape(by_name["probs"]["shape"])
    expected = classifier.probabilities(classifier.preprocess(classifier.decode([jpeg])[0]))[0]
    np.testing.assert_allclose(probs[0], expected, atol=1e-6)
    np.testing.assert_allclose(probs[2], expected, atol=1e-6)
    assert not probs[1].any()
    errors = by_name["errors"]["data"]
    assert errors[0] == errors[2] == ""
    assert json.loads(errors[1]) == {"code": BAD_CODE, "message": str(classifier.decode([BAD])[1][0])}


def test_rest_classification_and_binary_data(service: OipService, classifier: Classifier, jpeg: bytes) -> None:
    raw = serialize_bytes([jpeg, BAD])
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "probs", "parameters": {"classification": 3, "binary_data": True}}]}
                        ).encode()
    status, headers, body = rest(service, "POST", f"/v2/models/{MODEL}/versions/1/infer", header + raw,
                                 {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    length = int(headers["Inference-Header-Content-Length"])
    meta = json.loads(body[:length])
    probs, errors = meta["outputs"]
    assert probs["datatype"] == "BYTES" and probs["shape"] == [2, 3] and "binary_data_size" in probs["parameters"]
    assert errors["name"] == "errors" and "data" in errors  # not asked for in binary: JSON
    from rexnet_serving.oip.tensors import deserialize_bytes
    strings = [s.decode() for s in deserialize_bytes("probs", body[length:length + probs["parameters"]["binary_data_size"]])]
    top = classifier.classify([jpeg], top_k=3)[0].predictions
    assert strings[:3] == [f"{p.score:f}:{p.class_id}:{p.label}" for p in top]
    assert strings[3:] == [strings[3]] * 3 and strings[3].startswith("0.000000:-1:error:")


def test_rest_x_input(service: OipService, classifier: Classifier) -> None:
    batch = np.random.default_rng(1).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(batch.shape),
                                     "parameters": {"binary_data_size": batch.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    status, headers, body = rest(service, "POST", f"/v2/models/{MODEL}/infer", header + batch.tobytes(),
                                 {"inference-header-content-length": str(len(header))})
    assert status == 200
    length = int(headers["Inference-Header-Content-Length"])
    (probs,) = json.loads(body[:length])["outputs"]
    got = np.frombuffer(body[length:], np.float32).reshape(probs["shape"])
    np.testing.assert_allclose(got, classifier.probabilities(batch), atol=1e-6)


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    ({"inputs": []}, "non-empty 'inputs'"),
    ({"inputs": [{"name": "y", "datatype": "FP32", "shape": [1], "data": [1.0]}], }, "expected exactly one input"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.0] * 192}]},
     "must have shape [N, 3, 224, 224]"),
    ({"inputs": [{"name": "x", "datatype": "INT64", "shape": [1], "data": [1]}]}, "must be FP32"),
    ({"inputs": [{"name": "x", "datatype": "FP33", "shape": [1], "data": [1]}]}, "unknown datatype"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["aGk="]}]},
     "shape [2] holds 2 elements, the data has 1"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [5], "data": ["aGk="] * 5}]}, "send 1..4"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}],
      "outputs": [{"name": "logits"}]}, "unknown output 'logits'"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}],
      "outputs": [{"name": "probs", "parameters": {"classification": 11}}]}, "classification must be an integer 1..10"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}]},
     "no image could be classified: image 0:"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}]},
     "binary_data_size 9 does not fit"),
])
def test_rest_bad_requests_are_400(service: OipService, body, message: str) -> None:
    status, _, data = rest(service, "POST", f"/v2/models/{MODEL}/infer", body)
    assert status == 400, data
    assert message in json.loads(data)["error"]


def test_rest_binary_bytes_and_header_errors(service: OipService, jpeg: bytes) -> None:
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 10}}]}).encode()
    truncated = serialize_bytes([jpeg])[:10]
    status, _, data = rest(service, "POST", f"/v2/models/{MODEL}/infer", header + truncated,
                           {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "runs past the end" in json.loads(data)["error"]
    status, _, data = rest(service, "POST", f"/v2/models/{MODEL}/infer", header,
                           {"Inference-Header-Content-Length": "99999"})
    assert status == 400 and "Inference-Header-Content-Length" in json.loads(data)["error"]
    status, _, data = rest(service, "POST", "/v2/models/nope/infer", b"garbage")
    assert status == 404  # the model is looked up before the body is read


# -- gRPC, with the generated stub ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def servers(service: OipService) -> Iterator[Tuple[int, int]]:
    """(http port, grpc port): handle_rest in a stdlib ThreadingHTTPServer and the servicer in a grpc.server."""
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    add_to_server(service, grpc_server)
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, headers, data = handle_rest(service, self.command, self.path, dict(self.headers.items()), body)
            self.send_response(status)
            for key, value in headers.items():
                if key.lower() != "content-length":
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, *args) -> None:
            pass

    http_server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=http_server.serve_forever, daemon=True)
    thread.start()
    try:
        yield http_server.server_address[1], grpc_port
    finally:
        http_server.shutdown()
        http_server.server_close()
        grpc_server.stop(None)


@pytest.mark.server
def test_grpc_servicer(servers: Tuple[int, int], classifier: Classifier, jpeg: bytes) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{servers[1]}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest()).live
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version="1")).ready
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL))
        assert list(meta.versions) == ["1", "2"] and meta.inputs[1].name == "x"
        request = pb.ModelInferRequest(model_name=MODEL, id="g1")
        request.inputs.add(name="image", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([jpeg, BAD])
        response = stub.ModelInfer(request)
        assert response.id == "g1" and [o.name for o in response.outputs] == ["probs", "errors"]
        probs = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(list(response.outputs[0].shape))
        np.testing.assert_allclose(probs[0], classifier.classify_arrays(classifier.decode([jpeg])[0])[0], atol=1e-6)
        batch = np.zeros((1, 3, SIZE, SIZE), np.float32)
        request = pb.ModelInferRequest(model_name=MODEL, model_version="2")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 3, SIZE, SIZE])
        request.raw_input_contents.append(batch.tobytes())
        assert list(stub.ModelInfer(request).outputs[0].shape) == [1, SCORED_CLASSES]
        for bad, code in [(pb.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND),
                          (pb.ModelInferRequest(model_name=MODEL, model_version="7"), grpc.StatusCode.NOT_FOUND),
                          (pb.ModelInferRequest(model_name=MODEL), grpc.StatusCode.INVALID_ARGUMENT)]:
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(bad)
            assert info.value.code() == code
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "unknown model 'nope'" in info.value.details()


# -- the official tritonclient ------------------------------------------------------------------------
@pytest.mark.server
@pytest.mark.slow
def test_tritonclient_http_and_grpc(servers: Tuple[int, int], classifier: Classifier, jpeg: bytes,
                                    tmp_path: Path) -> None:
    report = tritonclient_report(servers[0], servers[1], MODEL, jpeg, BAD, SIZE, tmp_path)
    expected = classifier.classify_arrays(classifier.decode([jpeg])[0])[0]
    top = classifier.classify([jpeg], top_k=3)[0].predictions
    batch = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    x_probs = classifier.probabilities(batch)
    for protocol in ("http", "grpc"):
        got = report[protocol]
        assert got["live"] and got["ready"] and got["model_ready"] and got["model_ready_v1"] == {"ok": True}
        assert got["server_metadata"]["name"] == "rexnet-serving"
        assert got["model_metadata"]["versions"] == ["1", "2"]
        images = got["images"]["ok"]
        assert images["probs_shape"] == [3, SCORED_CLASSES] and images["id"] == "req-7"
        np.testing.assert_allclose(images["probs"][0], expected, atol=1e-6)
        assert images["errors"][0] == "" and json.loads(images["errors"][1])["code"]
        classes = got["images_class_count"]["ok"]
        assert classes["probs_shape"] == [3, 3]
        assert classes["probs"][:3] == [f"{p.score:f}:{p.class_id}:{p.label}" for p in top]
        assert classes["probs"][3].startswith("0.000000:-1:error:")
        np.testing.assert_allclose(got["x"]["ok"]["probs"], x_probs, atol=1e-6)
        assert got["x_class_count"]["ok"]["shape"] == [2, 2]
        assert "unknown model 'no_such_model'" in got["unknown_model"]["error"]
        assert "must have shape [N, 3, 224, 224]" in got["bad_shape"]["error"]
        assert "no image could be classified" in got["only_bad_images"]["error"]
    np.testing.assert_allclose(report["http"]["x_json"]["ok"]["probs"], x_probs, atol=1e-5)
    assert report["http"]["unknown_model"]["status"] == "404"
    assert report["http"]["bad_shape"]["status"] == "400"
    assert report["grpc"]["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert report["grpc"]["bad_shape"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert report["http"]["unknown_model_ready"] == {"ok": False}  # tritonclient HTTP: any non-200 is "not ready"
    assert report["grpc"]["unknown_model_ready"]["status"] == "StatusCode.NOT_FOUND"


def test_protocol_definitions_come_from_the_setup_built_descriptor() -> None:
    """The messages and the service are the protocol's, built from the descriptor that the setup takes
    from the kserve package (scripts/oip_descriptor.py), not from anything committed here."""
    assert (REPO_ROOT / "rexnet_serving/oip/proto/inference_v2.desc").is_file()
    assert pb.SERVICE.full_name == "inference.GRPCInferenceService"
    assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
            "ModelInfer"} <= set(pb.SERVICE.methods_by_name)
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"x"])
    assert pb.ModelInferRequest.FromString(request.SerializeToString()) == request
