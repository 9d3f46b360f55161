"""Paddle Serving's HTTP API (``POST /{name}/prediction``), served in-process by Tornado.

Paddle Serving 0.9.0 serves HTTP through a Go grpc-gateway (libproxy_server.so, Go 1.17.2 and
grpc-gateway v1.16.0 from 2021) started as a separate process that nobody watches: every request was
parsed as JSON in Go, re-encoded as protobuf, sent over loopback gRPC and answered back the same way.
Here the same JSON (the gateway's protobuf JSON mapping of pipeline_service.proto's Request, see
``parse_request``) goes straight to the front door (rexnet_pipelines.pipeline_front), and the answer
has the same fields and error codes: one hop and two encodings fewer, and a maintained server.

Tornado, because it is maintained, runs on asyncio (an idle or slow connection costs a socket, not a
thread) and enforces the limits a public HTTP port needs: the header size, a deadline for the request
head and for idle keep-alive connections (``idle_connection_timeout``: a slow-loris client is dropped),
and a deadline for the body. On top of that this module caps the number of open connections, and before
a body is read: refuses it with 413 over the size limit (from Content-Length, or as soon as a chunked
body passes it), and with 503 + Retry-After when the admission limit is reached or the body's bytes
would pass the process's budget for bodies held (rexnet_pipelines.admission.BodyBudget, shared with
the v2 REST port). Parsing (bounded by rexnet_serving.jsonbody before it starts) and the DAG call
run in a thread pool as large as the admission limit: nothing heavier than reading bytes runs on the
event loop, whose heartbeat is the liveness probe.

Deadlines: a ``Grpc-Timeout`` header (the gateway's convention, e.g. ``500m``, ``2S``) sets the
request's deadline; the configured default applies otherwise. A client that disconnects cancels its
request: one still waiting for a pool thread is dropped before parsing, an admitted one before decoding
or inference.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from concurrent import futures
from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional

import tornado.httpserver
import tornado.web
from google.protobuf import json_format
from paddle_serving_server.pipeline.proto import pipeline_service_pb2

from rexnet_serving import pipeline_wire
from rexnet_serving.jsonbody import JsonBodyError, ascii_uint, load_json

from . import pipeline_front
from .admission import BodyBudget
from .frontdoor import FrontDoor
from .loop_thread import stop_server_thread
from .request import ClassifyAnswer
from .settings import RexnetSettings

_GRPC_TIMEOUT = re.compile(r"^([0-9]{1,8})([HMSmun])$")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# grpc-gateway's error body: {"code": <gRPC status>, "message": ...}; 3 = INVALID_ARGUMENT, 5 = NOT_FOUND.
_INVALID_ARGUMENT, _NOT_FOUND, _UNAVAILABLE = 3, 5, 14


def parse_grpc_timeout(value: Optional[str]) -> Optional[float]:
    """Seconds from a gRPC timeout header value (``<digits><unit>``); None when absent; ValueError
    when malformed."""
    if value is None:
        return None
    found = _GRPC_TIMEOUT.match(value.strip())
    if found is None:
        raise ValueError(f"Grpc-Timeout must be up to 8 digits and a unit (H, M, S, m, u, n), got {value!r}")
    return int(found.group(1)) * _TIMEOUT_UNITS[found.group(2)]


_REQUEST_FIELDS = {f.name for f in pipeline_service_pb2.Request.DESCRIPTOR.fields}


def parse_request(body: bytes, max_values: int) -> SimpleNamespace:
    """A Pipeline Request from its JSON body, as the gateway's protobuf JSON mapping reads it: the fields
    of pipeline_service.proto's Request (an unknown one is an error), ``key``/``value`` lists of strings,
    ``logid`` a number (or a numeric string, as proto3 JSON writes int64), ``tensors`` Tensor messages.
    ValueError naming the field for anything else; at most ``max_values`` JSON values (counted before
    parsing, rexnet_serving.jsonbody).

    Why not json_format.Parse for the whole message: protobuf 3.20's version scans every string value for
    unpaired surrogates with a regular expression, which took 80 % of the HTTP front door's time on
    ~100 KB base64 images (py-spy, framework floor). Tensors, rare over HTTP, still go through it.
    """
    doc = load_json(body or b"{}", max_values)
    if not isinstance(doc, dict):
        raise ValueError("the request body must be a JSON object")
    unknown = sorted(set(doc) - _REQUEST_FIELDS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} in the request (known: {', '.join(sorted(_REQUEST_FIELDS))})")
    lists = {}
    for field in ("key", "value"):
        items = doc.get(field) or []
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ValueError(f"{field} must be a list of strings")
        lists[field] = items
    raw_logid = doc.get("logid") or 0
    logid = raw_logid if type(raw_logid) is int and 0 <= raw_logid < 2**64 else ascii_uint(raw_logid)
    if logid is None:
        raise ValueError(f"logid must be a non-negative 64-bit integer, got {str(raw_logid)[:40]!r}")
    tensors = doc.get("tensors") or []
    if not isinstance(tensors, list):
        raise ValueError("tensors must be a list")
    parsed = []
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, dict):
            raise ValueError(f"tensors[{index}] must be a Tensor object, got {type(tensor).__name__}")
        try:
            parsed.append(json_format.ParseDict(tensor, pipeline_service_pb2.Tensor()))
        except (json_format.ParseError, TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise ValueError(f"tensors[{index}]: {exc}") from None
    return SimpleNamespace(key=lists["key"], value=lists["value"], logid=logid, name="", tensors=parsed)


def response_json(response: Any) -> Dict[str, Any]:
    """The gateway's JSON form of a Pipeline Response (every field, original names)."""
    return {"err_no": response.err_no, "err_msg": response.err_msg, "key": list(response.key),
            "value": list(response.value),
            "tensors": [json_format.MessageToDict(t, preserving_proto_field_name=True) for t in response.tensors]}


