"""The service's life cycle on Paddle Serving's Pipeline: load, warm up, ready, serve, drain.

Paddle Serving's ``PipelineServer.run_server`` blocks in ``wait_for_termination`` with no way to stop
gracefully and serves HTTP through a Go gateway process it never watches. So ``prepare_server`` (config
checks, op setup) and the DAG are Paddle's (started by rexnet_pipelines.paddle_adapter.start_dag), and
the serving is done here: the front doors (rexnet_pipelines.frontdoor: admission control and the gRPC
limits; rexnet_pipelines.pipeline_front: the gRPC PipelineService; rexnet_pipelines.http_front: Paddle
Serving's HTTP API in-process; rexnet_pipelines.oip_front: the v2 protocol) in front of Paddle's
DAGExecutor, all kept at hand so SIGTERM can drain them (Kubernetes pod termination: readiness off,
finish what is in flight, exit 0), and watched by the liveness probe.

Import this module only after the working directory is set (rexnet_pipelines.cli does): importing
Paddle Serving's pipeline package writes PipelineServingLogs/ into the current directory.
"""
from __future__ import annotations

import rexnet_serving.imageio  # noqa: F401  (first: binds zlib before Paddle does; see that module)

import logging
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import cv2
import grpc
import numpy as np

from rexnet_serving.classifier import Classifier
from rexnet_serving.clients.base import ClientError
from rexnet_serving.clients.grpc import GrpcClient
from rexnet_serving.clients.http import HttpClient
from rexnet_serving.imageio import DecodeLimits
from rexnet_serving.model_settings import ModelSettings
from rexnet_serving.runtimes.base import OptionError, check_runtime_options, runtime_info
from rexnet_serving.runtimes.brpc_remote import RemotePredictor
from rexnet_serving.repository import Repository

from . import metrics
from .admission import Admission
from .config import ServingConfig, check_with_paddle
from .frontdoor import FrontDoor
from .health import DRAINING, READY, HealthServer, ServiceState
from .http_front import HttpFrontDoor
from .oip_front import OipFront
from .ops import ModelRuntime, RexnetResponseOp, ServiceRuntime, build_dag
from .paddle_adapter import start_dag
from .pipeline_front import start_grpc_server
from .request import ClassifyRequest

log = logging.getLogger("rexnet_serve")


