"""The native bRPC endpoint end to end: real exported model, real photos, real sockets on 127.0.0.1."""
from __future__ import annotations

import base64
import gzip
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from typing import List, Tuple

import numpy as np
import pytest

from brpc_wire import image_request as _image_request
from brpc_wire import responses as _responses
from conftest import free_port, wait_for_port
from images import PHOTO_SET, encode, photo
from rexnet_serving.brpc import framing
from rexnet_serving.brpc.framing import CompressType, Errno, encode_frame, request_meta
from rexnet_serving.brpc.server import NativeServer, ServerOptions
from rexnet_serving.brpc.service import ModelService
from rexnet_serving.brpc.tensors import ElemType, Request, Response, Tensor, to_tensor
from rexnet_serving.clients.base import BadRequestError, TransientError, make_client
from rexnet_serving.clients.brpc import BrpcClient

pytestmark = pytest.mark.server

SERVICE = framing.SERVICE_FULL_NAME


@pytest.fixture(scope="module")
def service(random_model_dir) -> ModelService:
    return ModelService(random_model_dir, cpu_threads=1)


@pytest.fixture(scope="module")
def server(service):
    srv = NativeServer(service, ServerOptions(port=0, workers=2, read_timeout=2.0))
    port = srv.start()
    yield f"127.0.0.1:{port}"
    srv.stop()


@pytest.fixture(scope="module")
def reference(random_model_dir):
    """The offline predictor: the same decode/preprocess/top-k functions and its own InferenceModel."""
    from rexnet_serving.classifier import Classifier
    return Classifier(random_model_dir, cpu_threads=1)


@pytest.fixture(scope="module")
def photos() -> List[bytes]:
    return [encode(photo(name, size), fmt, **opts) for name, size, fmt, opts in PHOTO_SET[:6]]


@pytest.fixture(scope="module")
def small_image() -> bytes:
    return encode(photo("china", (100, 80)), "png")


@pytest.fixture()
def client(server, random_model_dir):
    from rexnet_serving.manifest import load_manifest
    c = BrpcClient(server, timeout=60)
    c.load_client_config(load_manifest(random_model_dir).serving_client_dir / "serving_client_conf.prototxt")
    yield c
    c.close()


def assert_same_results(got, expected, score_tol=1e-4):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.ok and e.ok, (g, e)
        assert [p.class_id for p in g.predictions] == [p.class_id for p in e.predictions]
        assert [p.label for p in g.predictions] == [p.label for p in e.predictions]
        np.testing.assert_allclose([p.score for p in g.predictions], [p.score for p in e.predictions],
                                   atol=score_tol)


def good_request(address: str, image: bytes) -> None:
    """A fresh connection still gets a correct answer (the server survived what came before)."""
    with BrpcClient(address, timeout=60) as fresh:
        (result,) = fresh.classify([image], top_k=3)
    assert result.ok and len(result.predictions) == 3


# -- tensor feeds, as paddle_serving_client.Client sends them ------------------------------------------
def test_tensor_feed_equals_offline_predictor(client, reference, photos):
    from rexnet_serving.runtimes.paddle import InferenceModel
    images, errors = reference.decode(photos[:4])
    assert not errors
    batch = np.asarray(reference.preprocess(images), dtype=np.float32)
    got = client.predict(feed={"x": batch}, fetch=["probs"], batch=True)
    expected = InferenceModel(reference.manifest.model_dir, cpu_threads=1).run(batch)
    assert got["probs"].shape == expected.shape == (4, 1000)
    np.testing.assert_allclose(got["probs"], expected, atol=1e-5)


def test_unbatched_feed_and_default_fetch(client, reference, photos):
    images, _ = reference.decode(photos[:1])
    single = np.asarray(reference.preprocess(images), dtype=np.float32)[0]
    got = client.predict(feed={"x": single})  # batch=False adds the batch axis, no fetch = all
    assert set(got) == {"probs"} and got["probs"].shape == (1, 1000)
    np.testing.assert_allclose(got["probs"][0], reference.model.run(single[None])[0], atol=1e-5)


