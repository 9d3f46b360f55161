"""bRPC client: Paddle Serving's GeneralModelService over baidu_std, in Python.

The official ``paddle_serving_client.Client`` is a C++ extension that needs libcrypto.so.10; this one speaks
the same wire protocol (rexnet_serving.brpc.framing) with the same calls -- ``load_client_config``,
``connect``, ``predict(feed, fetch, batch)`` -- plus ``classify`` from the ClassifierClient protocol
(rexnet_serving.clients.base), which sends encoded images in the image feed form of
rexnet_serving.brpc.tensors.

One persistent TCP connection per client carries any number of requests at once: each gets a correlation
id, a reader thread hands every response to the caller waiting for its id, so threads may share a
client. A broken connection fails the calls in flight with TransientError and is reopened by the next call.
``timeout`` is a deadline for the whole call -- connecting, sending and the answer -- and a call whose
deadline passes closes the connection (DeadlineExceeded, a TransientError): a server that stopped
reading can never block a caller past it.
"""
from __future__ import annotations

import itertools
import json
import selectors
import socket
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from google.protobuf.message import DecodeError

from ..brpc import framing
from ..brpc.framing import Errno, Frame, FrameDecoder, FrameError
from ..brpc.tensors import (DEFAULT_TOP_K, IMAGE_FEED, PREDICTIONS_FETCH, TOP_K_FEED, ElemType,
                            GeneralModelConfig, Request, Response, Tensor, from_tensor, load_model_config,
                            to_tensor)
from ..defaults import BRPC_PORT
from ..results import ImageResult
from .base import BadRequestError, ClientError, TransientError


def _split_address(address: str) -> tuple:
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, BRPC_PORT
    try:
        return host.strip("[]") or "127.0.0.1", int(port)
    except ValueError:
        raise ValueError(f"bad address {address!r}: expected host:port") from None


class DeadlineExceeded(TransientError):
    """The call's deadline passed (while connecting, sending or waiting for the answer)."""


class _Connection:
    """One socket, many requests in flight: sends under a lock, a reader thread matches replies by id.

    The socket is non-blocking and every wait has a deadline: connecting, taking the send lock, each
    send (a peer that stops reading fills the TCP buffers, and a blocking sendall would then wait
    forever) and the answer. A deadline that passes closes the connection -- a frame may be half
    sent, and a peer that stopped reading is not worth keeping -- so the calls still on it fail with
    TransientError and the next call opens a new one.
    """

    def __init__(self, address: str, deadline: float, max_body_size: int) -> None:
        self.address = address
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise DeadlineExceeded(f"no time left to connect to {address}")
        self._sock = socket.create_connection(_split_address(address), timeout=timeout)
        self._sock.setblocking(False)  # every wait below goes through a selector with a deadline
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._max_body_size = max_body_size
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: Dict[int, Future] = {}
        self._error: Optional[TransientError] = None
        self._reader = threading.Thread(target=self._read_loop, name=f"brpc-reader-{address}", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self._error is None

    def submit(self, correlation_id: int, data: bytes, deadline: float) -> Future:
        future: Future = Future()
        with self._lock:
            if self._error is not None:
                raise self._error
            self._pending[correlation_id] = future
        if not self._send_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self.forget(correlation_id)  # another caller is stuck sending; this one gives up, nothing sent
            raise DeadlineExceeded(f"bRPC connection to {self.address}: the deadline passed while "
                                   f"waiting to send")
        try:
            self._send(data, deadline)
        except DeadlineExceeded as exc:
            self.abort(exc)
            raise
        except OSError as exc:
            error = TransientError(f"bRPC connection to {self.address} failed while sending: {exc}")
            self.abort(error)
            raise error from None
        finally:
            self._send_lock.release()
        return future

    def _send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_WRITE)
            while view:
                try:
                    view = view[self._sock.send(view):]
                    continue
                except BlockingIOError:
                    pass
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    raise DeadlineExceeded(f"bRPC connection to {self.address}: the deadline passed with "
                                           f"{len(view)} of {len(data)} bytes unsent (is the server "
                                           f"reading?)")

    def forget(self, correlation_id: int) -> None:
        with self._lock:
            self._pending.pop(correlation_id, None)

    def _read_loop(self) -> None:
        decoder = FrameDecoder(self._max_body_size)
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self._sock, selectors.EVENT_READ)
                while True:
                    selector.select()  # woken by data, EOF, or abort()'s shutdown
                    try:
                        data = self._sock.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    if not data:
                        raise ConnectionError("the server closed the connection")
                    for frame in decoder.feed(data):
                        with self._lock:
                            future = self._pending.pop(frame.meta.correlation_id, None)
                        if future is not None:  # None: the caller timed out and left
                            future.set_result(frame)
        except (OSError, ValueError, FrameError) as exc:  # ValueError: the socket was closed under us
            self.abort(TransientError(f"bRPC connection to {self.address} lost: {exc}"))

    def abort(self, error: TransientError) -> None:
        """Fail every call in flight with ``error`` and shut the socket (the reader wakes and ends)."""
        with self._lock:
            if self._error is None:
                self._error = error
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader waiting in select
        except OSError:
            pass

    def close(self) -> None:
        self.abort(TransientError(f"bRPC connection to {self.address} was closed by the client"))
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=5)
        self._sock.close()


