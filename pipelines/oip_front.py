"""The Open Inference Protocol (KServe v2) front doors of rexnet-serve: REST and gRPC on the service's DAG.

rexnet_serving.oip holds the protocol (handle_rest, the gRPC servicer, OipService); this module plugs it
into the service: ``FrontDoorModel`` is an OipModel whose two infer calls go through the same
FrontDoor as the Pipeline's HTTP and gRPC (admission, deadlines, cancellation, the DAG's batching, the
per-model metrics), as the same typed request and answer (rexnet_pipelines.request);
``OipHttpFrontDoor`` is the Pipeline HTTP front door's Tornado server (same body, header, connection
and idle limits) routing ``/v2/...`` to handle_rest; and
``start_oip_grpc_server`` is the hardened gRPC server of rexnet_pipelines.frontdoor with the
protocol's servicer. The v2 health endpoints answer from the service's own readiness.

Deadlines: gRPC's own; on REST a ``Grpc-Timeout`` header, as on the Pipeline's HTTP (else the
configured default). A client that goes away cancels its request.
"""
from __future__ import annotations

import threading
from concurrent import futures
from typing import Any, Callable, List, Mapping, Optional, Sequence

import grpc
import numpy as np
import tornado.web

from rexnet_serving import pipeline_wire
from rexnet_serving.oip import ImagesOutcome, ModelInfo, OipError, OipService
from rexnet_serving.oip.grpc_service import add_to_server
from rexnet_serving.oip.rest import handle_rest
from rexnet_serving.oip.tensors import DEADLINE_EXCEEDED, INTERNAL, INVALID_ARGUMENT, UNAVAILABLE

from .admission import BodyBudget
from .frontdoor import FrontDoor, serve_grpc
from .http_front import GONE, HttpFrontDoor, PredictionHandler, parse_grpc_timeout
from .ops import ModelRuntime, ServiceRuntime
from .request import ClassifyAnswer, ClassifyRequest
from .settings import RexnetSettings

_KINDS = {pipeline_wire.INVALID_REQUEST: INVALID_ARGUMENT, pipeline_wire.REQUEST_TOO_LARGE: INVALID_ARGUMENT,
          pipeline_wire.OVERLOADED: UNAVAILABLE, pipeline_wire.CLOSED_ERROR: UNAVAILABLE, pipeline_wire.TIMEOUT: DEADLINE_EXCEEDED}


class FrontDoorModel:
    """One served model version as an OipModel: each infer call is one request through the FrontDoor."""

    def __init__(self, front: FrontDoor, model: ModelRuntime, runtime: ServiceRuntime,
                 ready: Callable[[], bool]) -> None:
        self.front = front
        self.model = model
        self.info = ModelInfo.from_manifest(model.name, str(model.version), model.classifier.manifest,
                                            max_images=runtime.max_images, max_batch=model.max_batch_images,
                                            parameters=model.settings)
        self._ready = ready

    def ready(self) -> bool:
        return self._ready()

    def _call(self, request: ClassifyRequest, options: Mapping[str, Any]) -> ClassifyAnswer:
        hook = options.get("cancel_hook")

        def watch(ticket: Any) -> None:
            if hook is not None and hook(ticket.cancel) is False:
                ticket.cancel()  # gRPC's add_callback: the RPC is already over (the client left)

        answer = self.front.call(lambda: request, options.get("timeout_s"), watch)
        if answer.status not in (pipeline_wire.OK, pipeline_wire.INVALID_IMAGE) or answer.probs is None:
            raise OipError(_KINDS.get(answer.status, INTERNAL), f"{answer.message} (err_no {answer.status})")
        return answer

    def _request(self, **what: Any) -> ClassifyRequest:
        # top-k is the protocol's business (classification, from the probabilities): 1 is the cheapest.
        return ClassifyRequest(top_k=1, model=self.model.name, version=self.model.version, **what)

    def infer_images(self, images: Sequence[Any], options: Mapping[str, Any]) -> ImagesOutcome:
        answer = self._call(self._request(images=list(images)), options)
        return ImagesOutcome(answer.probs, answer.errors)

    def infer_tensor(self, batch: np.ndarray, options: Mapping[str, Any]) -> np.ndarray:
        return self._call(self._request(tensor=batch), options).probs


def oip_service(front: FrontDoor, runtime: ServiceRuntime, ready: Callable[[], bool]) -> OipService:
    """Every served model version of the service, behind the protocol."""
    return OipService([FrontDoorModel(front, m, runtime, ready) for m in runtime.models.values()], ready=ready)


