"""HTTP and gRPC clients without a server: request forms, answer mapping, unreachable service.
(Against a real server: tests/test_service.py.)"""
from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, free_port
from rexnet_pipelines import protocol
from rexnet_serving.clients.base import BadRequestError, ClientError, TransientError, make_client
from rexnet_serving.clients.grpc import GrpcClient, pipeline_messages
from rexnet_serving.clients.http import HttpClient, check_response, with_default_port
from rexnet_serving.results import ImageResult, Prediction

OK_RESULT = ImageResult([Prediction(3, "three", 0.5)])
BAD_RESULT = ImageResult.failure("truncated", "cut short")


def test_http_body_uses_pipeline_key_value_with_base64():
    client = HttpClient("127.0.0.1:1234", service_name="rexnet")
    assert client.url == "http://127.0.0.1:1234/rexnet/prediction"
    body = client.request_body([b"\xff\xd8a", b"png"], top_k=3)
    assert body["key"] == ["image_0", "image_1", "top_k"]
    assert body["value"] == [base64.b64encode(b"\xff\xd8a").decode(), base64.b64encode(b"png").decode(), "3"]
    json.dumps(body)


def test_grpc_request_sends_raw_bytes_tensors():
    client = GrpcClient("127.0.0.1:1234", service_name="rexnet")
    request = client.request([b"\x00\x01raw"], top_k=2)
    assert request.name == "rexnet"
    assert (list(request.key), list(request.value)) == (["top_k"], ["2"])
    (tensor,) = request.tensors
    assert (tensor.name, tensor.elem_type, tensor.byte_data) == ("image", 13, b"\x00\x01raw")
    client.close()


def test_default_ports():
    assert with_default_port("example", 18080) == "example:18080"
    assert with_default_port("example:1", 18080) == "example:1"
    assert with_default_port("[::1]", 9993) == "[::1]:9993"


def test_check_response_maps_err_no_to_results_or_errors():
    text = protocol.encode_results([OK_RESULT, BAD_RESULT])
    assert check_response(0, "", ["results"], [text], 2) == [OK_RESULT, BAD_RESULT]
    every_bad = protocol.encode_results([BAD_RESULT])
    assert check_response(protocol.INVALID_IMAGE, "no image", ["results"], [every_bad], 1) == [BAD_RESULT]
    with pytest.raises(BadRequestError, match="err_no 51: invalid_top_k"):
        check_response(protocol.INVALID_REQUEST, "invalid_top_k: ...", [], [], 1)
    with pytest.raises(BadRequestError, match="3002"):
        check_response(protocol.NO_SERVICE, "unknown service", [], [], 1)
    with pytest.raises(TransientError, match="err_no 3001"):
        check_response(protocol.CLOSED_ERROR, "dag closed.", [], [], 1)
    with pytest.raises(TransientError, match="err_no 6000"):
        check_response(protocol.TIMEOUT, "timeout", [], [], 1)
    with pytest.raises(ClientError, match="sent 3 images but got 2"):
        check_response(0, "", ["results"], [text], 3)


@pytest.mark.parametrize("protocol_name", ["http", "grpc"])
def test_unreachable_service_is_transient(protocol_name):
    client = make_client(protocol_name, f"127.0.0.1:{free_port()}", timeout=5)
    with pytest.raises(TransientError):
        client.classify([b"\xff\xd8\xff"], top_k=1)
    client.close()


def test_empty_request_is_refused_locally():
    with pytest.raises(ValueError):
        HttpClient("127.0.0.1:1").classify([])


def test_grpc_client_import_leaves_the_working_directory_alone(tmp_path):
    # Importing Paddle Serving's pipeline package would create PipelineServingLogs/ here.
    code = ("from rexnet_serving.clients.grpc import pipeline_messages; "
            "assert pipeline_messages().Request(name='x').name == 'x'")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120)
    assert list(tmp_path.iterdir()) == []
    assert pipeline_messages() is pipeline_messages()
    assert REPO_ROOT.exists()
