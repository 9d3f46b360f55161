"""Native bRPC endpoint: Paddle Serving's GeneralModelService over baidu_std, served from Python.

Answers ``baidu.paddle_serving.predictor.general_model.GeneralModelService`` (methods ``inference`` and
``debug``, which C++ Serving runs the same way), so ``paddle_serving_client.Client`` and
rexnet_serving.clients.brpc work unchanged. What a request does is rexnet_serving.brpc.service; this
module is the network side.

Concurrency: one asyncio loop owns every socket and does only framing, so idle or slow connections cost
a coroutine each and several requests per connection run at once, answered by correlation_id in
whatever order they finish. The work (payload parsing, decoding, preprocessing, inference,
serialising) runs in a thread pool of ``workers`` threads: Paddle Inference, OpenCV and protobuf's C++
parser release the GIL, so the pool uses the cores.

Every front-door resource is bounded, and refused at once past its bound (bRPC's own knobs in
parentheses; its defaults leave most of them off):
  * connections: ``max_connections`` open at once; one more is closed as soon as it is accepted
    (bRPC has no such cap; a connection flood would otherwise cost memory and file descriptors);
  * requests in flight on one connection: ``max_requests_per_connection``; one more is answered
    ELIMIT without being read further, written inline so a peer that does not read its answers
    stalls only its own connection (TCP back-pressure) instead of queueing answers in memory;
  * requests queued or running in total: ``max_concurrency`` (-max_concurrency), then ELIMIT;
  * memory: request bodies being read, queued or running take at most ``max_buffered_bytes``
    together; a frame whose body would pass it is read past in small pieces, never kept, and
    answered ELIMIT (connections x body size could otherwise reach many GiB);
  * silence: a connection with nothing in flight that starts no frame for ``idle_timeout`` seconds is
    closed (-idle_timeout_second);
  * slow frames: once a frame's first byte arrived, the rest must follow within ``read_timeout``
    seconds, or the connection is closed (a slow-loris peer holds a slot that long at most);
  * size: ``max_body_size`` per frame (-max_body_size), and compressed payloads inflate to at most as
    much (a zlib or gzip bomb gets EREQUEST after max_body_size bytes of output, never more).

Garbage never reaches a worker: a bad magic, an oversized or inconsistent header, an undecodable RpcMeta,
a frame cut short or stalled closes that connection (as bRPC does); an unknown service or method, an
undecodable payload and a wrong feed get an error response (ENOSERVICE, ENOMETHOD, EREQUEST); a failure
inside the model gets EINTERNAL.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Set, Tuple

from ..defaults import BRPC_PORT
from ..imageio import DecodeLimits
from . import framing
from .framing import Errno, Frame, FrameError
from .service import handle_payload

log = logging.getLogger(__name__)

METHODS = ("inference", "debug")
SERVICE_NAMES = (framing.SERVICE_FULL_NAME, framing.SERVICE_SHORT_NAME)


@dataclass(frozen=True)
class ServerOptions:
    """The endpoint's limits; `rexnet-brpc native --help` documents each as a flag."""

    host: str = "127.0.0.1"
    port: int = BRPC_PORT
    workers: int = 2                 # inference threads, one predictor each
    cpu_threads: int = 1             # Paddle math threads per predictor
    max_concurrency: int = 256       # requests queued or running; more get ELIMIT
    max_body_size: int = framing.DEFAULT_MAX_BODY_SIZE
    max_images: int = DecodeLimits.max_request_images  # encoded images per request
    max_request_pixels: int = DecodeLimits.max_request_pixels  # decoded pixels of one request's images
    max_connections: int = 1024      # open connections; more are closed on accept
    max_buffered_bytes: int = 256 * 1024 * 1024  # request bodies held (being read, queued, running)
    max_requests_per_connection: int = 32  # requests in flight on one connection; more get ELIMIT
    idle_timeout: float = 300.0      # seconds a connection with nothing in flight may stay silent
    read_timeout: float = 30.0       # seconds a started frame may take to arrive in full
    drain_timeout: float = 30.0      # seconds stop() waits for requests in flight

    def __post_init__(self) -> None:
        for name in ("workers", "cpu_threads", "max_concurrency", "max_body_size", "max_images",
                     "max_request_pixels", "max_connections", "max_requests_per_connection"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_buffered_bytes < self.max_body_size:
            raise ValueError(f"max_buffered_bytes must be >= max_body_size ({self.max_body_size}), got "
                             f"{self.max_buffered_bytes}")
        for name in ("idle_timeout", "read_timeout", "drain_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")


class _Share:
    """A request body's share of the server's buffer budget, given back exactly once."""

    def __init__(self, server: "NativeServer", size: int) -> None:
        self.server, self.size = server, size

    def give_back(self, *_: Any) -> None:
        self.server.buffered_bytes -= self.size
        self.size = 0


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
        self.refused_connections = 0  # closed on accept past max_connections (read by tests and logs)
        self.buffered_bytes = 0       # request bodies held now, at most options.max_buffered_bytes
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
        if len(self._connections) >= self.options.max_connections:
            # Refused at once: no coroutine stays behind, and the log stays quiet under a flood.
            self.refused_connections += 1
            writer.transport.abort()
            return
        task = asyncio.current_task()
        self._connections.add(task)
        write_lock = asyncio.Lock()
        requests: Set[asyncio.Task] = set()
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    frame, held = await self._read_frame(reader)
                except framing.IdleTimeout:
                    if requests:
                        continue  # silent while waiting for its answers: not idle
                    log.debug("closing idle bRPC connection from %s", peer)
                    break
                except FrameError as exc:
                    log.warning("closing bRPC connection from %s: %s", peer, exc)
                    break
                if frame is None:
                    break
                refusal = self._refusal(frame, len(requests))
                if refusal is not None or not frame.meta.HasField("request"):
                    self.buffered_bytes -= held  # answered (or dropped) here: its body goes now
                if not frame.meta.HasField("request"):
                    log.warning("closing bRPC connection from %s: a frame without request meta", peer)
                    break
                if refusal is not None:  # answered inline: a peer that does not read stalls only itself
                    await self._answer(frame, writer, write_lock, Errno.ELIMIT, refusal)
                    continue
                share = _Share(self, held)
                request_task = asyncio.ensure_future(self._request(frame, share, writer, write_lock))
                requests.add(request_task)
                request_task.add_done_callback(requests.discard)
                request_task.add_done_callback(share.give_back)  # also when cancelled before it started
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

    async def _read_frame(self, reader: asyncio.StreamReader) -> Tuple[Optional[Frame], int]:
        """The next frame and the bytes of the buffer budget its body holds (0 when skipped)."""
        held = 0

        def admit(size: int) -> bool:
            nonlocal held
            if self.buffered_bytes + size > self.options.max_buffered_bytes:
                return False
            self.buffered_bytes += size
            held = size
            return True

        try:
            frame = await framing.read_frame(reader, self.options.max_body_size,
                                              body_timeout=self.options.read_timeout,
                                              idle_timeout=self.options.idle_timeout, admit=admit)
        except BaseException:  # cut short, timed out or cancelled: the body is not held any more
            self.buffered_bytes -= held
            raise
        if frame is None:
            self.buffered_bytes -= held
            held = 0
        return frame, held

    def _refusal(self, frame: Frame, in_flight: int) -> Optional[str]:
        """Why a frame is refused at once with ELIMIT, or None to run it."""
        if frame.skipped:
            return f"Reached max_buffered_bytes={self.options.max_buffered_bytes}"
        if in_flight >= self.options.max_requests_per_connection:
            return f"Reached max_requests_per_connection={self.options.max_requests_per_connection}"
        return None

    async def _request(self, frame: Frame, share: "_Share", writer: asyncio.StreamWriter,
                       write_lock: asyncio.Lock) -> None:
        try:
            code, text, payload = await self._dispatch(frame)
        finally:
            share.give_back()  # the worker is done with the body
        await self._answer(frame, writer, write_lock, code, text, payload)

    async def _answer(self, frame: Frame, writer: asyncio.StreamWriter, write_lock: asyncio.Lock, code: int,
                      text: str = "", payload: bytes = b"") -> None:
        meta = frame.meta.request
        data = framing.encode_frame(framing.response_meta(frame.meta.correlation_id, code, text), payload)
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
        if not framing.attachment_fits(frame):
            return (Errno.EREQUEST, f"attachment_size={frame.meta.attachment_size} is larger than "
                                    f"request_size={len(frame.payload)}", b"")
        if self._stopping.is_set():
            return Errno.ELOGOFF, "Server is stopping", b""
        if self._in_flight >= self.options.max_concurrency:
            return Errno.ELIMIT, f"Reached server's max_concurrency={self.options.max_concurrency}", b""
        self._in_flight += 1
        try:
            return await self._loop.run_in_executor(self._executor, handle_payload, self.service,
                                                    meta.method_name, frame, self.options.max_body_size)
        finally:
            self._in_flight -= 1
