"""The remote predictor: a preprocessed batch -> model outputs from a bRPC GeneralModelService backend.

Paddle Serving's remote op (pipeline/operator.py, ``client_type: brpc`` with ``server_endpoints``) hands
each batch to ``paddle_serving_client.Client``, a C++ extension that needs libcrypto.so.10 (absent on
current distributions). This predictor does the same call -- ``load_client_config``, ``connect``,
``predict(feed, fetch, batch=True)`` -- with rexnet_serving.clients.brpc.BrpcClient, which speaks the
same baidu_std GeneralModelService protocol that C++ Serving (``rexnet-brpc cpp``) and the native
endpoint (``rexnet-brpc native``) serve.

It has the interface the Classifier uses of a local InferenceModel: ``run(batch)`` -> float32
[N, class_num] outputs (probabilities when the export's manifest says it ends in a softmax, else logits;
Classifier.probabilities decides), and ``clone()`` for another thread. The model's metadata (labels,
preprocessing, class count, feed/fetch names) comes from the local export the backend serves; its
client config must name the same feed and fetch, which is checked on construction.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..clients.base import ClientError, TransientError
from ..clients.brpc import BrpcClient
from ..integrity import verify_files
from ..manifest import Manifest

PathLike = Union[str, Path]


class RemoteError(ClientError):
    """A batch the bRPC backend did not turn into outputs: what RemotePredictor.run raises, so a caller
    (the Pipeline infer op) catches the backend's failures without knowing the clients' errors."""


class BackendError(RemoteError):
    """The backend answered, but not with what this model's export produces (a config mismatch)."""


class BackendUnavailable(RemoteError, TransientError):
    """The backend is down, unreachable, overloaded or too slow: worth retrying later."""


class RemotePredictor:
    """Model outputs from a bRPC backend serving the export in ``model_dir``.

    ``client_config``: serving_client_conf.prototxt (or its directory); default: the export's own
    serving_client/. ``endpoints``: "host:port" strings, tried in order (the first one that accepts a
    connection is used; a lost connection is reopened by the next call). ``timeout``: the deadline of each
call in seconds, covering connecting, sending the batch and the answer (BrpcClient): a backend that
hangs or stops reading fails the call with BackendUnavailable when it passes, and the connection is
closed, so an infer thread is never stuck longer than this (nor, then, the service's shutdown).
    ``fetch``: the fetch alias to ask for; default and only choice: the manifest's.

    The backend may be down when this is built: every call then fails with BackendUnavailable until
    it is back.
    """

    # rexnet_serving.runtimes.base.runtime_info: the runtime and precision are the backend's, not known here.
    runtime = "remote"
    precision = "backend"
    device = "remote"

    def __init__(self, model_dir: PathLike, endpoints: Sequence[str], client_config: Optional[PathLike] = None,
                 timeout: float = 30.0, fetch: Optional[Sequence[str]] = None,
                 manifest: Optional[Manifest] = None) -> None:
        if not endpoints:
            raise ValueError("a remote predictor needs at least one host:port endpoint")
        self.model_dir = Path(model_dir)
        self.manifest = manifest if manifest is not None else verify_files(model_dir)
        self.endpoints = list(endpoints)
        self.timeout = float(timeout)
        self.client_config = Path(client_config) if client_config is not None \
            else self.manifest.serving_client_dir
        self.fetch = self._check_fetch(fetch)
        self._client = self._open()

    # -- setup ------------------------------------------------------------------------------------
    def _check_fetch(self, fetch: Optional[Sequence[str]]) -> str:
        expected = self.manifest.fetch.alias
        if fetch is not None and list(fetch) != [expected]:
            raise ValueError(f"fetch_list {list(fetch)} does not match the export in {self.model_dir}, "
                             f"which fetches [{expected!r}]")
        return expected

    def _open(self) -> BrpcClient:
        client = BrpcClient(timeout=self.timeout)
        client.load_client_config(self.client_config)  # FileNotFoundError / ValueError when unusable
        feeds, fetches = client.get_feed_names(), client.get_fetch_names()
        if self.manifest.feed.alias not in feeds or self.fetch not in fetches:
            raise ValueError(f"{self.client_config} (feeds {feeds}, fetches {fetches}) is not a client "
                             f"config of the export in {self.model_dir} (feed {self.manifest.feed.alias!r}, "
                             f"fetch {self.fetch!r})")
        try:
            client.connect(self.endpoints)
        except TransientError:
            pass  # connect() kept the endpoints; the first call reports the backend as unavailable
        return client

    def clone(self) -> "RemotePredictor":
        """A predictor with its own connection, for another thread (a slow call holds no one else up)."""
        return RemotePredictor(self.model_dir, self.endpoints, self.client_config, self.timeout,
                               [self.fetch], self.manifest)

    # -- inference --------------------------------------------------------------------------------
    def run(self, batch: Any) -> np.ndarray:
        """Float32 [N, class_num] outputs for an NCHW float32 ``batch`` (NumPy or paddle.Tensor)."""
        # The one place the batch leaves the device: it is sent as float32 bytes.
        array = np.ascontiguousarray(batch.numpy() if hasattr(batch, "numpy") else batch, dtype=np.float32)
        size = self.manifest.input_size
        if array.ndim != 4 or array.shape[1:] != (3, size, size) or len(array) == 0:
            raise ValueError(f"expected a batch of shape [N, 3, {size}, {size}] with N >= 1, "
                             f"got {list(array.shape)}")
        where = ",".join(self.endpoints)
        try:
            outputs = self._client.predict({self.manifest.feed.alias: array}, fetch=[self.fetch], batch=True)
        except TransientError as exc:
            raise BackendUnavailable(f"bRPC backend {where} unavailable: {exc}") from None
        except ClientError as exc:
            raise BackendError(f"bRPC backend {where} failed: {exc}") from None
        out = outputs.get(self.fetch) if isinstance(outputs, dict) else None
        expected = (len(array), self.manifest.class_num)
        if not isinstance(out, np.ndarray) or out.shape != expected:
            got = list(out.shape) if isinstance(out, np.ndarray) else sorted(outputs)
            raise BackendError(f"bRPC backend {where} answered {got} for {self.fetch!r}, expected "
                               f"{list(expected)}: does it serve the export in {self.model_dir}?")
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        self._client.close()
