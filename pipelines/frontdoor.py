"""The service's front doors onto the DAG: one call path for every protocol, and the hardened gRPC server.

Every request, whatever protocol brought it, goes through :meth:`FrontDoor.call`: admission (a bounded
number in progress, refusals at once: rexnet_pipelines.admission), a deadline and a cancellation hook
bound to the request's ticket, the typed request (rexnet_pipelines.request) through Paddle Serving's
DAG (rexnet_pipelines.paddle_adapter.classify), request metrics. The protocols' front doors translate
their wire formats to and from the typed request and answer: rexnet_pipelines.pipeline_front (the
Pipeline's HTTP and gRPC), rexnet_pipelines.oip_front (the Open Inference Protocol's REST and gRPC).

The gRPC server is grpcio's, with the limits that keep one client from taking the port down. Measured
here against the rapid-reset pattern (CVE-2023-44487: open an HTTP/2 stream and reset it at once, in a
loop): every reset stream becomes a call that the Python server hands to its thread pool, whose queue is
unbounded, so a few connections queue hundreds of thousands of dead calls ahead of every real one.
``grpc.max_concurrent_streams`` with gRPC core's overload protection (``grpc.http.overload_protection``,
on by default since 1.58) counts a stream against that limit until the application has finished with
it, so each connection can have at most that many calls waiting in Python and the transport refuses the
rest itself (RST_STREAM REFUSED_STREAM) without any Python work. ``maximum_concurrent_rpcs`` bounds what
all connections together can queue (RESOURCE_EXHAUSTED past it).
"""
from __future__ import annotations

import time
from concurrent import futures
from typing import Any, Callable, Optional

import grpc

from rexnet_serving import pipeline_wire

from . import admission, metrics
from .paddle_adapter import classify
from .request import ClassifyAnswer, ClassifyRequest
from .settings import RexnetSettings

Watch = Callable[[admission.Ticket], None]


class FrontDoor:
    """Admit, run through the DAG, count: what every protocol's handler calls."""

    def __init__(self, dag_executor: Any, gate: admission.Admission, name: str) -> None:
        self._dag = dag_executor
        self.gate = gate
        self.name = name
        self.draining = False

    def call(self, build: Callable[[], ClassifyRequest], timeout_s: Optional[float] = None,
             watch: Optional[Watch] = None) -> ClassifyAnswer:
        """The answer to the request ``build()`` returns once the request is admitted (a
        pipeline_wire.RequestError it raises is the answer INVALID_REQUEST: parsing costs an admission slot,
        as the work it starts does).

        ``timeout_s``: the client's remaining deadline (None: the configured default); ``watch``: gets the
        ticket (to cancel it when the client goes away).
        """
        start = time.perf_counter()
        answer = self._call(build, timeout_s, watch)
        self.count(answer, time.perf_counter() - start)
        return answer

    def refuse(self, status: int, message: str) -> ClassifyAnswer:
        """The answer (counted) to a request refused before admission for what it is (not for load)."""
        answer = ClassifyAnswer.refused(status, message)
        self.count(answer, 0.0)
        return answer

    @staticmethod
    def count(answer: ClassifyAnswer, seconds: float) -> None:
        metrics.REQUEST_SECONDS.observe(seconds)
        metrics.REQUESTS.labels(str(answer.status)).inc()
        name, version = answer.model.split("/") if answer.model else ("", "")
        metrics.MODEL_REQUESTS.labels(name, version, str(answer.status)).inc()
        metrics.MODEL_REQUEST_SECONDS.labels(name, version).observe(seconds)

    def refusal(self) -> Optional[ClassifyAnswer]:
        """The answer for a request that arrives now, if it would be refused whatever it holds (draining,
        or the admission limit reached), counted as answered; None otherwise. Front doors call it before
        parsing a request, so that shedding load costs as little as possible; admission decides again."""
        if not self.draining and self.gate.in_flight < self.gate.max_in_flight:
            return None
        if self.draining:
            answer = self._draining()
            metrics.REQUESTS.labels(str(answer.status)).inc()
            return answer
        return self.overloaded(f"overloaded: {self.gate.max_in_flight} requests in progress, the limit; "
                               "retry with backoff")

    @staticmethod
    def overloaded(message: str) -> ClassifyAnswer:
        """The answer (OVERLOADED, counted) to a request refused for load before it was admitted."""
        metrics.REFUSED.labels(admission.OVERLOADED).inc()
        metrics.REQUESTS.labels(str(pipeline_wire.OVERLOADED)).inc()
        return ClassifyAnswer.refused(pipeline_wire.OVERLOADED, message)

    @staticmethod
    def cancelled_before_admission() -> None:
        """Count a request whose client went away before it was admitted (nothing to answer)."""
        metrics.REFUSED.labels(admission.CANCELLED).inc()
        metrics.REQUESTS.labels(str(pipeline_wire.TIMEOUT)).inc()

    @staticmethod
    def _draining() -> ClassifyAnswer:
        metrics.REFUSED.labels(admission.DRAINING).inc()
        return ClassifyAnswer.refused(pipeline_wire.CLOSED_ERROR, "the service is shutting down; retry elsewhere")

    def _call(self, build: Callable[[], ClassifyRequest], timeout_s: Optional[float],
              watch: Optional[Watch]) -> ClassifyAnswer:
        if self.draining:
            return self._draining()
        try:
            ticket = self.gate.admit(timeout_s)
        except admission.Overloaded as exc:
            return ClassifyAnswer.refused(pipeline_wire.OVERLOADED, str(exc))
        try:
            if watch is not None:
                watch(ticket)
            try:
                request = build()
            except pipeline_wire.RequestError as exc:
                return ClassifyAnswer.refused(pipeline_wire.INVALID_REQUEST, f"{exc.code}: {exc.message}")
            request.ticket = ticket
            answer = classify(self._dag, request)
            answer.model = answer.model or ticket.model or ""
            return answer
        finally:
            ticket.release()


def watch_rpc(context: Any, ticket: admission.Ticket) -> None:
    """Cancel ``ticket`` when the RPC ends early; at once when it already has (add_callback then returns
    False and would never call back: the client left while the call waited for a thread)."""
    if not context.add_callback(ticket.cancel):
        ticket.cancel()


def grpc_options(limits: RexnetSettings) -> list:
    """Channel arguments of the gRPC server from the config's ``rexnet`` limits."""
    return [
        ("grpc.max_receive_message_length", limits.max_request_bytes),
        ("grpc.max_send_message_length", limits.max_request_bytes),
        ("grpc.max_concurrent_streams", limits.grpc_max_streams_per_connection),
        ("grpc.max_allowed_incoming_connections", limits.grpc_max_connections),
        ("grpc.http.overload_protection", 1),  # explicit: our stream bound relies on it (see above)
        ("grpc.max_connection_idle_ms", int(limits.idle_timeout_s * 1000)),
        ("grpc.so_reuseport", 0),  # a port already taken is an error, not a silently shared socket
    ]


def serve_grpc(register: Callable[[grpc.Server], Any], host: str, port: int, workers: int, limits: RexnetSettings,
               thread_prefix: str = "grpc") -> grpc.Server:
    """A started gRPC server with this module's limits and the servicers ``register`` adds; OSError when
    the port cannot be bound."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_prefix),
                         options=grpc_options(limits), maximum_concurrent_rpcs=limits.grpc_max_pending_rpcs)
    register(server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpcio >= 1.50 raises instead of returning 0
        raise OSError(f"cannot listen on gRPC {address}: {exc}") from None
    if bound == 0:
        raise OSError(f"cannot listen on gRPC {address}")
    server.start()
    return server
