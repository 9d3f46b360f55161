"""HTTP and gRPC clients without a server: request forms, answer mapping, unreachable service.
(Against a real server: tests/test_service.py.)"""
from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, free_port
from rexnet_serving import pipeline_wire
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
    text = pipeline_wire.encode_results([OK_RESULT, BAD_RESULT])
    assert check_response(0, "", ["results"], [text], 2) == [OK_RESULT, BAD_RESULT]
    every_bad = pipeline_wire.encode_results([BAD_RESULT])
    assert check_response(pipeline_wire.INVALID_IMAGE, "no image", ["results"], [every_bad], 1) == [BAD_RESULT]
    with pytest.raises(BadRequestError, match="err_no 51: invalid_top_k"):
        check_response(pipeline_wire.INVALID_REQUEST, "invalid_top_k: ...", [], [], 1)
    with pytest.raises(BadRequestError, match="3002"):
        check_response(pipeline_wire.NO_SERVICE, "unknown service", [], [], 1)
    with pytest.raises(TransientError, match="err_no 3001"):
        check_response(pipeline_wire.CLOSED_ERROR, "dag closed.", [], [], 1)
    with pytest.raises(TransientError, match="err_no 6000"):
        check_response(pipeline_wire.TIMEOUT, "timeout", [], [], 1)
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


# -- error classes against real servers: bad input vs overload ---------------------------------------
@pytest.fixture()
def grpc_server():
    """A real gRPC PipelineService on a free port: 1 MiB receive limit, at most one RPC at a time, and a
    handler that holds its RPC until released (so a second one meets the concurrency cap)."""
    import threading
    from concurrent import futures

    import grpc
    pb2 = pipeline_messages()
    release = threading.Event()
    entered = threading.Event()

    def inference(request, context):
        entered.set()
        release.wait(30)
        return pb2.Response(err_no=0, key=["results"], value=[pipeline_wire.encode_results([OK_RESULT])])

    handler = grpc.method_handlers_generic_handler(
        "baidu.paddle_serving.pipeline_serving.PipelineService",
        {"inference": grpc.unary_unary_rpc_method_handler(inference, request_deserializer=pb2.Request.FromString,
                                                          response_serializer=pb2.Response.SerializeToString)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler], maximum_concurrent_rpcs=1,
                         options=[("grpc.max_receive_message_length", 1 << 20)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", release, entered
    finally:
        release.set()
        server.stop(grace=None).wait(10)


def test_grpc_oversized_message_is_a_bad_request_and_load_shedding_is_transient(grpc_server):
    import threading
    address, release, entered = grpc_server
    client = GrpcClient(address, timeout=20)
    try:
        # over the server's receive limit: "Received message larger than max" -- bad input, never retried
        with pytest.raises(BadRequestError, match="RESOURCE_EXHAUSTED.*larger than max"):
            client.classify([bytes(2 << 20)], top_k=1)
        # over the server's concurrent-RPC cap: RESOURCE_EXHAUSTED too, but load shedding -- retry later
        holder = threading.Thread(target=client.classify, args=([b"\xff\xd8\xff"],), kwargs={"top_k": 1})
        holder.start()
        assert entered.wait(20)
        with pytest.raises(TransientError, match="RESOURCE_EXHAUSTED"):
            client.classify([b"\xff\xd8\xff"], top_k=1)
        release.set()
        holder.join(20)
    finally:
        client.close()
    # over the client's own send limit: "Sent message larger than max"
    import grpc
    small = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 1 << 10)])
    with GrpcClient(address, timeout=20, channel=small) as client:
        with pytest.raises(BadRequestError, match="larger than max"):
            client.classify([bytes(4 << 10)], top_k=1)


@pytest.fixture()
def http_server():
    """A real HTTP server answering each POST with the next (status, JSON body) from its script."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    script = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status, body = script.pop(0)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", script
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status, body, error", [
    (413, {"message": "request body too large"}, BadRequestError),
    (503, {"message": "overloaded"}, TransientError),
    (429, {"message": "slow down"}, TransientError),
    (200, {"err_no": pipeline_wire.OVERLOADED, "err_msg": "overloaded: queue full"}, TransientError),
    (200, {"err_no": pipeline_wire.REQUEST_TOO_LARGE, "err_msg": "request_too_large: 900 MP"}, BadRequestError),
])
def test_http_status_and_err_no_tell_bad_input_from_overload(http_server, status, body, error):
    address, script = http_server
    script.append((status, body))
    with HttpClient(address, timeout=20) as client:
        with pytest.raises(error) as info:
            client.classify([b"\xff\xd8\xff"], top_k=1)
    assert type(info.value) is error


def test_new_err_nos_are_classified():
    assert pipeline_wire.REQUEST_TOO_LARGE == 53 and pipeline_wire.REQUEST_TOO_LARGE in pipeline_wire.BAD_REQUEST_ERRNOS
    assert pipeline_wire.OVERLOADED == 54 and pipeline_wire.OVERLOADED not in pipeline_wire.BAD_REQUEST_ERRNOS