class BrpcClient:
    """``paddle_serving_client.Client``-like calls over baidu_std, and ``classify`` for encoded images."""

    def __init__(self, address: Optional[str] = None, timeout: float = 30.0, *,
                 max_body_size: int = framing.DEFAULT_MAX_BODY_SIZE,
                 service_name: str = framing.SERVICE_FULL_NAME) -> None:
        self.timeout = float(timeout)
        self.max_body_size = max_body_size
        self.service_name = service_name
        self._endpoints: List[str] = [address] if address else []
        self._conn: Optional[_Connection] = None
        self._conn_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._config: Optional[GeneralModelConfig] = None

    # -- Paddle Serving Client calls ------------------------------------------------------------------
    def load_client_config(self, path: Union[str, Path]) -> None:
        """Read serving_client_conf.prototxt (or the directory holding it): feed and fetch variables."""
        self._config = load_model_config(path)

    def connect(self, endpoints: Sequence[str]) -> None:
        """Use these "host:port" endpoints, the first reachable one; connects now to fail early."""
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ValueError("connect() needs at least one host:port endpoint")
        for endpoint in endpoints:
            _split_address(endpoint)
        with self._conn_lock:
            self._endpoints = list(endpoints)
            self._drop_connection()
        self._connection()

    def get_feed_names(self) -> List[str]:
        return [var.alias_name for var in self._require_config().feed_var]

    def get_fetch_names(self) -> List[str]:
        return [var.alias_name for var in self._require_config().fetch_var]

    def predict(self, feed: Mapping[str, Any], fetch: Union[str, Sequence[str], None] = None,
                batch: bool = False, log_id: int = 0) -> Dict[str, Any]:
        """Run the model on tensor feeds; ``{fetch alias: ndarray}`` (per engine when several answer).

        As in Paddle Serving's Client, ``batch=False`` adds the batch dimension to each feed, and feed
        names must be feed aliases of the loaded client config.
        """
        config = self._require_config()
        feeds = {var.alias_name: var for var in config.feed_var}
        fetch_types = {var.alias_name: var.fetch_type for var in config.fetch_var}
        fetch_list = [fetch] if isinstance(fetch, str) else list(fetch or [])
        unknown_fetch = [name for name in fetch_list if name not in fetch_types]
        if unknown_fetch:
            raise ValueError(f"unknown fetch variable(s) {unknown_fetch}; the model has {list(fetch_types)}")
        request = Request(log_id=log_id, fetch_var_names=fetch_list)
        for name, value in feed.items():
            if name not in feeds:
                raise ValueError(f"Wrong feed name: {name!r}; the model's feeds are {list(feeds)}")
            array = np.asarray(value)
            if not batch:
                array = array[np.newaxis, ...]
            request.tensor.append(to_tensor(array, alias=name, name=feeds[name].name,
                                            elem_type=feeds[name].feed_type))
        response = self.call(request, log_id=log_id)
        per_engine = {}
        for output in response.outputs:
            result = {}
            for tensor in output.tensor:
                try:
                    result[tensor.alias_name or tensor.name] = from_tensor(tensor)
                except ValueError as exc:
                    raise ClientError(f"bad response from {self._address()}: {exc}") from None
            per_engine[output.engine_name] = result
        if len(per_engine) == 1:
            return next(iter(per_engine.values()))
        return per_engine

    # -- ClassifierClient ----------------------------------------------------------------------------
    def classify(self, images: Sequence[bytes], top_k: int = DEFAULT_TOP_K) -> List[ImageResult]:
        """Send encoded images (JPEG, PNG, ...) in one request; one result per image, in order."""
        if not images:
            return []
        request = Request(fetch_var_names=[PREDICTIONS_FETCH])
        for data in images:
            request.tensor.append(Tensor(alias_name=IMAGE_FEED, name=IMAGE_FEED, elem_type=ElemType.UINT8,
                                         shape=[len(data)], tensor_content=bytes(data)))
        request.tensor.append(to_tensor(np.array([top_k]), alias=TOP_K_FEED, elem_type=ElemType.INT64))
        response = self.call(request)
        documents = None
        for output in response.outputs:
            for tensor in output.tensor:
                if (tensor.alias_name or tensor.name) == PREDICTIONS_FETCH:
                    documents = list(tensor.data)
        if documents is None or len(documents) != len(images):
            raise ClientError(f"bad response from {self._address()}: expected {len(images)} results in "
                              f"{PREDICTIONS_FETCH!r}, got {0 if documents is None else len(documents)}")
        try:
            return [ImageResult.from_dict(json.loads(doc)) for doc in documents]
        except (ValueError, KeyError, TypeError) as exc:
            raise ClientError(f"bad result document from {self._address()}: {exc}") from None

    # -- the RPC itself -------------------------------------------------------------------------------
    def call(self, request: Request, method: str = "inference", log_id: int = 0) -> Response:
        """One GeneralModelService call; raises TransientError / BadRequestError / ClientError."""
        payload = request.SerializeToString()
        correlation_id = next(self._ids)
        meta = framing.request_meta(self.service_name, method, correlation_id, log_id=log_id)
        data = framing.encode_frame(meta, payload)
        if len(data) - framing.HEADER_SIZE > self.max_body_size:
            raise BadRequestError(f"request body of {len(data) - framing.HEADER_SIZE} bytes exceeds "
                                  f"max_body_size={self.max_body_size}")
        deadline = time.monotonic() + self.timeout
        conn = self._connection(deadline)
        future = conn.submit(correlation_id, data, deadline)
        try:
            frame: Frame = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            # A server that does not answer in time is treated as hung: the connection goes, and the
            # calls still on it fail with TransientError (the next call reconnects).
            conn.abort(DeadlineExceeded(f"no response from {conn.address} within {self.timeout:g}s"))
            raise DeadlineExceeded(f"no response from {conn.address} within {self.timeout:g}s") from None
        return self._response(frame)

    def _response(self, frame: Frame) -> Response:
        status = frame.meta.response
        if status.error_code:
            try:
                label = Errno(status.error_code).name
            except ValueError:
                label = str(status.error_code)
            message = f"{self._address()} answered {label} ({status.error_code}): {status.error_text}"
            if status.error_code in framing.TRANSIENT_ERRNOS:
                raise TransientError(message)
            raise BadRequestError(message)
        response = Response()
        try:
            response.ParseFromString(framing.decompress(frame.payload, frame.meta.compress_type,
                                                         self.max_body_size))
        except (DecodeError, ValueError, OSError, EOFError) as exc:
            raise ClientError(f"undecodable response from {self._address()}: {exc}") from None
        if response.err_no:
            raise ClientError(f"{self._address()} failed the request: err_no={response.err_no} "
                              f"{response.err_msg}")
        return response

    def _connection(self, deadline: Optional[float] = None) -> _Connection:
        """The open connection, or a new one to the first endpoint that accepts before ``deadline``."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        if not self._conn_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise DeadlineExceeded(f"the deadline passed while another call connected to "
                                   f"{self._address()}")
        try:
            if self._conn is not None and self._conn.alive:
                return self._conn
            self._drop_connection()
            if not self._endpoints:
                raise ValueError("no endpoint: pass address= or call connect([\"host:port\"]) first")
            errors = []
            for endpoint in self._endpoints:
                try:
                    self._conn = _Connection(endpoint, deadline, self.max_body_size)
                    return self._conn
                except OSError as exc:
                    errors.append(f"{endpoint}: {exc}")
            raise TransientError("cannot connect to bRPC server " + "; ".join(errors))
        finally:
            self._conn_lock.release()

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _require_config(self) -> GeneralModelConfig:
        if self._config is None:
            raise ValueError("call load_client_config(serving_client_conf.prototxt) first")
        return self._config

    def _address(self) -> str:
        return self._conn.address if self._conn is not None else ",".join(self._endpoints)

    def close(self) -> None:
        with self._conn_lock:
            self._drop_connection()

    def __enter__(self) -> "BrpcClient":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
