"""The health/metrics port under idle and slow clients: it answers /healthz, /readyz and /metrics on one
thread however many connections are open, closes the oldest past its connection cap, and drops a
client that sends nothing (or a request head too slowly) after its timeout. Real sockets on 127.0.0.1."""
from __future__ import annotations

import socket
import threading
import time
from typing import Iterator, List

import pytest
import requests

from conftest import closed_within, free_port
from rexnet_pipelines.health import READY, HealthServer, ServiceState

CAP = 16
TIMEOUT_S = 1.0


@pytest.fixture()
def health() -> Iterator[HealthServer]:
    state = ServiceState()
    state.set(READY)
    server = HealthServer(state, free_port(), "127.0.0.1", max_connections=CAP, timeout_s=TIMEOUT_S)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def connect(server: HealthServer) -> socket.socket:
    return socket.create_connection(server.address, timeout=30)


def test_many_idle_connections_pin_no_threads_and_probes_still_answer(health: HealthServer) -> None:
    url = f"http://127.0.0.1:{health.address[1]}"
    assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "alive"}
    threads = threading.active_count()
    idle: List[socket.socket] = [connect(health) for _ in range(10 * CAP)]
    slow = connect(health)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # a request head that never ends
    try:
        for path, body in (("/healthz", {"status": "alive"}), ("/readyz", {"status": "ready"})):
            reply = requests.get(f"{url}{path}", timeout=10)
            assert reply.status_code == 200 and reply.json() == body
        assert "rexnet_ready 1.0" in requests.get(f"{url}/metrics", timeout=10).text
        assert threading.active_count() == threads, "the health server started threads for connections"
        # Past the cap the oldest were closed to make room; the most recent are still open.
        assert all(closed_within(sock, 30) for sock in idle[:CAP])
        # The idle and the slow client are dropped once their timeout passes.
        assert closed_within(idle[-1], 30) and closed_within(slow, 30)
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    finally:
        for sock in idle + [slow]:
            sock.close()


def test_a_trickled_request_head_is_dropped_at_the_deadline(health: HealthServer) -> None:
    """Each byte arrives well within the timeout; the head as a whole does not: the connection is closed."""
    sock = connect(health)
    try:
        try:
            for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 12:
                sock.sendall(bytes([byte]))
                time.sleep(TIMEOUT_S / 8)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while trickling
        assert closed_within(sock, 30)
    finally:
        sock.close()
