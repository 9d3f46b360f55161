"""The service's life cycle on Paddle Serving's PipelineServer: load, warm up, ready, serve, drain.

Paddle Serving's ``PipelineServer.run_server`` blocks in ``wait_for_termination`` with no way to stop
gracefully, and starts the HTTP gateway (a Go library, libproxy_server.so, run in a forked process) as a
daemon it never stops. So ``prepare_server`` (config checks, op setup) is Paddle's, and the run step is
done here with the same parts: a gRPC server with Paddle's PipelineServicer and the gateway process,
both kept at hand so SIGTERM can drain them (Kubernetes pod termination: readiness off, finish what is
in flight, exit 0).

Import this module only after the working directory is set (rexnet_pipelines.cli does): importing
Paddle Serving's pipeline package writes PipelineServingLogs/ into the current directory.
"""
from __future__ import annotations

import rexnet_serving.imageio  # noqa: F401  (first: binds zlib before Paddle does; see that module)

import ctypes
import logging
import multiprocessing
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any, List, Optional

import cv2
import grpc
import numpy as np
from paddle_serving_server.pipeline import PipelineServer
from paddle_serving_server.pipeline.pipeline_server import PipelineServicer
from paddle_serving_server.pipeline.proto import pipeline_service_pb2, pipeline_service_pb2_grpc
from paddle_serving_server.web_service import WebService

from rexnet_serving.classifier import Classifier, inference_model_options
from rexnet_serving.clients.base import ClientError
from rexnet_serving.clients.grpc import GrpcClient
from rexnet_serving.clients.http import HttpClient
from rexnet_serving.imageio import DecodeLimits
from rexnet_serving.predictor import runtime_info
from rexnet_serving.remote import RemotePredictor

from . import metrics, protocol
from .config import ServingConfig, check_with_paddle
from .health import DRAINING, READY, HealthServer, ServiceState
from .ops import RexnetRequestOp, RexnetResponseOp, ServiceRuntime, build_dag

log = logging.getLogger("rexnet_serve")
_GRPC_MESSAGE_BYTES = 256 * 1024 * 1024  # Paddle Serving's own limit (pipeline_server.py)


class StartupError(RuntimeError):
    """The service could not start; the message says why (printed as one line, exit code 1)."""


class RexnetWebService(WebService):
    """The DAG as a Paddle Serving WebService, with our request/response ops at its two ends."""

    def __init__(self, runtime: ServiceRuntime, name: str) -> None:
        super().__init__(name=name)
        self.runtime = runtime

    def get_pipeline_response(self, read_op: Any) -> Any:
        return build_dag(self.runtime, read_op)

    def prepare_pipeline_config(self, yml_file: Optional[str] = None, yml_dict: Optional[dict] = None) -> None:
        # WebService's version hard-wires the stock RequestOp/ResponseOp; ours differ (see ops.py).
        last_op = self.get_pipeline_response(RexnetRequestOp())
        self._server.set_response_op(RexnetResponseOp(input_ops=[last_op]))
        self._server.prepare_server(yml_file=yml_file, yml_dict=yml_dict)

    @property
    def pipeline_server(self) -> PipelineServer:
        return self._server


class RexnetServicer(PipelineServicer):
    """Paddle's servicer plus request metrics and a clearer answer to a wrong service name."""

    def inference(self, request: Any, context: Any) -> Any:
        start = time.perf_counter()
        metrics.IN_FLIGHT.inc()
        err_no = "exception"
        try:
            if request.name and request.name != self._name:
                response = pipeline_service_pb2.Response(
                    err_no=protocol.NO_SERVICE,
                    err_msg=f"unknown service {request.name!r}: this server serves {self._name!r} "
                            f"(POST /{self._name}/prediction)")
            else:
                response = super().inference(request, context)
            err_no = str(response.err_no)
            return response
        finally:
            metrics.IN_FLIGHT.dec()
            metrics.REQUEST_SECONDS.observe(time.perf_counter() - start)
            metrics.REQUESTS.labels(err_no).inc()


def _run_gateway(grpc_port: int, http_port: int) -> None:
    """Body of the gateway process: Paddle Serving's Go HTTP->gRPC proxy (blocks forever)."""
    # The Go runtime takes over this process; a Python SIGTERM handler would never run (the main thread
    # stays inside Go), so restore the default actions, and die with the parent even if it is SIGKILLed.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    from paddle_serving_server.pipeline import gateway
    library = Path(gateway.__file__).resolve().parent / "libproxy_server.so"
    ctypes.cdll.LoadLibrary(str(library)).run_proxy_server(grpc_port, http_port)


