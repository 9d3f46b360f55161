"""Native bRPC endpoint: Paddle Serving's GeneralModelService over baidu_std, served from Python.

Answers ``baidu.paddle_serving.predictor.general_model.GeneralModelService`` (methods ``inference`` and
``debug``, which C++ Serving runs the same way) with the messages of Paddle Serving 0.9.0's
general_model_service.proto, so ``paddle_serving_client.Client`` and rexnet_serving.clients.brpc work
unchanged. The two feed forms (tensor feeds; encoded images with top-k back as JSON) are described in
rexnet_serving.brpc.tensors. The predictor is the service's own: rexnet_serving.classifier.Classifier
(decode -> preprocess -> inference -> top-k) on a predictor from rexnet_serving.inference.load_model
(OpenVINO or Paddle Inference), with one clone per worker thread.

Concurrency: one asyncio loop owns every socket and does only framing, so thousands of idle or slow
connections cost a coroutine each and several requests per connection run at once, answered by
correlation_id in whatever order they finish. The work (payload parsing, decoding, preprocessing,
inference, serialising) runs in a thread pool of ``workers`` threads: Paddle Inference, OpenCV and
protobuf's C++ parser release the GIL, so the pool uses the cores. Admission is bounded
(``max_concurrency`` requests queued or running); beyond it a request is refused with ELIMIT at once.

Garbage never reaches a worker: a bad magic, an oversized or inconsistent header, an undecodable RpcMeta,
a frame cut short or a frame that stalls for ``read_timeout`` seconds closes that connection (as bRPC
does); an unknown service or method, an undecodable payload and a wrong feed get an error response
(ENOSERVICE, ENOMETHOD, EREQUEST); a failure inside the model gets EINTERNAL. Error codes are bRPC's
(src/brpc/errno.proto).
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import numpy as np
from google.protobuf.message import DecodeError

from ..defaults import BRPC_PORT
from . import protocol
from .protocol import Errno, Frame, FrameError
from .tensors import (DEFAULT_TOP_K, ENGINE_NAME, IMAGE_FEED, PREDICTIONS_FETCH, TOP_K_FEED, ElemType,
                      GeneralModelConfig, Request, Response, Tensor, from_tensor, load_model_config,
                      to_tensor)

log = logging.getLogger(__name__)

METHODS = ("inference", "debug")
SERVICE_NAMES = (protocol.SERVICE_FULL_NAME, protocol.SERVICE_SHORT_NAME)


class RequestError(ValueError):
    """The request is wrong (answered with EREQUEST and this message)."""


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = BRPC_PORT
    workers: int = 2                 # inference threads, one predictor each
    cpu_threads: int = 1             # math threads per predictor
    max_concurrency: int = 256       # requests queued or running; more get ELIMIT
    max_body_size: int = protocol.DEFAULT_MAX_BODY_SIZE
    max_images: int = 64             # encoded images per request
    read_timeout: float = 30.0       # seconds a started frame may take to arrive in full
    drain_timeout: float = 30.0      # seconds stop() waits for requests in flight

    def __post_init__(self) -> None:
        for name in ("workers", "cpu_threads", "max_concurrency", "max_body_size", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")


class ModelService:
    """GeneralModelService.inference as a plain function: Request -> Response, RequestError if wrong.

    Thread-safe: each calling thread gets its own predictor clone on first use. ``runtime``,
    ``precision`` and ``streams`` (OpenVINO's parallel infer requests: the worker count) go to
    rexnet_serving.inference.load_model.
    """

    def __init__(self, model_dir: Union[str, Path], cpu_threads: int = 1, max_images: int = 64,
                 device: str = "cpu", gpu_id: int = 0, runtime: str = "paddle", precision: str = "fp32",
                 streams: int = 1) -> None:
        from ..classifier import Classifier
        from ..inference import load_model

        model = load_model(model_dir, runtime=runtime, precision=precision, device=device, gpu_id=gpu_id,
                           cpu_threads=cpu_threads, max_batch=max_images, streams=streams)
        self.classifier = Classifier(model_dir, model=model)
        manifest = self.classifier.manifest
        self.config: GeneralModelConfig = load_model_config(manifest.serving_server_dir)
        self.feeds = {var.alias_name: var for var in self.config.feed_var}
        self.fetches = {var.alias_name: var for var in self.config.fetch_var}
        self.max_images = max_images
        self._local = threading.local()
        self._base = model

    def _model(self) -> Any:
        model = getattr(self._local, "model", None)
        if model is None:
            model = self._local.model = self._base.clone()
        return model

    def __call__(self, request: Request) -> Response:
        if not request.tensor:
            raise RequestError("the request has no feed tensor")
        names = [tensor.alias_name or tensor.name for tensor in request.tensor]
        if IMAGE_FEED in names and IMAGE_FEED not in self.feeds:
            return self._classify(request, names)
        return self._predict(request, names)

    # -- tensor feeds: the model's own inputs and outputs -------------------------------------------
    def _predict(self, request: Request, names: List[str]) -> Response:
        fetch_names = list(request.fetch_var_names) or list(self.fetches)
        unknown = [name for name in fetch_names if name not in self.fetches]
        if unknown:
            raise RequestError(f"unknown fetch variable(s) {unknown}; this model fetches {list(self.fetches)}")
        arrays: Dict[str, np.ndarray] = {}
        for name, tensor in zip(names, request.tensor):
            var = self.feeds.get(name)
            if var is None:
                raise RequestError(f"unknown feed {name!r}; this model's feeds are {list(self.feeds)} "
                                   f"(or {IMAGE_FEED!r} for encoded images)")
            if name in arrays:
                raise RequestError(f"feed {name!r} appears twice")
            if tensor.elem_type != var.feed_type:
                raise RequestError(f"feed {name!r}: elem_type {tensor.elem_type}, the model takes "
                                   f"{var.feed_type} ({ElemType(var.feed_type).name.lower()})")
            try:
                array = from_tensor(tensor)
            except ValueError as exc:
                raise RequestError(str(exc)) from None
            expected = tuple(int(d) for d in var.shape)
            if array.ndim != len(expected) + 1 or array.shape[1:] != expected or array.shape[0] == 0:
                raise RequestError(f"feed {name!r}: shape {list(array.shape)} does not match "
                                   f"[N, {', '.join(map(str, expected))}] with N >= 1")
            arrays[name] = array
        missing = [name for name in self.feeds if name not in arrays]
        if missing:
            raise RequestError(f"missing feed(s) {missing}")
        (array,) = arrays.values()  # a ReXNet export has exactly one feed (its manifest says which)
        model = self._model()
        step = model.max_batch
        outputs = np.concatenate([model.run(array[i:i + step]) for i in range(0, len(array), step)])
        response = Response(log_id=request.log_id)
        output = response.outputs.add(engine_name=ENGINE_NAME)
        for name in fetch_names:
            var = self.fetches[name]
            output.tensor.append(to_tensor(outputs, alias=name, name=var.name, elem_type=var.fetch_type))
        return response

    # -- encoded images: the service's decoding, preprocessing and top-k ---------------------------
    def _classify(self, request: Request, names: List[str]) -> Response:
        payloads: List[Union[bytes, str]] = []
        top_k = DEFAULT_TOP_K
        for name, tensor in zip(names, request.tensor):
            if name == TOP_K_FEED:
                top_k = self._top_k(tensor)
            elif name != IMAGE_FEED:
                raise RequestError(f"unexpected feed {name!r} beside {IMAGE_FEED!r}; an image request "
                                   f"has only {IMAGE_FEED!r} tensors and an optional {TOP_K_FEED!r}")
            elif tensor.elem_type == ElemType.UINT8:
                payloads.append(bytes(tensor.tensor_content))
            elif tensor.elem_type == ElemType.STRING:
                payloads.extend(tensor.data)  # base64 text, one image per entry
            else:
                raise RequestError(f"feed {IMAGE_FEED!r}: elem_type {tensor.elem_type}; send the encoded file "
                                   f"as uint8 ({int(ElemType.UINT8)}) in tensor_content or as base64 "
                                   f"strings ({int(ElemType.STRING)}) in data")
        if not payloads:
            raise RequestError(f"the {IMAGE_FEED!r} feed holds no image")
        if len(payloads) > self.max_images:
            raise RequestError(f"{len(payloads)} images in one request; the limit is {self.max_images}")
        fetch = list(request.fetch_var_names)
        if fetch and fetch != [PREDICTIONS_FETCH]:
            raise RequestError(f"an image request fetches {PREDICTIONS_FETCH!r}, not {fetch}")
        clf = self.classifier
        images, errors = clf.decode(payloads)
        probs = clf.probabilities(clf.preprocess(images), model=self._model()) if images \
            else clf.probabilities([])
        results = clf.results(len(payloads), probs, errors, top_k)
        response = Response(log_id=request.log_id)
        output = response.outputs.add(engine_name=ENGINE_NAME)
        output.tensor.append(Tensor(alias_name=PREDICTIONS_FETCH, name=PREDICTIONS_FETCH,
                                    elem_type=ElemType.STRING, shape=[len(results)],
                                    data=[json.dumps(r.to_dict(), ensure_ascii=False) for r in results]))
        return response

    def _top_k(self, tensor: Tensor) -> int:
        if tensor.elem_type not in (ElemType.INT64, ElemType.INT32):
            raise RequestError(f"feed {TOP_K_FEED!r}: must be int64 or int32, not elem_type {tensor.elem_type}")
        try:
            values = from_tensor(tensor)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        if values.size != 1:
            raise RequestError(f"feed {TOP_K_FEED!r}: one value expected, got {values.size}")
        k = int(values.ravel()[0])
        if not 1 <= k <= self.classifier.class_num:
            raise RequestError(f"top_k must be 1..{self.classifier.class_num}, got {k}")
        return k


def handle_payload(service: Any, method: str, frame: Frame) -> Tuple[int, str, bytes]:
    """(error_code, error_text, response payload) for one request frame; runs in a worker thread."""
    try:
        payload = protocol.decompress(frame.payload, frame.meta.compress_type)
    except (ValueError, OSError, EOFError, zlib.error) as exc:  # unknown codec or corrupt data
        return Errno.EREQUEST, f"undecodable payload (compress_type={frame.meta.compress_type}): {exc}", b""
    request = Request()
    try:
        request.ParseFromString(payload)
    except DecodeError as exc:
        return Errno.EREQUEST, f"fail to parse request message ({len(payload)} bytes): {exc}", b""
    try:
        response = service(request)
    except RequestError as exc:
        return Errno.EREQUEST, str(exc), b""
    except Exception as exc:  # noqa: BLE001 - a model failure must become an answer, not a dead worker
        log.exception("inference failed (method %s, log_id %s)", method, request.log_id)
        return Errno.EINTERNAL, f"internal error: {type(exc).__name__}: {exc}", b""
    return 0, "", response.SerializeToString()


class NativeServer:
    """The asyncio baidu_std server. ``start()`` serves from a background thread; ``serve_forever()``
    serves in the calling thread until ``stop()`` (or a signal handler calling it)."""

    def __init__(self, service: Any, options: ServerOptions = ServerOptions()) -> None:
        self.service = service
        self.options = options
        self._executor = ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="brpc-worker")
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server: Optional[asyncio.AbstractServer] = None
        self._thread: Optional[threading.Thread] = None
        self._started = threading.Event()
        self._start_error: Optional[BaseException] = None
        self._stopping: Optional[asyncio.Event] = None
        self._in_flight = 0
        self._connections: Set[asyncio.Task] = set()
        self.port: Optional[int] = None

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self) -> int:
        """Bind and serve from a background thread; returns the bound port (useful with port=0)."""
        self._thread = threading.Thread(target=self._serve_quietly, name="brpc-server", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error
        return self.port

    def _serve_quietly(self) -> None:
        try:
            self.serve_forever()
        except OSError:
            pass  # start() raises it in the caller's thread

    def serve_forever(self, handle_signals: bool = False) -> None:
        """Serve until stop(); with ``handle_signals`` (main thread only) SIGINT/SIGTERM drain and stop.

        OSError when the address cannot be bound.
        """
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(handle_signals))
        finally:
            loop.close()
            self._executor.shutdown(wait=True)
        if self._start_error is not None:
            raise self._start_error

    async def _serve(self, handle_signals: bool = False) -> None:
        self._stopping = asyncio.Event()
        try:
            self._server = await asyncio.start_server(self._connection, self.options.host, self.options.port,
                                                      limit=1 << 20)
        except OSError as exc:
            self._start_error = OSError(f"cannot listen on {self.options.host}:{self.options.port}: "
                                        f"{exc.strerror or exc}")
            self._started.set()
            return
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self._stopping.set)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("bRPC GeneralModelService listening on %s:%d", self.options.host, self.port)
        self._started.set()
        await self._stopping.wait()
        log.info("bRPC server stopping: draining %d request(s) in flight", self._in_flight)
        # Drain: no new connections, requests in flight may finish, then every connection closes.
        self._server.close()
        await self._server.wait_closed()
        deadline = self._loop.time() + self.options.drain_timeout
        while self._in_flight and self._loop.time() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to drain_timeout), close everything."""
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:  # the loop closed in between
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.options.drain_timeout + 10)

    # -- one connection -----------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        write_lock = asyncio.Lock()
        requests: Set[asyncio.Task] = set()
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    frame = await protocol.read_frame(reader, self.options.max_body_size,
                                                      body_timeout=self.options.read_timeout)
                except FrameError as exc:
                    log.warning("closing bRPC connection from %s: %s", peer, exc)
                    break
                if frame is None:
                    break
                if not frame.meta.HasField("request"):
                    log.warning("closing bRPC connection from %s: a frame without request meta", peer)
                    break
                request_task = asyncio.ensure_future(self._request(frame, writer, write_lock))
                requests.add(request_task)
                request_task.add_done_callback(requests.discard)
            # The peer may half-close after its last request: answer what is in flight before closing.
            if requests:
                await asyncio.gather(*requests, return_exceptions=True)
        except (ConnectionError, OSError) as exc:
            log.debug("bRPC connection from %s failed: %s", peer, exc)
        finally:
            for request_task in requests:
                request_task.cancel()
            writer.close()
            self._connections.discard(task)

    async def _request(self, frame: Frame, writer: asyncio.StreamWriter, write_lock: asyncio.Lock) -> None:
        meta = frame.meta.request
        code, text, payload = await self._dispatch(frame)
        data = protocol.encode_frame(protocol.response_meta(frame.meta.correlation_id, code, text), payload)
        if code:
            log.info("bRPC %s/%s log_id=%s -> %s: %s", meta.service_name, meta.method_name, meta.log_id,
                     Errno(code).name, text)
        try:
            async with write_lock:  # one frame at a time on the socket; drain() must not run concurrently
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the client left; nothing to answer

    async def _dispatch(self, frame: Frame) -> Tuple[int, str, bytes]:
        meta = frame.meta.request
        if meta.service_name not in SERVICE_NAMES:
            return Errno.ENOSERVICE, f"Fail to find service={meta.service_name}", b""
        if meta.method_name not in METHODS:
            return Errno.ENOMETHOD, f"Fail to find method={meta.service_name}/{meta.method_name}", b""
        if not protocol.attachment_fits(frame):
            return (Errno.EREQUEST, f"attachment_size={frame.meta.attachment_size} is larger than "
                                    f"request_size={len(frame.payload)}", b"")
        if self._stopping.is_set():
            return Errno.ELOGOFF, "Server is stopping", b""
        if self._in_flight >= self.options.max_concurrency:
            return Errno.ELIMIT, f"Reached server's max_concurrency={self.options.max_concurrency}", b""
        self._in_flight += 1
        try:
            return await self._loop.run_in_executor(self._executor, handle_payload, self.service,
                                                    meta.method_name, frame)
        finally:
            self._in_flight -= 1