class StartupError(RuntimeError):
    """The service could not start; the message says why (printed as one line, exit code 1)."""


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

    def __init__(self, config: ServingConfig, repository: Repository, stop_event: threading.Event,
                 floor: bool = False) -> None:
        self.config = config
        self.floor = floor  # rexnet-bench's framework floor: no model, pass-through stages (floor.py)
        self.repository = repository
        self.stop_event = stop_event
        self.state = ServiceState()
        self.name = config.settings.service_name
        self._health: Optional[HealthServer] = None
        self._grpc: Optional[grpc.Server] = None
        self._http: Optional[HttpFrontDoor] = None
        self._front: Optional[FrontDoor] = None
        self._dag: Any = None  # Paddle Serving's DAGExecutor
        self._runtime: Optional[ServiceRuntime] = None
        self._oip: Optional[OipFront] = None  # Open Inference Protocol (oip_front.py)

    # -- start ------------------------------------------------------------------------------------
    def _load(self) -> ServiceRuntime:
        """Every served version of every model of the repository, each with its predictors."""
        infer, rex = self.config.inference, self.config.settings
        options = infer.model_options(rex.max_batch_images)
        if options["device"] == "gpu":  # preprocessing and nvJPEG decode follow the current device
            import paddle
            paddle.set_device(f"gpu:{options['gpu_id']}")
        limits = rex.decode_limits
        versions = [v for m in self.repository.models.values() for v in m.served_versions()]
        if infer.remote and len(versions) > 1:
            raise StartupError(f"op.infer.client_type brpc in {self.config.source} forwards to one backend "
                               f"model, but the repository serves {len(versions)} model versions")
        models = {}
        for model in self.repository.models.values():
            model_options, settings = self._model_options(model.settings, options)
            for version in model.served_versions():
                classifier = self._classifier(version.path, limits, model_options)
                used = {k: v for k, v in runtime_info(classifier.model).items() if k in ("runtime", "precision")}
                loaded = ModelRuntime.create(model.name, version.version, classifier, infer.concurrency,
                                             model_options["max_batch"], dict(settings, **used))
                models[loaded.key] = loaded
        gate = Admission(rex.max_in_flight_requests, rex.request_timeout_s, rex.max_buffered_request_bytes)
        return ServiceRuntime(models, self.repository.default_model, limits, rex.default_top_k, gate)

    def _model_options(self, settings: ModelSettings, options: dict) -> Tuple[dict, Dict[str, Any]]:
        """load_model options for one model: the service's, overridden by its settings.yaml; and the
        settings it runs with (for the ready line and the v2 model metadata)."""
        renamed = {"runtime": "runtime", "precision": "precision", "max_batch_images": "max_batch",
                   "thread_num": "cpu_threads"}
        merged = dict(options, **{renamed[k]: v for k, v in settings.overrides().items()})
        if settings.source is not None:
            if self.config.inference.remote:
                raise StartupError(f"{settings.source}: per-model inference settings do not apply with "
                                   f"op.infer.client_type brpc in {self.config.source} (the backend runs the model)")
            try:
                check_runtime_options(merged["runtime"], merged["precision"], merged["device"])
            except OptionError as exc:
                raise StartupError(f"{settings.source}: {exc.option}: {exc} (the service runs on the "
                                   f"{merged['device']})") from None
        effective = {key: merged[option] for key, option in renamed.items()}
        if settings.source is not None:
            effective["settings_file"] = str(settings.source)
        return merged, effective

    def _classifier(self, model_dir: Path, limits: DecodeLimits, options: dict) -> Any:
        try:
            if self.floor:
                from .floor import FloorClassifier
                return FloorClassifier(model_dir)
            classifier = Classifier(model_dir, limits=limits, model=self._remote_predictor(model_dir), **options)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise StartupError(f"cannot load the model in {model_dir}: {exc}") from None
        fetch = self.config.inference.fetch_list
        if fetch is not None and list(fetch) != [classifier.manifest.fetch.alias]:
            raise StartupError(f"op.infer.fetch_list {list(fetch)} in {self.config.source} does not match the "
                               f"model in {model_dir}, which fetches [{classifier.manifest.fetch.alias!r}]")
        return classifier

    def _remote_predictor(self, model_dir: Path) -> Optional[RemotePredictor]:
        """With client_type brpc: the predictor that forwards to the backend (no local model is loaded);
        else None (the Classifier loads its InferenceModel)."""
        infer = self.config.inference
        if not infer.remote:
            return None
        try:
            return RemotePredictor(model_dir, list(infer.server_endpoints), infer.client_config,
                                   timeout=self.config.settings.backend_timeout_s,
                                   fetch=None if infer.fetch_list is None else list(infer.fetch_list))
        except (OSError, ValueError, KeyError) as exc:
            raise StartupError(f"cannot set up the bRPC backend client (op.infer in {self.config.source}): "
                               f"{exc}") from None

    def _start_pipeline(self, runtime: ServiceRuntime) -> None:
        try:
            self._dag, conf = start_dag(self.name, lambda request_op: build_dag(runtime, request_op),
                                        lambda last: RexnetResponseOp(runtime, input_ops=last), self.config.paddle())
        except SystemExit as exc:  # Paddle Serving exits on a busy port or a bad config
            raise StartupError(f"Paddle Serving refused to start: {exc}") from None
        self._front = FrontDoor(self._dag, runtime.admission, self.name)
        rex = self.config.settings
        host = rex.host
        try:
            self._grpc = start_grpc_server(self._front, host, self.config.rpc_port, conf["worker_num"], rex)
            self._http = HttpFrontDoor(self._front, host, self.config.http_port, rex)
            self._http.start()
            # Open Inference Protocol (KServe v2): REST and gRPC on the same front door.
            self._oip = OipFront(self._front, runtime, lambda: self.state.ready, host, rex.oip_http_port or None,
                                 rex.oip_grpc_port or None, conf["worker_num"], rex)
        except OSError as exc:
            raise StartupError(str(exc)) from None

    def live_check(self) -> Optional[str]:
        """None while the front doors serve, else what died (the liveness probe's answer)."""
        if self._http is not None and not self._http.alive():
            return "the HTTP front door stopped"
        if self._oip is not None and not self._oip.alive():
            return "the v2 HTTP front door stopped"
        return None

    def _warm_up(self, deadline: float) -> None:
        """One real request through the gRPC endpoint (the whole DAG), then one over HTTP.

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
                    except ClientError as exc:  # a bRPC backend may not be up yet
                        if time.monotonic() > deadline:
                            raise StartupError(f"warm-up failed: {exc}") from None
                        if self.config.inference.remote and not waiting_logged:
                            log.info("waiting for the bRPC backend %s: %s",
                                     ",".join(self.config.inference.server_endpoints), exc)
                            waiting_logged = True
                        time.sleep(0.2)
                        continue
                    if not results[0].ok:
                        raise StartupError(f"warm-up failed: {results[0].error_message}")
                    break
        finally:
            for client in clients:
                client.close()
        self._warm_up_models(image)

    def _warm_up_models(self, image: bytes) -> None:
        """One request through the DAG for every served model but the default (warmed up above), and
        one forward pass of the model's ``max_batch_images`` on every predictor (OpenVINO: on every
        stream at once, through the predictor's ``warm_up``).

        The full-size pass makes the inference engine grow its memory pool (about 0.5 GB for 32 images
        of ReXNet_1_0 with Paddle Inference) now, while the service is not ready, instead of on the first
        large auto-batch: the per-request memory budget is then measured from a steady state.
        """
        for model in self._runtime.models.values():
            if self.stop_event.is_set():
                return
            if model is not self._runtime.default:
                request = ClassifyRequest(images=[image], top_k=1, model=model.name, version=model.version)
                answer = self._front.call(lambda: request)
                if not answer.ok:
                    raise StartupError(f"warm-up of model {model.key} failed: err_no {answer.status}: "
                                       f"{answer.message}")
            if self.floor or self.config.inference.remote:
                continue  # no local inference engine
            size = model.classifier.manifest.input_size
            batch = np.zeros((model.max_batch_images, 3, size, size), np.float32)
            predictors = [model.predictors.get() for _ in range(model.predictors.qsize())]
            try:
                if hasattr(predictors[0], "warm_up"):  # OpenVINO: all its streams at once, shared by clones
                    predictors[0].warm_up(batch)
                else:
                    for predictor in predictors:
                        model.classifier.probabilities(batch, predictor)
            finally:
                for predictor in predictors:
                    model.predictors.put(predictor)

    def served_models(self) -> str:
        """``key (arch[, its settings.yaml's overrides][, default])`` for every served model version."""
        default = self._runtime.default
        described = {name: m.settings.describe() for name, m in self.repository.models.items()}
        return ", ".join(f"{key} ({m.classifier.manifest.arch}"
                         f"{', ' + described[m.name] if described[m.name] else ''}{', default' if m is default else ''})"
                         for key, m in sorted(self._runtime.models.items()))

    def urls(self) -> List[str]:
        host = "127.0.0.1"
        c = self.config
        urls = [f"HTTP     http://{host}:{c.http_port}/{self.name}/prediction",
                f"gRPC     {host}:{c.rpc_port} (PipelineService/inference, name {self.name!r})",
                f"health   http://{host}:{c.metrics_port}/healthz  http://{host}:{c.metrics_port}/readyz",
                f"metrics  http://{host}:{c.metrics_port}/metrics"]
        if c.settings.oip_http_port:
            urls.append(f"v2 REST  http://{host}:{c.settings.oip_http_port}/v2/models/<model>/infer")
        if c.settings.oip_grpc_port:
            urls.append(f"v2 gRPC  {host}:{c.settings.oip_grpc_port} (inference.GRPCInferenceService)")
        if c.inference.remote:
            urls.append(f"backend  bRPC {','.join(c.inference.server_endpoints)} (inference forwarded)")
        return urls

    def run(self) -> int:
        deadline = time.monotonic() + self.config.settings.startup_timeout_s
        try:
            try:
                self._health = HealthServer(self.state, self.config.metrics_port, self.config.settings.host,
                                            self.live_check)
            except OSError as exc:
                raise StartupError(f"cannot listen on metrics port {self.config.metrics_port}: {exc}") from None
            self._health.start()
            check_with_paddle(self.config)
            metrics.set_sizing(self.config.sizing)
            runtime = self._runtime = self._load()
            used = runtime_info(runtime.default.classifier.model)  # runtime really used (issue 10)
            metrics.RUNTIME.info(used)  # rexnet_runtime_info on /metrics (issue 10)
            if not self.stop_event.is_set():
                self._start_pipeline(runtime)
                self._warm_up(deadline)
            if not self.stop_event.is_set():
                self.state.set(READY)
                log.info("ready: %s (%s, %s %s) with %s; from %s: %s\n  %s", self.name, self.config.inference.device,
                         used["runtime"], used["precision"], self.config.sizing.describe(), self.repository.root,
                         self.served_models(), "\n  ".join(self.urls()))
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
        """Readiness off, refuse new requests, let in-flight ones finish (up to drain_timeout_s), stop
        every part."""
        self.state.set(DRAINING)
        timeout = self.config.settings.drain_timeout_s
        give_up_at = time.monotonic() + timeout
        if not quiet:
            log.info("draining: finishing in-flight requests (up to %ss)", timeout)
        if self._front is not None:
            self._front.draining = True  # new requests on open connections: 3001 / HTTP 503
        if self._http is not None:
            self._http.stop_listening()
        oip_grpc_stopped = self._oip.stop_listening(timeout) if self._oip is not None else None
        if self._grpc is not None:
            # New RPCs are refused at once (UNAVAILABLE); running ones get the rest of the budget.
            self._grpc.stop(grace=timeout).wait(timeout + 5)
        if oip_grpc_stopped is not None:
            oip_grpc_stopped.wait(timeout + 5)
        if self._runtime is not None:
            while self._runtime.admission.in_flight and time.monotonic() < give_up_at:
                time.sleep(0.05)  # HTTP requests in flight (gRPC ones were waited for above)
        if self._http is not None:
            self._http.stop()
        if self._oip is not None:
            self._oip.stop()
        if self._dag is not None:
            self._dag.stop()  # op threads end on ChannelStopError
        if self._runtime is not None:
            self._runtime.close()
        if self._health is not None:
            self._health.stop()
        if not quiet:
            log.info("stopped")
        return 0
