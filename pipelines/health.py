"""Health probes and Prometheus metrics over HTTP (Paddle Serving has neither).

GET /healthz  200 while the process serves: its HTTP and gRPC front doors are up (liveness); 503 with
              the reason when one of them died, so Kubernetes restarts the pod.
GET /readyz   200 once the model is loaded and a warm-up request went through the whole DAG; 503 before
              that and while draining after SIGTERM (readiness, Kubernetes probe semantics).
GET /metrics  Prometheus text format (prometheus_client's WSGI app).
"""
from __future__ import annotations

import json
import threading
from typing import Callable, Iterable, List, Optional, Tuple
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from . import metrics

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


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # probes every few seconds: no log line
        pass


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


class HealthServer:
    """The probe/metrics HTTP server in a background thread."""

    def __init__(self, state: ServiceState, port: int, host: str = "0.0.0.0",
                 live_check: LiveCheck = lambda: None) -> None:
        self._server = make_server(host, port, make_app(state, live_check), ThreadingWSGIServer,
                                   handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="health", daemon=True)

    @property
    def address(self) -> Tuple[str, int]:
        return self._server.server_address[:2]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
