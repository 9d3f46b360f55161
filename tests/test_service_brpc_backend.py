"""rexnet-serve forwarding inference to a bRPC backend (serving_configs/brpc_backend.yml).

The loader's remote-op keys; the remote predictor against an in-process native endpoint; and end to end:
``rexnet-brpc native`` as the backend and ``rexnet-serve`` in front of it (both real subprocesses on free
ports), real photos over HTTP and gRPC compared with the in-process Classifier, readiness waiting for
the backend, the backend killed (retryable errors, the service stays alive) and restarted on its port.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional

import rexnet_serving.imageio  # noqa: F401  (before paddle: see that module)
import numpy as np
import pytest
import requests

from conftest import free_port
from images import encode, make_photo_set, photo
from rexnet_pipelines.config import CONFIG_DIR, REMOTE_KEYS, ConfigError, load_config
from rexnet_serving import defaults
from rexnet_serving.classifier import Classifier
from rexnet_serving.clients.base import BadRequestError, TransientError
from rexnet_serving.clients.grpc import GrpcClient
from rexnet_serving.clients.http import HttpClient
from rexnet_serving.results import ImageResult

BIN = Path(sys.executable).parent
CONFIG = CONFIG_DIR / "brpc_backend.yml"
START_TIMEOUT = 240
BACKEND_ERRNO = 9000  # pipelines.ops.BACKEND_ERROR (importing ops would import Paddle Serving's pipeline)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- the loader --------------------------------------------------------------------------------------
def test_shipped_brpc_config_loads_and_keeps_remote_keys_from_paddle_serving():
    config = load_config(CONFIG)
    assert config.inference.remote
    assert config.inference.server_endpoints == (f"127.0.0.1:{defaults.BRPC_PORT}",)
    assert config.infer["server_endpoints"] == [f"127.0.0.1:{defaults.BRPC_PORT}"]  # what Paddle Serving reads
    assert config.infer["client_config"] is None and config.infer["fetch_list"] == ["probs"]
    assert config.infer["timeout"] == -1 and config.rexnet["backend_timeout_s"] == 30
    infer = config.paddle()["op"]["infer"]
    assert not set(REMOTE_KEYS) & set(infer)  # Paddle Serving's Op never builds its own C++ client


def test_local_predictor_is_the_default():
    config = load_config(CONFIG_DIR / "cpu.yml")
    assert not config.inference.remote
    assert config.infer["client_type"] == "local_predictor" and config.infer["server_endpoints"] == []


@pytest.mark.parametrize("text, message", [
    ("op:\n  infer:\n    client_type: grpc\n", "op.infer.client_type must be local_predictor or brpc, got 'grpc'"),
    ("op:\n  infer:\n    server_endpoints: 127.0.0.1:9393\n", "op.infer.server_endpoints must be list"),
    ("op:\n  infer:\n    server_endpoints: [localhost]\n", "op.infer.server_endpoints must be a list of \"host:port\""),
    ("op:\n  infer:\n    server_endpoints: ['127.0.0.1:0']\n", "with ports 1..65535, got ['127.0.0.1:0']"),
    ("op:\n  infer:\n    server_endpoints: ['127.0.0.1:70000']\n", "got ['127.0.0.1:70000']"),
    ("op:\n  infer:\n    server_endpoints: [':9393']\n", "op.infer.server_endpoints must be"),
    ("op:\n  infer:\n    server_endpoints: [9393]\n", "op.infer.server_endpoints must be"),
    ("op:\n  infer:\n    server_endpoints: []\n", "client_type brpc needs server_endpoints"),
    ("op:\n  infer:\n    client_type: local_predictor\n", "op.infer.server_endpoints is a remote-op key"),
    ("op:\n  infer:\n    fetch_list: []\n", "op.infer.fetch_list must be null or a non-empty list"),
    ("op:\n  infer:\n    client_config: ''\n", "op.infer.client_config must be a serving_client_conf"),
    ("op:\n  infer:\n    client_config: 5\n", "op.infer.client_config must be str or null"),
    ("op:\n  infer:\n    timeout: 30000\n", "deadline is rexnet.backend_timeout_s"),
    ("rexnet:\n  backend_timeout_s: 0\n", "rexnet.backend_timeout_s must be 0 < seconds"),
    ("op:\n  infer:\n    server_endpoint: ['127.0.0.1:9393']\n", "unknown key 'op.infer.server_endpoint'"),
])
def test_bad_remote_keys_name_the_file_and_key(tmp_path, text, message):
    path = write(tmp_path / "bad.yml", f"extends: {CONFIG}\n{text}")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_remote_keys_without_brpc_are_refused(tmp_path):
    path = write(tmp_path / "local.yml", f"extends: {CONFIG_DIR / 'cpu.yml'}\n"
                                         "op:\n  infer:\n    client_config: conf.prototxt\n")
    with pytest.raises(ConfigError, match="op.infer.client_config is a remote-op key"):
        load_config(path)


def test_client_config_is_taken_from_the_start_directory(tmp_path, monkeypatch):
    path = write(tmp_path / "rel.yml", f"extends: {CONFIG}\nop:\n  infer:\n    client_config: m/serving_client\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(path).infer["client_config"] == str(tmp_path.resolve() / "m" / "serving_client")


def test_ipv6_and_several_endpoints_are_accepted(tmp_path):
    path = write(tmp_path / "ok.yml", f"extends: {CONFIG}\nop:\n  infer:\n"
                                      "    server_endpoints: ['[::1]:9393', 'backend.svc:19393']\n")
    assert load_config(path).infer["server_endpoints"] == ["[::1]:9393", "backend.svc:19393"]


# -- the remote predictor (in-process native endpoint) ----------------------------------------------
@pytest.fixture(scope="module")
def model_dir(scored_model_dir) -> Path:
    return scored_model_dir


@pytest.fixture(scope="module")
def offline(model_dir) -> Classifier:
    return Classifier(model_dir)


@pytest.fixture(scope="module")
def native_backend(model_dir) -> Iterator[str]:
    from rexnet_serving.brpc.server import NativeServer, ServerOptions
    from rexnet_serving.brpc.service import ModelService
    server = NativeServer(ModelService(model_dir, cpu_threads=1), ServerOptions(port=0, workers=1))
    port = server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.mark.server
def test_remote_predictor_equals_the_local_predictor(model_dir, offline, native_backend):
    from rexnet_serving.runtimes.brpc_remote import RemotePredictor
    batch = offline.preprocess([photo("china", (160, 120)), photo("flower", (120, 160))])
    remote = RemotePredictor(model_dir, [native_backend], timeout=60)
    twin = remote.clone()
    try:
        for predictor in (remote, twin):
            np.testing.assert_allclose(offline.probabilities(batch, predictor), offline.probabilities(batch),
                                       atol=1e-5)
    finally:
        remote.close()
        twin.close()


@pytest.mark.server
def test_remote_predictor_down_backend_is_unavailable_and_names_it(model_dir, offline):
    from rexnet_serving.runtimes.brpc_remote import BackendUnavailable, RemotePredictor
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens here
    remote = RemotePredictor(model_dir, [endpoint], timeout=5)  # built while the backend is down
    try:
        with pytest.raises(BackendUnavailable, match=f"bRPC backend {endpoint} unavailable") as info:
            remote.run(offline.preprocess([photo("china", (64, 48))]))
        assert isinstance(info.value, TransientError)
    finally:
        remote.close()


@pytest.mark.server
def test_remote_predictor_refuses_mismatches_before_sending(model_dir, native_backend, tmp_path):
    from rexnet_serving.runtimes.brpc_remote import RemotePredictor
    with pytest.raises(ValueError, match=r"fetch_list \['logits'\] does not match"):
        RemotePredictor(model_dir, [native_backend], fetch=["logits"])
    other = tmp_path / "serving_client_conf.prototxt"
    other.write_text('feed_var { name: "image" alias_name: "image" is_lod_tensor: false feed_type: 1 shape: 3 }\n'
                     'fetch_var { name: "out" alias_name: "out" is_lod_tensor: false fetch_type: 1 shape: 10 }\n')
    with pytest.raises(ValueError, match="is not a client config of the export"):
        RemotePredictor(model_dir, [native_backend], client_config=other)
    with pytest.raises(FileNotFoundError):
        RemotePredictor(model_dir, [native_backend], client_config=tmp_path / "missing.prototxt")
    remote = RemotePredictor(model_dir, [native_backend])
    try:
        with pytest.raises(ValueError, match=r"expected a batch of shape \[N, 3, 224, 224\]"):
            remote.run(np.zeros((1, 3, 32, 32), np.float32))
    finally:
        remote.close()


# -- end to end: rexnet-serve in front of rexnet-brpc native -----------------------------------------
def _stop(proc: subprocess.Popen) -> None:
    """Kill a process started with start_new_session=True, and anything left of its group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children (the HTTP gateway) may outlive the leader
    except ProcessLookupError:
        pass


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