# -- encoded images: the service's decoding, preprocessing and top-k -----------------------------------
def test_image_feed_equals_offline_classifier(client, reference, photos):
    got = client.classify(photos, top_k=5)
    assert_same_results(got, reference.classify(photos, top_k=5))


def test_base64_string_feed_and_top_k(client, reference, photos):
    request = Request(fetch_var_names=["predictions"])
    request.tensor.append(Tensor(alias_name="image", elem_type=ElemType.STRING, shape=[2],
                                 data=[base64.b64encode(p).decode() for p in photos[:2]]))
    request.tensor.append(to_tensor(np.array([3]), alias="top_k", elem_type=ElemType.INT64))
    (tensor,) = client.call(request).outputs[0].tensor
    assert tensor.alias_name == "predictions" and list(tensor.shape) == [2]
    from rexnet_serving.results import ImageResult
    got = [ImageResult.from_dict(json.loads(doc)) for doc in tensor.data]
    assert_same_results(got, reference.classify(photos[:2], top_k=3))


def test_bad_image_gets_its_own_error_entry(client, photos):
    truncated = photos[0][: len(photos[0]) // 2]
    results = client.classify([photos[1], truncated, b"not an image"], top_k=2)
    assert results[0].ok and len(results[0].predictions) == 2
    assert results[1].error_code == "truncated" and results[2].error_code == "not_an_image"


def test_make_client_resolves_brpc(server, small_image):
    c = make_client("brpc", server, timeout=30)
    try:
        assert isinstance(c, BrpcClient) and c.classify([small_image])[0].ok
    finally:
        c.close()


@pytest.mark.parametrize("top_k", [0, 1001])
def test_top_k_out_of_range_is_a_bad_request(client, small_image, top_k):
    with pytest.raises(BadRequestError, match=f"top_k must be 1..1000, got {top_k}"):
        client.classify([small_image], top_k=top_k)


# -- request errors: an EREQUEST answer, the connection stays usable -----------------------------------
def _x(shape=(1, 3, 224, 224), alias="x", elem=ElemType.FLOAT32):
    return to_tensor(np.zeros(shape, np.float32), alias=alias, elem_type=elem)


@pytest.mark.parametrize("tensors, fetch, message", [
    ([], [], "no feed tensor"),
    ([_x(alias="input")], [], "unknown feed 'input'"),
    ([_x(shape=(1, 3, 32, 32))], [], r"shape \[1, 3, 32, 32\] does not match \[N, 3, 224, 224\]"),
    ([_x(shape=(3, 224, 224))], [], "does not match"),
    ([Tensor(alias_name="x", elem_type=ElemType.FLOAT32, shape=[1, 3, 224, 224])], [],
     r"0 values do not fill shape \[1, 3, 224, 224\]"),
    ([_x(elem=ElemType.FLOAT64)], [], "elem_type 3, the model takes 1"),
    ([_x(), _x()], [], "appears twice"),
    ([_x()], ["logits"], r"unknown fetch variable\(s\) \['logits'\]"),
    ([Tensor(alias_name="image", elem_type=ElemType.FLOAT32, float_data=[1.0], shape=[1])], [],
     "send the encoded file as uint8"),
    ([Tensor(alias_name="image", elem_type=ElemType.UINT8, tensor_content=b"x", shape=[1]), _x()], [],
     "unexpected feed 'x' beside 'image'"),
])
def test_wrong_feeds_are_bad_requests(client, server, small_image, tensors, fetch, message):
    request = Request(fetch_var_names=fetch)
    request.tensor.extend(tensors)
    with pytest.raises(BadRequestError, match=message):
        client.call(request)
    assert client.classify([small_image])[0].ok  # same connection, still fine
    good_request(server, small_image)


def test_too_many_images_is_a_bad_request(client, small_image):
    with pytest.raises(BadRequestError, match="65 images in one request; the limit is 64"):
        client.classify([small_image] * 65)


def test_images_over_the_request_pixel_budget_are_a_bad_request(client, small_image):
    big = encode(np.full((4800, 4800, 3), 60, np.uint8), "png")  # 23 MP each, ~70 kB on the wire
    with pytest.raises(BadRequestError, match="EREQUEST.*request_too_large: .* over the per-request limit "
                                              "of 64000000"):
        client.classify([big] * 3)  # 69 MP together: refused before any decode
    assert client.classify([small_image])[0].ok


# -- protocol-level garbage on raw sockets -------------------------------------------------------------
def _connect(address: str) -> socket.socket:
    host, port = address.split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def _meta_frame(meta_bytes: bytes, payload: bytes = b"") -> bytes:
    return b"PRPC" + struct.pack(">II", len(meta_bytes) + len(payload), len(meta_bytes)) + meta_bytes + payload


GARBAGE = {
    "bad magic": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad magic after P": b"PRPX" + b"\x00" * 8,
    "oversize body": b"PRPC" + struct.pack(">II", 64 * 2**20 + 1, 10),
    "meta bigger than body": b"PRPC" + struct.pack(">II", 4, 5) + b"\x00" * 4,
    "undecodable meta": _meta_frame(b"\xff\xff\xff\xff"),
    "meta without request": encode_frame(framing.response_meta(1)),
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_closes_the_connection(server, small_image, name):
    with _connect(server) as sock:
        sock.sendall(GARBAGE[name])
        assert _closed_by_server(sock)
    good_request(server, small_image)


def test_truncated_frame_then_eof_closes(server, small_image):
    frame = encode_frame(request_meta(SERVICE, "inference", 1), _image_request([small_image]))
    with _connect(server) as sock:
        sock.sendall(frame[: len(frame) // 2])
        sock.shutdown(socket.SHUT_WR)
        assert _closed_by_server(sock)
    good_request(server, small_image)


def test_stalled_frame_is_dropped_after_read_timeout(server, small_image):
    with _connect(server) as sock:
        sock.sendall(b"PRPC\x00\x00")  # then nothing: the server's read_timeout (2 s here) ends it
        assert _closed_by_server(sock)
    good_request(server, small_image)


def _error_of(server: str, frame: bytes) -> Tuple[int, str, int]:
    with _connect(server) as sock:
        sock.sendall(frame)
        (response,) = _responses(sock, 1)
    return response.meta.response.error_code, response.meta.response.error_text, response.meta.correlation_id


def test_unknown_service_method_and_payload_errors(server, small_image):
    payload = _image_request([small_image])
    cases = [
        (request_meta("no.such.Service", "inference", 11), payload, Errno.ENOSERVICE, "service=no.such"),
        (request_meta(SERVICE, "train", 12), payload, Errno.ENOMETHOD, "method="),
        (request_meta(SERVICE, "inference", 13), b"\xff\xff\xff\xff", Errno.EREQUEST, "fail to parse request"),
        (request_meta(SERVICE, "inference", 14, compress_type=CompressType.GZIP), b"not gzip",
         Errno.EREQUEST, "undecodable payload"),
        (request_meta(SERVICE, "inference", 15, compress_type=CompressType.SNAPPY), payload,
         Errno.EREQUEST, "unsupported compress_type snappy"),
    ]
    for meta, body, code, text in cases:
        got_code, got_text, cid = _error_of(server, encode_frame(meta, body))
        assert (got_code, cid) == (code, meta.correlation_id) and text in got_text, got_text
        good_request(server, small_image)


def test_attachment_size_beyond_payload_is_a_bad_request(server, small_image):
    meta = request_meta(SERVICE, "inference", 21)
    meta.attachment_size = 10**6
    code, text, _ = _error_of(server, _meta_frame(meta.SerializeToString(), b"tiny"))
    assert code == Errno.EREQUEST and "attachment_size=1000000" in text
    good_request(server, small_image)


def test_gzip_payload_and_short_service_name_are_accepted(server, small_image):
    meta = request_meta("GeneralModelService", "inference", 31, compress_type=CompressType.GZIP)
    with _connect(server) as sock:
        sock.sendall(encode_frame(meta, gzip.compress(_image_request([small_image]))))
        (frame,) = _responses(sock, 1)
    assert frame.meta.response.error_code == 0 and frame.meta.correlation_id == 31
    response = Response.FromString(frame.payload)
    assert json.loads(response.outputs[0].tensor[0].data[0])["predictions"]


def test_pipelined_requests_are_answered_by_correlation_id_out_of_order(server, photos, small_image):
    slow = encode_frame(request_meta(SERVICE, "inference", 1), _image_request(photos[:6]))
    instant = encode_frame(request_meta(SERVICE, "no_such_method", 2))
    small = encode_frame(request_meta(SERVICE, "debug", 3), _image_request([small_image]))
    with _connect(server) as sock:
        sock.sendall(slow + instant + small)
        frames = _responses(sock, 3)
    ids = [f.meta.correlation_id for f in frames]
    assert sorted(ids) == [1, 2, 3]
    assert ids[0] == 2  # the error needs no worker: it overtakes the 6-image request sent before it
    by_id = {f.meta.correlation_id: f for f in frames}
    assert by_id[2].meta.response.error_code == Errno.ENOMETHOD
    assert len(Response.FromString(by_id[1].payload).outputs[0].tensor[0].data) == 6
    assert len(Response.FromString(by_id[3].payload).outputs[0].tensor[0].data) == 1


def test_sixteen_clients_with_requests_in_flight(server, reference, photos, random_model_dir):
    from rexnet_serving.manifest import load_manifest
    small = [encode(photo(name, (96 + 8 * i, 80 + 4 * i)), "jpeg", quality=90)
             for i, name in enumerate(["china", "flower"] * 4)]
    expected_images = {i: reference.classify([data], top_k=5)[0] for i, data in enumerate(small)}
    batch = np.asarray(reference.preprocess(reference.decode(photos[:1])[0]), dtype=np.float32)
    expected_probs = reference.model.run(batch)
    config = load_manifest(random_model_dir).serving_client_dir / "serving_client_conf.prototxt"

    clients = []
    for _ in range(16):
        c = BrpcClient(server, timeout=120)
        c.load_client_config(config)
        clients.append(c)
    failures: List[str] = []

    def work(c: BrpcClient, worker: int) -> None:
        try:
            for step in range(2):
                if (worker + step) % 3 == 0:
                    got = c.predict(feed={"x": batch}, fetch=["probs"], batch=True)["probs"]
                    np.testing.assert_allclose(got, expected_probs, atol=1e-5)
                else:
                    index = (worker * 2 + step) % len(small)
                    assert_same_results(c.classify([small[index]], top_k=5), [expected_images[index]])
        except Exception as exc:  # noqa: BLE001 - collected and reported by the main thread
            failures.append(f"worker {worker}: {type(exc).__name__}: {exc}")

    # three threads share each client: three requests in flight on each of the 16 connections
    threads = [threading.Thread(target=work, args=(clients[i // 3], i)) for i in range(48)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
    finally:
        for c in clients:
            c.close()
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures[:5]


# -- limits, overload and the client's error mapping ---------------------------------------------------
def test_overload_is_refused_with_elimit_and_the_client_calls_it_transient(service, photos, small_image):
    srv = NativeServer(service, ServerOptions(port=0, workers=1, max_concurrency=1))
    address = f"127.0.0.1:{srv.start()}"
    try:
        frames = b"".join(encode_frame(request_meta(SERVICE, "inference", cid), _image_request(photos[:4]))
                          for cid in (1, 2, 3))
        with _connect(address) as sock:
            sock.sendall(frames)
            answers = {f.meta.correlation_id: f.meta.response.error_code for f in _responses(sock, 3)}
        assert answers[1] == 0 and answers[2] == answers[3] == Errno.ELIMIT
        good_request(address, small_image)
    finally:
        srv.stop()


def test_client_maps_connection_failures_to_transient(small_image):
    port = free_port()  # nothing listens there
    with pytest.raises(TransientError, match="cannot connect"):
        BrpcClient(f"127.0.0.1:{port}", timeout=5).classify([small_image])

    with socket.socket() as silent:  # accepts, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        c = BrpcClient(f"127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        try:
            with pytest.raises(TransientError, match="no response .* within 0.5s"):
                c.classify([small_image])
        finally:
            c.close()

    with socket.socket() as rude:  # accepts and hangs up
        rude.bind(("127.0.0.1", 0))
        rude.listen(4)
        hang_up = threading.Thread(target=lambda: rude.accept()[0].close())
        hang_up.start()
        c = BrpcClient(f"127.0.0.1:{rude.getsockname()[1]}", timeout=10)
        try:
            with pytest.raises(TransientError, match="connection"):
                c.classify([small_image])
        finally:
            c.close()
            hang_up.join()


def test_client_reconnects_after_the_server_restarts(service, small_image):
    port = free_port()
    first = NativeServer(service, ServerOptions(port=port, workers=1))
    first.start()
    c = BrpcClient(f"127.0.0.1:{port}", timeout=30)
    try:
        assert c.classify([small_image])[0].ok
        first.stop()
        with pytest.raises(TransientError):
            c.classify([small_image])
        second = NativeServer(service, ServerOptions(port=port, workers=1))
        second.start()
        try:
            assert c.classify([small_image])[0].ok  # a new connection, transparently
        finally:
            second.stop()
    finally:
        c.close()


def test_client_refuses_bodies_over_max_body_size(server):
    c = BrpcClient(server, timeout=5, max_body_size=1000)
    try:
        with pytest.raises(BadRequestError, match="exceeds max_body_size=1000"):
            c.classify([b"\xff" * 2000])
    finally:
        c.close()


def test_predict_checks_feed_names_like_paddle_client(client):
    with pytest.raises(ValueError, match="Wrong feed name: 'image'"):
        client.predict(feed={"image": np.zeros((3, 224, 224), np.float32)})
    with pytest.raises(ValueError, match="load_client_config"):
        BrpcClient("127.0.0.1:1").predict(feed={"x": np.zeros(1)})


# -- the command line -----------------------------------------------------------------------------------
def test_cli_native_serves_and_stops_on_sigterm(random_model_dir, small_image, tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rexnet_serving.brpc.cli", "--model-dir", str(random_model_dir),
                             "--port", str(port), "--workers", "1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(proc, port, "rexnet-brpc")
        good_request(f"127.0.0.1:{port}", small_image)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "inference: openvino fp32 on cpu, 1 worker(s)" in proc.stdout.read().decode()  # the default
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_errors(random_model_dir, tmp_path):
    env = dict(os.environ)
    usage = subprocess.run([sys.executable, "-m", "rexnet_serving.brpc.cli", "--workers", "many"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert usage.returncode == 2 and "--workers" in usage.stderr
    for flags, message in ((["--runtime", "openvino", "--device", "gpu"],
                            "--runtime: runtime openvino runs on the CPU only"),
                           (["--runtime", "paddle", "--precision", "bf16"],
                            "--precision: precision bf16 needs runtime openvino")):
        refused = subprocess.run([sys.executable, "-m", "rexnet_serving.brpc.cli", "--model-dir",
                                  str(random_model_dir), *flags], capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and message in refused.stderr
    missing = subprocess.run([sys.executable, "-m", "rexnet_serving.brpc.cli", "--model-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=120, env=env)
    assert missing.returncode == 1 and "cannot load the model" in missing.stderr
    assert "Traceback" not in missing.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = subprocess.run([sys.executable, "-m", "rexnet_serving.brpc.cli", "--model-dir",
                                str(random_model_dir), "--port", str(busy.getsockname()[1])],
                               capture_output=True, text=True, timeout=120, env=env)
    assert taken.returncode == 1 and "cannot listen on" in taken.stderr