GONE = object()  # what the pool thread returns for a request whose client went away while it waited
# A body up to this size refused for load is read and dropped, then answered: answering before it and
# closing would make the kernel reset the connection, and a client still sending would see a reset
# instead of the 503. A larger one is answered at once and its connection closed (never read).
_DRAIN_REFUSED_BELOW = 1 << 20


@tornado.web.stream_request_body
class PredictionHandler(tornado.web.RequestHandler):
    """The body is streamed in and admitted before it is read: 413 over the size limit, 503 when the
    admission limit is reached or the bytes would pass the shared body budget (from Content-Length,
    or chunk by chunk for a chunked body). Its share of the budget is given back when the request ends."""

    def initialize(self, front: FrontDoor, pool: futures.ThreadPoolExecutor, limits: RexnetSettings,
                   bodies: BodyBudget) -> None:
        self.front = front
        self.pool = pool
        self.max_bytes = limits.max_request_bytes
        self.max_values = limits.max_json_values
        self.bodies = bodies
        self.ticket = None
        self.gone = False  # the connection closed (read from the pool thread: a plain flag is enough)
        self._body = bytearray()
        self._size = 0
        self._reserved = 0  # bytes of the body budget this request holds
        self._working = False  # a pool thread may be reading the body: its share is given back after
        self._declared: Optional[int] = None
        self._refusal: Any = None  # the answer for a small body refused for load, sent once it is read

    def _error(self, status: int, code: int, message: str) -> None:
        self.set_status(status)
        self.finish({"code": code, "message": message, "details": []})

    def _refused(self, answer: ClassifyAnswer) -> None:
        """The answer to a request refused before its body, for load (err_no 54 or 3001: 503 + Retry-After)."""
        self._answer(pipeline_front.to_response(answer))

    def _refuse_before_body(self, answer: ClassifyAnswer) -> None:
        if self._declared is not None and self._declared <= _DRAIN_REFUSED_BELOW:
            self._refusal = answer  # its bytes are dropped as they come (never held), answered in post()
        else:
            self._refused(answer)

    def _too_large(self, size: int) -> None:
        self._error(413, _INVALID_ARGUMENT, f"the request body is {size} bytes, over the limit of "
                                            f"{self.max_bytes} (rexnet.max_request_bytes)")

    def _reserve(self, size: int) -> bool:
        if not self.bodies.take(size):
            self._refuse_before_body(self.front.overloaded(
                f"overloaded: the service holds {self.bodies.held} bytes of request bodies, this one's {size} "
                f"more would pass rexnet.max_buffered_request_bytes ({self.bodies.max_bytes}); retry with backoff"))
            return False
        self._reserved += size
        return True

    def _release(self) -> None:
        reserved, self._reserved = self._reserved, 0
        if reserved:
            self.bodies.give_back(reserved)
        self._body = bytearray()

    def prepare(self) -> None:
        if self.request.method != "POST":
            return
        header = self.request.headers.get("Content-Length")
        if header is not None:
            self._declared = ascii_uint(header)
            if self._declared is None:
                return self._error(400, _INVALID_ARGUMENT, "Content-Length must be a decimal byte count")
            if self._declared > self.max_bytes:
                return self._too_large(self._declared)
        refused = self.front.refusal()  # before the body: shedding load must cost as little as possible
        if refused is not None:
            return self._refuse_before_body(refused)
        if self._declared:
            self._reserve(self._declared)

    def data_received(self, chunk: bytes) -> None:
        if self._finished or self._refusal is not None:
            return
        self._size += len(chunk)
        if self._size > self.max_bytes:
            self._release()
            return self._too_large(self._size)
        if self._declared is None and not self._reserve(len(chunk)):  # chunked: counted as it comes
            return self._release()
        self._body += chunk

    def on_finish(self) -> None:
        self._release()

    async def _in_pool(self, work: Callable[[], Any]) -> Any:
        """``work()`` in the pool; the body's budget share is kept until it returns, even if the client
        left meanwhile (the thread may still hold the bytes)."""
        self._working = True
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, work)
        finally:
            self._working = False
            if self.gone:
                self._release()

    def _parse(self) -> Any:
        """The request, or an error message (str); runs in the pool."""
        try:
            request = parse_request(self._body, self.max_values)
        except (JsonBodyError, ValueError) as exc:
            return str(exc)
        self._body = bytearray()  # parsed: the bytes are not needed any more (the budget share stays)
        return request

    async def post(self, name: str) -> None:
        if self._refusal is not None:
            return self._refused(self._refusal)
        refused = self.front.refusal()  # again: the limit may have been reached while the body came in
        if refused is not None:
            return self._refused(refused)
        try:
            timeout_s = parse_grpc_timeout(self.request.headers.get("Grpc-Timeout"))
        except ValueError as exc:
            return self._error(400, _INVALID_ARGUMENT, str(exc))

        def watch(ticket: Any) -> None:
            self.ticket = ticket
            if self.gone:
                ticket.cancel()

        def work() -> Any:
            if self.gone:  # the client left while this waited for a thread: no parsing, no DAG slot
                return GONE
            request = self._parse()
            if isinstance(request, str) or self.gone:
                return GONE if self.gone else request
            request.name = name  # the URL names the service, as the gateway did
            return pipeline_front.answer(self.front, request, timeout_s, watch)

        response = await self._in_pool(work)
        if response is GONE:
            return self.front.cancelled_before_admission()
        if isinstance(response, str):
            return self._error(400, _INVALID_ARGUMENT, response)
        self._answer(response)

    def _answer(self, response: Any) -> None:
        if response.err_no in (pipeline_wire.OVERLOADED, pipeline_wire.CLOSED_ERROR):
            self.set_status(503)  # load balancers and clients retry elsewhere / later
            self.set_header("Retry-After", "1")
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(response_json(response), ensure_ascii=False))

    def on_connection_close(self) -> None:
        self.gone = True
        if self.ticket is not None:
            self.ticket.cancel()
        if not self._working:
            self._release()

    def write_error(self, status_code: int, **kwargs: Any) -> None:  # 405, 413, 500 ... as gateway JSON
        self.finish({"code": _INVALID_ARGUMENT if status_code < 500 else _UNAVAILABLE,
                     "message": self._reason, "details": []})