class Stack:
    """The two processes and their ports; the backend can be stopped and started again."""

    def __init__(self, model_dir: Path, work: Path) -> None:
        self.model_dir, self.work = model_dir, work
        self.backend_port, self.http, self.grpc, self.metrics = free_port(), free_port(), free_port(), free_port()
        self.backend: Optional[subprocess.Popen] = None
        self.serve: Optional[subprocess.Popen] = None
        self.log = work / "serve.log"
        self.ready_before_backend: List[int] = []  # /readyz codes seen while the backend was not up

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.backend_port}"

    def start_backend(self) -> None:
        with (self.work / "backend.log").open("ab") as out:
            self.backend = subprocess.Popen([str(BIN / "rexnet-brpc"), "native", "--model-dir", str(self.model_dir),
                                             "--port", str(self.backend_port), "--workers", "2"],
                                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not _port_open(self.backend_port):
            if self.backend.poll() is not None:
                pytest.fail(f"rexnet-brpc exited with {self.backend.returncode}:\n"
                            f"{(self.work / 'backend.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"rexnet-brpc did not listen within {START_TIMEOUT}s")
            time.sleep(0.1)

    def kill_backend(self) -> None:
        _stop(self.backend)
        self.backend = None

    def start_serve(self, rexnet: str = "rexnet:\n  backend_timeout_s: 20\n") -> None:
        config = write(self.work / "brpc.yml", f"extends: {CONFIG}\n"
                                                f"op:\n  infer:\n    server_endpoints: ['{self.endpoint}']\n"
                                                + rexnet)
        with self.log.open("wb") as out:
            self.serve = subprocess.Popen([str(BIN / "rexnet-serve"), "--config", str(config), "--model-dir",
                                           str(self.model_dir), "--http-port", str(self.http), "--grpc-port",
                                           str(self.grpc), "--metrics-port", str(self.metrics), "--oip-http-port",
                                           "0", "--oip-grpc-port", "0", "--workdir",
                                           str(self.work / "wd")],
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def probe(self, path: str) -> int:
        return requests.get(f"http://127.0.0.1:{self.metrics}/{path}", timeout=5).status_code

    def wait_until(self, what: str, condition, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.serve.poll() is not None:
                pytest.fail(f"rexnet-serve exited with {self.serve.returncode}:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what} not within {timeout}s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in (self.serve, self.backend):
            if proc is not None:
                _stop(proc)


@pytest.fixture(scope="module")
def stack(model_dir, tmp_path_factory) -> Iterator[Stack]:
    """rexnet-serve started first (the backend is down: it must not turn ready), then the backend."""
    stack = Stack(model_dir, tmp_path_factory.mktemp("brpc_backend_run"))
    try:
        stack.start_serve()
        stack.wait_until("the warm-up reaching the missing backend",
                         lambda: "waiting for the bRPC backend" in stack.log.read_text())
        for _ in range(5):
            stack.ready_before_backend.append(stack.probe("readyz"))
            time.sleep(0.2)
        stack.start_backend()

        def ready() -> bool:
            try:
                return stack.probe("readyz") == 200
            except requests.ConnectionError:
                return False

        stack.wait_until("readiness once the backend is up", ready)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def clients(stack) -> Iterator[dict]:
    http = HttpClient(f"127.0.0.1:{stack.http}", timeout=120)
    grpc = GrpcClient(f"127.0.0.1:{stack.grpc}", timeout=120)
    yield {"http": http, "grpc": grpc}
    http.close()
    grpc.close()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> List[Path]:
    return make_photo_set(tmp_path_factory.mktemp("photos"))


def assert_same(served: ImageResult, expected: ImageResult) -> None:
    assert served.ok and expected.ok, (served, expected)
    assert [p.class_id for p in served.predictions] == [p.class_id for p in expected.predictions]
    np.testing.assert_allclose([p.score for p in served.predictions],
                               [p.score for p in expected.predictions], atol=1e-4)


@pytest.mark.server
@pytest.mark.slow
def test_not_ready_until_the_backend_answers(stack):
    assert stack.ready_before_backend and set(stack.ready_before_backend) == {503}
    assert stack.probe("readyz") == 200
    text = stack.log.read_text()
    assert f"waiting for the bRPC backend {stack.endpoint}" in text
    assert f"backend  bRPC {stack.endpoint}" in text


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("protocol_name", ["http", "grpc"])
def test_photos_through_the_backend_match_the_in_process_classifier(stack, clients, offline, photos,
                                                                     protocol_name):
    for path in photos:
        data = path.read_bytes()
        (served,) = clients[protocol_name].classify([data], top_k=5)
        assert_same(served, offline.classify([data], top_k=5)[0])
    # several images in one request: one forwarded batch
    payloads = [p.read_bytes() for p in photos[:3]]
    for served, expected in zip(clients[protocol_name].classify(payloads, top_k=5),
                                offline.classify(payloads, top_k=5)):
        assert_same(served, expected)


@pytest.mark.server
@pytest.mark.slow
def test_backend_down_fails_requests_retryably_then_recovers_on_restart(stack, clients, offline):
    image = encode(photo("china", (160, 120)), "jpeg")
    expected = offline.classify([image], top_k=5)[0]
    stack.kill_backend()
    for name in ("http", "grpc"):
        with pytest.raises(TransientError) as info:
            clients[name].classify([image], top_k=5)
        message = str(info.value)
        assert f"err_no {BACKEND_ERRNO}: inference failed: bRPC backend {stack.endpoint} unavailable" in message
        assert "check the input" not in message  # Paddle Serving's advice, wrong for a backend outage
    # bad requests are answered without the backend
    with pytest.raises(BadRequestError, match="invalid_top_k"):
        clients["grpc"].classify([image], top_k=0)
    (bad,) = clients["http"].classify([b"not an image"], top_k=5)
    assert bad.error_code == "not_an_image"
    assert stack.probe("healthz") == 200
    assert stack.serve.poll() is None

    stack.start_backend()  # the same port
    for name in ("http", "grpc"):
        (served,) = clients[name].classify([image], top_k=5)
        assert_same(served, expected)


# -- a backend that accepts and never reads ----------------------------------------------------------
class DeafBackend:
    """A real listening socket that accepts every connection and never reads from it: a hung or
    SIGSTOPped backend, or a stalled network. Sends of a few MB fill the TCP buffers and block."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: List[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.mark.server
@pytest.mark.slow
def test_a_backend_that_never_reads_fails_requests_in_time_and_sigterm_drains(model_dir, tmp_path):
    backend_timeout, drain_timeout = 3, 10
    deaf = DeafBackend()
    stack = Stack(model_dir, tmp_path)
    stack.backend_port = deaf.port
    try:
        stack.start_serve(f"rexnet:\n  backend_timeout_s: {backend_timeout}\n  drain_timeout_s: {drain_timeout}\n")
        # the gRPC port serves while the warm-up keeps failing against the deaf backend
        stack.wait_until("the warm-up reaching the deaf backend",
                         lambda: "waiting for the bRPC backend" in stack.log.read_text())
        images = [encode(photo("china", (640, 427)), "jpeg")] * 16  # ~9.6 MB of float32 to forward
        client = GrpcClient(f"127.0.0.1:{stack.grpc}", timeout=60)
        started = time.monotonic()
        try:
            with pytest.raises(TransientError) as info:
                client.classify(images, top_k=1)
        finally:
            client.close()
        elapsed = time.monotonic() - started
        print(f"16 images against a deaf backend: {info.value} after {elapsed:.1f}s")
        assert f"err_no {BACKEND_ERRNO}" in str(info.value)
        assert "deadline passed" in str(info.value) or "no response" in str(info.value)
        # its own deadline, plus at most one warm-up attempt ahead of it on the infer threads, plus slack
        assert elapsed < 2 * backend_timeout + 10
        stack.serve.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert stack.serve.wait(drain_timeout + 15) == 0
        print(f"SIGTERM: exited 0 after {time.monotonic() - started:.1f}s")
    finally:
        stack.stop()
        deaf.close()
