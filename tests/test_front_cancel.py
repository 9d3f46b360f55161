"""A client that goes away while its request waits for a thread costs nothing more: the HTTP and v2 REST
front doors drop it before parsing or taking a DAG slot, and the gRPC front doors cancel its ticket at
once when the RPC is already over (``context.add_callback`` returned False).

The front doors are the real ones (Tornado on a loopback port, real sockets); behind them stands a DAG
(or a v2 model) that blocks until released, so that the pool's threads are provably all busy.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, Callable, List

import numpy as np
import pytest

from conftest import free_port
from rexnet_pipelines import metrics
from rexnet_pipelines.admission import CANCELLED, Admission
from rexnet_pipelines.frontdoor import FrontDoor, watch_rpc
from rexnet_pipelines.http_front import HttpFrontDoor
from rexnet_pipelines.oip_front import OipHttpFrontDoor
from rexnet_pipelines.request import ClassifyAnswer
from rexnet_pipelines.settings import RexnetSettings
from rexnet_serving.oip import ImagesOutcome, ModelInfo, OipService

# max_in_flight_requests sizes the HTTP pool (2 threads); admission itself lets up to 8 in.
LIMITS = RexnetSettings(max_in_flight_requests=1, max_request_bytes=1 << 20, max_json_values=1000,
                        max_header_bytes=8192, idle_timeout_s=30, body_timeout_s=30, http_max_connections=64)


class Blocking:
    """Counts the calls that reach it and holds each until ``release``."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()

    def wait(self) -> None:
        self.calls += 1
        assert self.release.wait(30)


class BlockingDag(Blocking):
    def call(self, request: Any) -> Any:
        self.wait()
        return ClassifyAnswer()


class BlockingModel(Blocking):
    info = ModelInfo("m", "1", 224, 2, ("a", "b"))

    def ready(self) -> bool:
        return True

    def infer_images(self, images: Any, options: Any) -> ImagesOutcome:
        self.wait()
        return ImagesOutcome(np.full((len(images), 2), 0.5, np.float32))

    def infer_tensor(self, batch: np.ndarray, options: Any) -> np.ndarray:
        raise AssertionError("not used")


def _request(port: int, path: str, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def _until(condition: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _cancelled() -> float:
    return metrics.REFUSED.labels(CANCELLED)._value.get()


def _gone_while_waiting(door: HttpFrontDoor, path: str, body: bytes, blocking: Blocking) -> None:
    """Two requests take both pool threads; a third waits for one and its client leaves; then release."""
    port = door.port
    busy = [_request(port, path, body) for _ in range(2)]
    _until(lambda: blocking.calls == 2)
    cancelled = _cancelled()
    waiting = _request(port, path, body)
    _until(lambda: door._pool._work_queue.qsize() == 1)  # it waits for a thread ...
    waiting.close()
    _until(lambda: len(door._server._connections) == 2)  # ... and the event loop saw its client leave
    blocking.release.set()
    for sock in busy:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200"), "the admitted requests are answered"
        sock.close()
    _until(lambda: _cancelled() == cancelled + 1)
    assert blocking.calls == 2, "the request whose client left still reached the DAG / model"


def _serve(door: Any) -> Callable[[], None]:
    door.start()
    return door.stop


def test_http_client_gone_while_waiting_for_a_thread_is_dropped_before_parsing():
    dag = BlockingDag()
    door = HttpFrontDoor(FrontDoor(dag, Admission(8, 30, 1 << 24), "rexnet"), "127.0.0.1", free_port(), LIMITS)
    stop = _serve(door)
    try:
        _gone_while_waiting(door, "/rexnet/prediction", json.dumps({"key": ["image"], "value": ["x"]}).encode(),
                            dag)
    finally:
        dag.release.set()
        stop()


def test_v2_rest_client_gone_while_waiting_for_a_thread_is_dropped_before_parsing():
    model = BlockingModel()
    front = FrontDoor(None, Admission(8, 30, 1 << 24), "rexnet")
    door = OipHttpFrontDoor(front, OipService([model]), "127.0.0.1", free_port(), LIMITS)
    stop = _serve(door)
    body = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["eA=="]}]})
    try:
        _gone_while_waiting(door, "/v2/models/m/infer", body.encode(), model)
    finally:
        model.release.set()
        stop()


class _Context:
    """What grpc's ServicerContext.add_callback does once the RPC is over: nothing, and False."""

    def __init__(self, over: bool) -> None:
        self.over = over
        self.callbacks: List[Callable[[], None]] = []

    def add_callback(self, callback: Callable[[], None]) -> bool:
        if self.over:
            return False
        self.callbacks.append(callback)
        return True


@pytest.mark.parametrize("over", [False, True], ids=["running", "already over"])
def test_grpc_watch_cancels_at_once_when_the_rpc_is_already_over(over: bool):
    ticket = Admission(1, 30, 1024).admit()
    context = _Context(over)
    watch_rpc(context, ticket)
    assert ticket.cancelled is over
    if not over:
        context.callbacks[0]()
        assert ticket.cancelled
    ticket.release()