def warmup_image() -> bytes:
    """A small JPEG to send through the DAG before declaring the service ready."""
    y, x = np.mgrid[0:256, 0:256]
    image = np.stack([x, y, (x + y) // 2], axis=-1).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", image)
    if not ok:
        raise StartupError("OpenCV could not encode the warm-up image")
    return data.tobytes()


class RexnetServer:
    """Runs the service until ``stop_event`` is set, then drains; ``run()`` returns the exit code."""

    def __init__(self, config: ServingConfig, model_dir: Path, stop_event: threading.Event) -> None:
        self.config = config
        self.model_dir = model_dir
        self.stop_event = stop_event
        self.state = ServiceState()
        self.name = config.rexnet["service_name"]
        self._health: Optional[HealthServer] = None
        self._grpc: Optional[grpc.Server] = None
        self._servicer: Optional[RexnetServicer] = None
        self._gateway: Optional[multiprocessing.Process] = None
        self._runtime: Optional[ServiceRuntime] = None

    # -- start ------------------------------------------------------------------------------------
    def _load(self) -> ServiceRuntime:
        service = self.config.infer_service
        rex = self.config.rexnet
        options = inference_model_options(service["device_type"], service["devices"], service["thread_num"],
                                          service["use_mkldnn"], service["precision"],
                                          rex["max_batch_images"], service["runtime"],  # runtime (issue 10)
                                          self.config.infer["concurrency"])  # OpenVINO streams (issue 10)
        if options["device"] == "gpu":  # preprocessing and nvJPEG decode follow the current device
            import paddle
            paddle.set_device(f"gpu:{options['gpu_id']}")
        limits = DecodeLimits(rex["max_image_bytes"], rex["max_image_pixels"])
        try:
            classifier = Classifier(self.model_dir, limits=limits, model=self._remote_predictor(), **options)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise StartupError(f"cannot load the model in {self.model_dir}: {exc}") from None
        fetch = self.config.infer["fetch_list"]
        if fetch is not None and list(fetch) != [classifier.manifest.fetch.alias]:
            raise StartupError(f"op.infer.fetch_list {fetch} in {self.config.source} does not match the "
                               f"model in {self.model_dir}, which fetches [{classifier.manifest.fetch.alias!r}]")
        return ServiceRuntime.create(classifier, self.config.data["op"]["infer"]["concurrency"], limits,
                                     rex["max_images_per_request"], rex["default_top_k"],
                                     rex["max_batch_images"])

    def _remote_predictor(self) -> Optional[RemotePredictor]:
        """With client_type brpc: the predictor that forwards to the backend (no local model is loaded);
        else None (the Classifier loads its InferenceModel)."""
        if not self.config.remote:
            return None
        infer = self.config.infer
        try:
            return RemotePredictor(self.model_dir, infer["server_endpoints"], infer["client_config"],
                                   timeout=self.config.rexnet["backend_timeout_s"], fetch=infer["fetch_list"])
        except (OSError, ValueError, KeyError) as exc:
            raise StartupError(f"cannot set up the bRPC backend client (op.infer in {self.config.source}): "
                               f"{exc}") from None

    def _start_pipeline(self, runtime: ServiceRuntime) -> None:
        service = RexnetWebService(runtime, self.name)
        try:
            service.prepare_pipeline_config(yml_dict=self.config.paddle())
        except SystemExit as exc:  # Paddle Serving exits on a busy port or a bad config
            raise StartupError(f"Paddle Serving refused to start: {exc}") from None
        conf = service.pipeline_server._conf
        self._servicer = RexnetServicer(self.name, service.pipeline_server._response_op, conf)
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=conf["worker_num"]),
                                 options=[("grpc.max_send_message_length", _GRPC_MESSAGE_BYTES),
                                          ("grpc.max_receive_message_length", _GRPC_MESSAGE_BYTES)])
        pipeline_service_pb2_grpc.add_PipelineServiceServicer_to_server(self._servicer, self._grpc)
        if self._grpc.add_insecure_port(f"[::]:{self.config.rpc_port}") == 0:
            raise StartupError(f"cannot listen on gRPC port {self.config.rpc_port}")
        self._grpc.start()
        self._gateway = multiprocessing.Process(target=_run_gateway, name="rexnet-gateway",
                                                args=(self.config.rpc_port, self.config.http_port))
        self._gateway.start()

    def _warm_up(self, deadline: float) -> None:
        """One real request through the gRPC endpoint (the whole DAG), then one through the gateway.

        With a bRPC backend the request goes through it too, so the service turns ready only once the
        backend answers (until then it keeps trying, up to startup_timeout_s).
        """
        image = warmup_image()
        waiting_logged = False
        clients = [GrpcClient(f"127.0.0.1:{self.config.rpc_port}", timeout=60, service_name=self.name),
                   HttpClient(f"127.0.0.1:{self.config.http_port}", timeout=60, service_name=self.name)]
        try:
            for client in clients:
                while True:
                    if self.stop_event.is_set():
                        return
                    try:
                        results = client.classify([image], top_k=1)
                    except ClientError as exc:  # the gateway takes a moment to listen
                        if time.monotonic() > deadline:
                            raise StartupError(f"warm-up failed: {exc}") from None
                        if self.config.remote and not waiting_logged:
                            log.info("waiting for the bRPC backend %s: %s",
                                     ",".join(self.config.infer["server_endpoints"]), exc)
                            waiting_logged = True
                        time.sleep(0.2)
                        continue
                    if not results[0].ok:
                        raise StartupError(f"warm-up failed: {results[0].error_message}")
                    break
        finally:
            for client in clients:
                client.close()

    def urls(self) -> List[str]:
        host = "127.0.0.1"
        c = self.config
        urls = [f"HTTP     http://{host}:{c.http_port}/{self.name}/prediction",
                f"gRPC     {host}:{c.rpc_port} (PipelineService/inference, name {self.name!r})",
                f"health   http://{host}:{c.metrics_port}/healthz  http://{host}:{c.metrics_port}/readyz",
                f"metrics  http://{host}:{c.metrics_port}/metrics"]
        if c.remote:
            urls.append(f"backend  bRPC {','.join(c.infer['server_endpoints'])} (inference forwarded)")
        return urls

    def run(self) -> int:
        deadline = time.monotonic() + self.config.rexnet["startup_timeout_s"]
        try:
            try:
                self._health = HealthServer(self.state, self.config.metrics_port)
            except OSError as exc:
                raise StartupError(f"cannot listen on metrics port {self.config.metrics_port}: {exc}") from None
            self._health.start()
            check_with_paddle(self.config)
            runtime = self._runtime = self._load()
            manifest = runtime.classifier.manifest
            used = runtime_info(runtime.classifier.model)  # runtime really used (issue 10)
            metrics.RUNTIME.info(used)  # rexnet_runtime_info on /metrics (issue 10)
            if not self.stop_event.is_set():
                self._start_pipeline(runtime)
                self._warm_up(deadline)
            if not self.stop_event.is_set():
                self.state.set(READY)
                log.info("ready: %s (%s, %s, %s %s) from %s\n  %s", self.name, manifest.arch, self.config.device,
                         used["runtime"], used["precision"], self.model_dir, "\n  ".join(self.urls()))
                # Wake up now and then: a signal caught by another thread runs its Python handler only
                # when the main thread executes bytecode, never while it sleeps in a bare wait().
                while not self.stop_event.wait(0.2):
                    pass
            return self.drain()
        except StartupError as exc:
            log.error("%s", exc)
            self.drain(quiet=True)
            return 1

    # -- stop -------------------------------------------------------------------------------------
    def drain(self, quiet: bool = False) -> int:
        """Readiness off, let in-flight requests finish (up to drain_timeout_s), stop every part."""
        self.state.set(DRAINING)
        timeout = self.config.rexnet["drain_timeout_s"]
        if not quiet:
            log.info("draining: finishing in-flight requests (up to %ss)", timeout)
        if self._grpc is not None:
            # New RPCs are refused at once (UNAVAILABLE; the gateway answers HTTP 503); running ones
            # get `timeout` seconds.
            self._grpc.stop(grace=timeout).wait(timeout + 5)
        if self._gateway is not None and self._gateway.pid is not None:
            self._gateway.terminate()
            self._gateway.join(5)
            if self._gateway.is_alive():
                self._gateway.kill()
                self._gateway.join(5)
        if self._servicer is not None:
            self._servicer._dag_executor.stop()  # op threads end on ChannelStopError
        if self._runtime is not None:
            self._runtime.close()
        if self._health is not None:
            self._health.stop()
        if not quiet:
            log.info("stopped")
        return 0
