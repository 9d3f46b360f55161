"""Health probes and Prometheus metrics over HTTP (Paddle Serving has neither).

GET /healthz  200 while the process serves: its HTTP and gRPC front doors are up (liveness); 503 with
              the reason when one of them died, so Kubernetes restarts the pod.
GET /readyz   200 once the model is loaded and a warm-up request went through the whole DAG; 503 before
              that and while draining after SIGTERM (readiness, Kubernetes probe semantics).
GET /metrics  Prometheus text format (prometheus_client's WSGI app).

Served by Tornado (already the HTTP front door's server) on one thread with its own event loop, through
tornado.wsgi.WSGIContainer: the stdlib WSGI server it replaces started a thread per connection with no
cap and no timeout, so idle or slow clients could pin any number of threads. Here a connection costs a
socket, not a thread; the request head and idle keep-alive connections have a deadline
(``idle_connection_timeout``: a slow-loris client is dropped), a body has one too, and at most
``max_connections`` are open: past it the oldest is closed to make room, because probes and scrapes use
a connection as soon as they open it, so the oldest ones are the idle or slow ones, and the kubelet's
next probe always gets in.
"""
from __future__ import annotations

import asyncio
import collections
import json
import threading
from typing import Any, Callable, Deque, Iterable, List, Optional, Tuple

import tornado.httpserver
import tornado.netutil
import tornado.wsgi
from prometheus_client import make_wsgi_app

from . import metrics
from .loop_thread import stop_server_thread

STARTING, READY, DRAINING = "starting", "ready", "draining"


class ServiceState:
    """Where the service is in its life cycle: starting -> ready -> draining."""

    def __init__(self) -> None:
        self._status = STARTING
        self._lock = threading.Lock()

    @property
    def status(self) -> str:
        return self._status

    @property
    def ready(self) -> bool:
        return self._status == READY

    def set(self, status: str) -> None:
        with self._lock:
            if self._status == DRAINING:
                return  # draining is final
            self._status = status
        metrics.READY.set(1 if status == READY else 0)


def _json(start_response: Callable, status: str, body: dict) -> List[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


LiveCheck = Callable[[], Optional[str]]  # None when alive, else what is dead


def make_app(state: ServiceState, live_check: LiveCheck = lambda: None) -> Callable:
    metrics_app = make_wsgi_app()

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/healthz":
            dead = live_check()
            if dead is not None:
                return _json(start_response, "503 Service Unavailable", {"status": "dead", "reason": dead})
            return _json(start_response, "200 OK", {"status": "alive"})
        if path == "/readyz":
            status = state.status
            code = "200 OK" if status == READY else "503 Service Unavailable"
            return _json(start_response, code, {"status": status})
        return _json(start_response, "404 Not Found",
                     {"error": f"no such path {path!r}; try /healthz, /readyz or /metrics"})

    return app


MAX_CONNECTIONS = 64  # kubelet probes and a few Prometheus scrapers need a handful
TIMEOUT_S = 10.0  # request head, idle keep-alive and body deadline; the probes' own timeouts are 3-5 s
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024  # every route is a GET


class _QuietContainer(tornado.wsgi.WSGIContainer):
    def _log(self, status_code: int, request: Any) -> None:  # probes every few seconds: no log line
        pass


class _OldestOutServer(tornado.httpserver.HTTPServer):
    """Tornado's server (which has no connection cap) with at most ``max_connections`` open: a new one
    past the cap closes the oldest."""

    max_connections = MAX_CONNECTIONS

    def initialize(self, *args: Any, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        self._streams: Deque[Any] = collections.deque()

    def handle_stream(self, stream: Any, address: Any) -> None:
        self._streams = collections.deque(s for s in self._streams if not s.closed())
        while len(self._streams) >= self.max_connections:
            self._streams.popleft().close()
        self._streams.append(stream)
        super().handle_stream(stream, address)


class HealthServer:
    """The probe/metrics HTTP server in a background thread (one thread, however many connections)."""

    def __init__(self, state: ServiceState, port: int, host: str = "0.0.0.0",
                 live_check: LiveCheck = lambda: None, max_connections: int = MAX_CONNECTIONS,
                 timeout_s: float = TIMEOUT_S) -> None:
        self._app = make_app(state, live_check)
        self._max_connections = max_connections
        self._timeout_s = timeout_s
        self._sockets = tornado.netutil.bind_sockets(port, address=host)  # OSError here, in the caller
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server: Optional[_OldestOutServer] = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health", daemon=True)

    @property
    def address(self) -> Tuple[str, int]:
        return self._sockets[0].getsockname()[:2]

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        # No executor: the WSGI app runs on this loop; every route answers from memory at once.
        server = _OldestOutServer(_QuietContainer(self._app), max_header_size=MAX_HEADER_BYTES,
                                  max_body_size=MAX_BODY_BYTES, idle_connection_timeout=self._timeout_s,
                                  body_timeout=self._timeout_s)
        server.max_connections = self._max_connections
        server.add_sockets(self._sockets)
        self._server = server
        self._started.set()
        self._loop.run_forever()
        self._loop.close()

    def start(self) -> None:
        self._thread.start()
        self._started.wait()

    def stop(self) -> None:
        if not stop_server_thread(self._loop, self._server, self._thread):
            for sock in self._sockets:
                sock.close()