class _NotFound(tornado.web.RequestHandler):
    def prepare(self) -> None:
        self.set_status(404)
        self.finish({"code": _NOT_FOUND, "message": f"no route for {self.request.method} {self.request.path}; "
                                                    "POST /{name}/prediction", "details": []})


class _CappedHTTPServer(tornado.httpserver.HTTPServer):
    """Tornado's server with a cap on open connections (Tornado has none): past it, a new connection is
    closed at once instead of holding a socket and a parser."""

    max_connections = 1024

    def handle_stream(self, stream: Any, address: Any) -> None:
        if len(self._connections) >= self.max_connections:
            stream.close()
            return
        super().handle_stream(stream, address)


class HttpFrontDoor:
    """The HTTP server in a thread of its own (an asyncio loop); ``alive()`` for the liveness probe."""

    def __init__(self, front: FrontDoor, host: str, port: int, limits: RexnetSettings) -> None:
        self.front = front
        self.host, self.port = host, port
        self._limits = limits
        self._pool = futures.ThreadPoolExecutor(max_workers=limits.max_in_flight_requests + 1,
                                                thread_name_prefix="http")
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server: Optional[_CappedHTTPServer] = None
        self._thread = threading.Thread(target=self._run, name="http-front", daemon=True)
        self._started = threading.Event()
        self._error: Optional[BaseException] = None
        self._heartbeat = time.monotonic()

    def _app(self) -> tornado.web.Application:
        return tornado.web.Application(
            [(r"/([^/]+)/prediction", PredictionHandler,
              {"front": self.front, "pool": self._pool, "limits": self._limits, "bodies": self.front.gate.bodies})],
            default_handler_class=_NotFound)

    def _run(self) -> None:
        asyncio.set_event_loop(asyncio.new_event_loop())
        self._loop = asyncio.get_event_loop()
        limits = self._limits
        try:
            # Tornado's own body limit is only a backstop here (it answers 400): the handler says 413 first.
            server = _CappedHTTPServer(
                self._app(), max_body_size=2 * limits.max_request_bytes, max_header_size=limits.max_header_bytes,
                idle_connection_timeout=limits.idle_timeout_s, body_timeout=limits.body_timeout_s)
            server.max_connections = limits.http_max_connections
            server.listen(self.port, address=self.host)
            self._server = server
        except BaseException as exc:  # noqa: BLE001 (reported to start())
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self._beat()
        self._loop.run_forever()
        self._loop.close()

    def _beat(self) -> None:
        self._heartbeat = time.monotonic()
        self._loop.call_later(1.0, self._beat)

    def start(self) -> None:
        """Listen; raises OSError when the port cannot be bound."""
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise OSError(f"cannot listen on HTTP {self.host}:{self.port}: {self._error}")

    def alive(self, stale_after_s: float = 10.0) -> bool:
        """The server thread runs and its event loop has turned within ``stale_after_s``."""
        return self._thread.is_alive() and time.monotonic() - self._heartbeat < stale_after_s

    def stop_listening(self) -> None:
        """Accept no new connections (drain); requests on open connections are still answered."""
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.stop)

    def stop(self) -> None:
        """Close everything and end the thread."""
        stop_server_thread(self._loop, self._server, self._thread)
        self._pool.shutdown(wait=False)
