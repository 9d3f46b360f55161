"""The native bRPC endpoint's front door under abuse: connection and request caps, idle and slow-frame
timeouts, decompression bombs, and a connection flood with a legitimate client alongside.

The caps are checked against an in-process NativeServer with a canned service (no model: only the
network side is under test); the bombs and the flood against ``rexnet-brpc native`` as a subprocess
with a real export, whose memory is read from /proc (VmHWM: the kernel's peak resident size).
"""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List

import numpy as np
import pytest

from brpc_wire import deflate_bomb, image_request, responses
from conftest import closed_within, free_port, wait_for_port
from images import encode, photo
from rexnet_serving.brpc import framing
from rexnet_serving.brpc.framing import CompressType, Errno, encode_frame, request_meta
from rexnet_serving.brpc.server import NativeServer, ServerOptions
from rexnet_serving.brpc.tensors import ENGINE_NAME, PREDICTIONS_FETCH, ElemType, Request, Response, Tensor
from rexnet_serving.clients.brpc import BrpcClient

pytestmark = pytest.mark.server

SERVICE = framing.SERVICE_FULL_NAME
BIN = Path(sys.executable).parent


# -- helpers ---------------------------------------------------------------------------------------------
def _connect(port: int, timeout: float = 30) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


class HeldService:
    """A canned service whose answers wait until ``release`` is set (requests stay in flight)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.response = Response()
        output = self.response.outputs.add(engine_name=ENGINE_NAME)
        output.tensor.append(Tensor(alias_name=PREDICTIONS_FETCH, name=PREDICTIONS_FETCH,
                                    elem_type=ElemType.STRING, shape=[1], data=["{}"]))

    def __call__(self, request: Request) -> Response:
        self.entered.release()
        assert self.release.wait(30)
        return self.response


@pytest.fixture()
def held():
    service = HeldService()
    servers = []

    def start(**options) -> int:
        server = NativeServer(service, ServerOptions(port=0, **options))
        servers.append(server)
        return server.start()

    start.servers = servers  # the tests read their counters
    yield service, start
    service.release.set()
    for server in servers:
        server.stop()


def _frame(cid: int) -> bytes:
    return encode_frame(request_meta(SERVICE, "inference", cid), image_request([b"x"]))


# -- caps and timeouts (canned service) --------------------------------------------------------------------
def test_connections_past_max_connections_are_closed_at_once(held):
    service, start = held
    service.release.set()
    port = start(max_connections=3)
    kept = [_connect(port) for _ in range(3)]
    try:
        for sock in kept:  # the three admitted connections work
            sock.sendall(_frame(1))
            assert responses(sock, 1)[0].meta.response.error_code == 0
        extra = _connect(port)
        started = time.monotonic()
        assert closed_within(extra, 5), "the fourth connection was not refused"
        assert time.monotonic() - started < 2
        extra.close()
        kept.pop().close()
        time.sleep(0.2)  # the server notices the close
        again = _connect(port)
        again.sendall(_frame(2))
        assert responses(again, 1)[0].meta.response.error_code == 0
        again.close()
    finally:
        for sock in kept:
            sock.close()


def test_requests_past_the_per_connection_limit_get_elimit_at_once(held):
    service, start = held
    port = start(max_requests_per_connection=2, workers=2)
    with _connect(port) as sock:
        sock.sendall(b"".join(_frame(cid) for cid in (1, 2, 3, 4)))
        refused = responses(sock, 2)  # answered while 1 and 2 are still held
        assert {f.meta.correlation_id for f in refused} == {3, 4}
        assert {f.meta.response.error_code for f in refused} == {Errno.ELIMIT}
        assert "max_requests_per_connection=2" in refused[0].meta.response.error_text
        service.release.set()
        answered = responses(sock, 2)
        assert {(f.meta.correlation_id, f.meta.response.error_code) for f in answered} == {(1, 0), (2, 0)}
    with _connect(port) as other:  # another connection was never limited by this one
        other.sendall(_frame(5))
        assert responses(other, 1)[0].meta.response.error_code == 0


def test_bodies_past_the_buffer_budget_are_read_past_and_refused(held):
    service, start = held
    port = start(max_body_size=1 << 20, max_buffered_bytes=2 << 20, workers=1)
    body = image_request([bytes(900_000)])  # ~0.9 MB: two fit in the 2 MiB budget, a third does not
    first, second, third = _connect(port), _connect(port), _connect(port)
    try:
        first.sendall(encode_frame(request_meta(SERVICE, "inference", 1), body))
        second.sendall(encode_frame(request_meta(SERVICE, "inference", 2), body))
        assert service.entered.acquire(timeout=10)  # the first is running, the second queued
        time.sleep(0.2)
        third.sendall(encode_frame(request_meta(SERVICE, "inference", 3), body))
        (refused,) = responses(third, 1)
        assert refused.meta.correlation_id == 3 and refused.meta.response.error_code == Errno.ELIMIT
        assert "max_buffered_bytes=2097152" in refused.meta.response.error_text
        service.release.set()
        assert responses(first, 1)[0].meta.response.error_code == 0
        assert responses(second, 1)[0].meta.response.error_code == 0
        third.sendall(encode_frame(request_meta(SERVICE, "inference", 4), body))  # the same connection
        assert responses(third, 1)[0].meta.response.error_code == 0
        assert start.servers[0].buffered_bytes == 0  # every body's share was given back
    finally:
        for sock in (first, second, third):
            sock.close()


def test_idle_connections_are_closed_but_busy_ones_are_not(held):
    service, start = held
    port = start(idle_timeout=0.5)
    with _connect(port) as idle, _connect(port) as busy:
        busy.sendall(_frame(1))  # held in flight for longer than the idle timeout
        assert service.entered.acquire(timeout=10)
        assert closed_within(idle, 5)
        assert not closed_within(busy, 1.5)
        service.release.set()
        busy.settimeout(10)
        assert responses(busy, 1)[0].meta.response.error_code == 0


def test_a_started_frame_that_stalls_is_dropped_after_read_timeout(held):
    service, start = held
    service.release.set()
    port = start(read_timeout=0.5, idle_timeout=60)
    with _connect(port) as sock:
        sock.sendall(struct.pack(">4sII", b"PRPC", 1 << 20, 10))  # a header, then nothing
        started = time.monotonic()
        assert closed_within(sock, 10)
        assert time.monotonic() - started < 5


def test_limits_are_validated():
    for bad in (dict(max_connections=0), dict(max_requests_per_connection=0), dict(idle_timeout=0),
                dict(read_timeout=-1), dict(max_buffered_bytes=1 << 20)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServerOptions(**bad)


# -- rexnet-brpc native with a real export: bombs and a connection flood ---------------------------------
MAX_CONNECTIONS = 400


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class Native:
    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc, self.port = proc, port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        return _status_kb(self.proc.pid, "VmRSS") / 1024

    def peak_mb(self) -> float:
        return _status_kb(self.proc.pid, "VmHWM") / 1024


@pytest.fixture(scope="module")
def native(random_model_dir, tmp_path_factory) -> Iterator[Native]:
    work = tmp_path_factory.mktemp("native_hardening")
    port = free_port()
    proc = subprocess.Popen([str(BIN / "rexnet-brpc"), "native", "--model-dir", str(random_model_dir), "--port",
                             str(port), "--workers", "1", "--max-connections", str(MAX_CONNECTIONS),
                             "--read-timeout", "3", "--idle-timeout", "30"],
                            cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(proc, port, "rexnet-brpc native")
        yield Native(proc, port)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)


SMALL = encode(photo("china", (160, 120)), "jpeg")


def good_request(address: str) -> None:
    with BrpcClient(address, timeout=60) as client:
        (result,) = client.classify([SMALL], top_k=3)
        assert result.ok and len(result.predictions) == 3


@pytest.mark.slow
@pytest.mark.parametrize("kind, wbits", [(CompressType.ZLIB, 15), (CompressType.GZIP, 31)], ids=["zlib", "gzip"])
def test_decompression_bomb_is_refused_within_the_body_limit(native, kind, wbits):
    good_request(native.address)  # warm: the model's own peak is in the baseline
    bomb = deflate_bomb(wbits, 2 << 30)  # 2 GiB of zeros
    assert len(bomb) < 3 << 20
    before = native.rss_mb()  # against the peak after: what this request added, whatever came before
    with _connect(native.port, timeout=120) as sock:
        sock.sendall(encode_frame(request_meta(SERVICE, "inference", 7, compress_type=kind), bomb))
        (answer,) = responses(sock, 1)
    growth = native.peak_mb() - before
    print(f"{kind.name} bomb ({len(bomb)} bytes -> 2 GiB): peak RSS grew {growth:.0f} MB")
    assert answer.meta.response.error_code == Errno.EREQUEST
    assert "inflates past max_body_size" in answer.meta.response.error_text
    assert growth < 100
    good_request(native.address)


def _latencies(client: BrpcClient, count: int) -> List[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        (result,) = client.classify([SMALL], top_k=1)
        times.append(time.perf_counter() - started)
        assert result.ok  # nothing lost, nothing wrong
    return times


@pytest.mark.slow
def test_connection_flood_leaves_a_legitimate_client_served(native):
    import selectors
    client = BrpcClient(native.address, timeout=60)
    flood: List[socket.socket] = []
    samples: List[float] = []
    sampling = threading.Event()

    def sample_rss() -> None:
        while not sampling.wait(0.05):
            samples.append(native.rss_mb())

    sampler = threading.Thread(target=sample_rss)
    try:
        _latencies(client, 5)  # warm
        unloaded = _latencies(client, 30)
        rss_before = native.rss_mb()
        sampler.start()
        # 50 peers send a header promising 1 MiB and stall (closed after --read-timeout), then 500 idle
        # peers: the server holds MAX_CONNECTIONS - 1 besides the client's and refuses the rest at once.
        for _ in range(50):
            sock = _connect(native.port)
            sock.sendall(struct.pack(">4sII", b"PRPC", 1 << 20, 10))
            flood.append(sock)
        for _ in range(500):
            flood.append(_connect(native.port))
        loaded = _latencies(client, 30)
        selector = selectors.DefaultSelector()
        for sock in flood:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        refused = {key.fileobj for key, _ in selector.select(timeout=1.0)}
        selector.close()
        sampling.set()
        sampler.join()
    finally:
        for sock in flood:
            sock.close()
        sampling.set()
    growth = max(samples + [rss_before]) - rss_before
    p99 = lambda values: float(np.percentile(values, 99))  # noqa: E731
    print(f"flood of {len(flood)} connections, {len(refused)} refused at once: legitimate p99 "
          f"{p99(unloaded) * 1e3:.0f} ms unloaded, {p99(loaded) * 1e3:.0f} ms during; RSS +{growth:.0f} MB")
    assert len(refused) >= len(flood) - (MAX_CONNECTIONS - 1)
    # Every request of the legitimate client was answered correctly (_latencies asserts it); its p99 is
    # printed, not asserted: a latency ratio on a shared 2-core machine flakes (rexnet-bench judges speed).
    assert growth < 300
    _latencies(client, 3)  # the same connection, and a fresh one, answer normally right after
    client.close()
    good_request(native.address)