@tornado.web.stream_request_body
class _OipHandler(PredictionHandler):
    """handle_rest behind the Pipeline HTTP handler's body admission (413, 503 before reading a body;
    the same body budget), run in the pool (parsing included); a client gone before its turn is dropped."""

    def initialize(self, front: FrontDoor, service: OipService, pool: futures.ThreadPoolExecutor,
                   limits: RexnetSettings, bodies: BodyBudget) -> None:
        super().initialize(front, pool, limits, bodies)
        self.service = service
        self._on_close: List[Callable[[], None]] = []

    def _error(self, status: int, code: int, message: str) -> None:
        self.set_status(status)
        self.finish({"error": message})

    def _refused(self, answer: ClassifyAnswer) -> None:
        self.set_header("Retry-After", "1")
        self._error(503, 0, answer.message)

    async def _handle(self) -> None:
        if self._refusal is not None:
            return self._refused(self._refusal)
        try:
            timeout_s = parse_grpc_timeout(self.request.headers.get("Grpc-Timeout"))
        except ValueError as exc:
            return self._error(400, 0, str(exc))
        options = {"timeout_s": timeout_s, "cancel_hook": self._on_close.append}
        method, path, headers = self.request.method, self.request.path, dict(self.request.headers.items())

        def work() -> Any:
            if self.gone:  # the client left while this waited for a thread: no parsing, no DAG slot
                return GONE
            return handle_rest(self.service, method, path, headers, self._body, options, self.max_values)

        answer = await self._in_pool(work)
        if answer is GONE:
            return self.front.cancelled_before_admission()
        status, headers, body = answer
        self.set_status(status)
        for key, value in headers.items():
            if key.lower() != "content-length":
                self.set_header(key, value)
        if status == 503:
            self.set_header("Retry-After", "1")
        self.finish(body)

    async def get(self) -> None:
        await self._handle()

    async def post(self) -> None:
        await self._handle()

    def on_connection_close(self) -> None:
        super().on_connection_close()
        for cancel in self._on_close:
            cancel()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish({"error": self._reason})


class _OipNotFound(tornado.web.RequestHandler):
    def prepare(self) -> None:
        self.set_status(404)
        self.finish({"error": f"no route for {self.request.method} {self.request.path} (Open Inference "
                              "Protocol: /v2/...)"})


class OipHttpFrontDoor(HttpFrontDoor):
    """The v2 REST API on its own port, in the Pipeline HTTP front door's server (limits, liveness)."""

    def __init__(self, front: FrontDoor, service: OipService, host: str, port: int, limits: RexnetSettings) -> None:
        super().__init__(front, host, port, limits)
        self.service = service
        self._thread.name = "oip-http-front"

    def _app(self) -> tornado.web.Application:
        return tornado.web.Application(
            [(r"/v2(?:/.*)?", _OipHandler,
              {"front": self.front, "service": self.service, "pool": self._pool, "limits": self._limits,
               "bodies": self.front.gate.bodies})],
            default_handler_class=_OipNotFound)


def start_oip_grpc_server(service: OipService, host: str, port: int, workers: int,
                          limits: RexnetSettings) -> grpc.Server:
    """``inference.GRPCInferenceService`` on ``host:port`` with the Pipeline gRPC server's limits;
    OSError when the port cannot be bound."""
    return serve_grpc(lambda server: add_to_server(service, server), host, port, workers, limits, "oip-grpc")


class OipFront:
    """Both v2 front doors of one service, started and stopped with it (either may be off: port None)."""

    def __init__(self, front: FrontDoor, runtime: ServiceRuntime, ready: Callable[[], bool], host: str,
                 http_port: Optional[int], grpc_port: Optional[int], workers: int, limits: RexnetSettings) -> None:
        self.service = oip_service(front, runtime, ready)
        self.http: Optional[OipHttpFrontDoor] = None
        self.grpc: Optional[grpc.Server] = None
        if http_port is not None:
            self.http = OipHttpFrontDoor(front, self.service, host, http_port, limits)
            self.http.start()
        if grpc_port is not None:
            try:
                self.grpc = start_oip_grpc_server(self.service, host, grpc_port, workers, limits)
            except OSError:
                self.stop()
                raise

    def alive(self) -> bool:
        return self.http is None or self.http.alive()

    def stop_listening(self, grace: float) -> Optional[threading.Event]:
        """Drain: no new connections or RPCs; running gRPC calls get ``grace`` seconds (wait on the
        returned event). REST requests in flight are the admission's (the caller waits for those)."""
        if self.http is not None:
            self.http.stop_listening()
        return self.grpc.stop(grace=grace) if self.grpc is not None else None

    def stop(self) -> None:
        if self.http is not None:
            self.http.stop()
