"""GeneralModelService.inference as plain functions: a Request in, a Response (or a bRPC error) out.

What the native bRPC endpoint (rexnet_serving.brpc.server) runs in its worker threads, kept apart from
the networking so it is tested and read on its own. Answers ``baidu.paddle_serving.predictor.
general_model.GeneralModelService`` with the messages of Paddle Serving 0.9.0's
general_model_service.proto. The two feed forms (tensor feeds; encoded images with top-k back as JSON)
are described in rexnet_serving.brpc.tensors. The predictor is the service's own:
rexnet_serving.classifier.Classifier (decode -> preprocess -> Paddle Inference -> top-k), with one
predictor clone per worker thread (rexnet_serving.runtimes.load_model: OpenVINO or Paddle Inference).
Error codes are bRPC's (src/brpc/errno.proto).
"""
from __future__ import annotations

import json
import logging
import threading
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
from google.protobuf.message import DecodeError

from ..imageio import DecodeLimits, RequestTooLargeError
from . import framing
from .framing import Errno, Frame
from .tensors import (DEFAULT_TOP_K, ENGINE_NAME, IMAGE_FEED, PREDICTIONS_FETCH, TOP_K_FEED, ElemType,
                      GeneralModelConfig, Request, Response, Tensor, TooManyFields, check_wire_fields, from_tensor,
                      load_model_config, to_tensor)

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """The request is wrong (answered with EREQUEST and this message)."""


class ModelService:
    """GeneralModelService.inference as a plain function: Request -> Response, RequestError if wrong.

    Thread-safe: each calling thread gets its own predictor clone on first use. ``runtime``,
    ``precision`` and ``streams`` (OpenVINO's parallel infer requests: the worker count) go to
    rexnet_serving.runtimes.load_model.
    """

    def __init__(self, model_dir: Union[str, Path], cpu_threads: int = 1,
                 max_images: int = DecodeLimits.max_request_images,
                 device: str = "cpu", gpu_id: int = 0,
                 max_request_pixels: int = DecodeLimits.max_request_pixels, runtime: Optional[str] = None,
                 precision: str = "fp32", streams: int = 1) -> None:
        from ..classifier import Classifier
        from ..runtimes import load_model

        model = load_model(model_dir, runtime=runtime, precision=precision, device=device, gpu_id=gpu_id,
                           cpu_threads=cpu_threads, max_batch=max_images, streams=streams)
        limits = DecodeLimits(max_request_pixels=max_request_pixels, max_request_images=max_images)
        self.classifier = Classifier(model_dir, limits=limits, model=model)
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
            elif tensor.elem_type in (ElemType.UINT8, ElemType.STRING):
                count = 1 if tensor.elem_type == ElemType.UINT8 else len(tensor.data)
                if len(payloads) + count > self.max_images:  # counted before any string is copied out
                    raise RequestError(f"{len(payloads) + count} images in one request; the limit is {self.max_images}")
                if tensor.elem_type == ElemType.UINT8:
                    payloads.append(bytes(tensor.tensor_content))
                else:
                    payloads.extend(tensor.data)  # base64 text, one image per entry
            else:
                raise RequestError(f"feed {IMAGE_FEED!r}: elem_type {tensor.elem_type}; send the encoded file "
                                   f"as uint8 ({int(ElemType.UINT8)}) in tensor_content or as base64 "
                                   f"strings ({int(ElemType.STRING)}) in data")
        if not payloads:
            raise RequestError(f"the {IMAGE_FEED!r} feed holds no image")
        fetch = list(request.fetch_var_names)
        if fetch and fetch != [PREDICTIONS_FETCH]:
            raise RequestError(f"an image request fetches {PREDICTIONS_FETCH!r}, not {fetch}")
        clf = self.classifier
        try:
            images, errors = clf.decode(payloads)
        except RequestTooLargeError as exc:
            raise RequestError(f"{exc.code}: {exc}") from None
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


def handle_payload(service: Any, method: str, frame: Frame,
                   max_size: int = framing.DEFAULT_MAX_BODY_SIZE) -> Tuple[int, str, bytes]:
    """(error_code, error_text, response payload) for one request frame; runs in a worker thread.

    A compressed payload is inflated to at most ``max_size`` bytes (the body limit): past it, EREQUEST.
    """
    try:
        payload = framing.decompress(frame.payload, frame.meta.compress_type, max_size)
    except framing.PayloadTooLarge as exc:
        return Errno.EREQUEST, str(exc), b""
    except (ValueError, OSError, EOFError, zlib.error) as exc:  # unknown codec or corrupt data
        return Errno.EREQUEST, f"undecodable payload (compress_type={frame.meta.compress_type}): {exc}", b""
    request = Request()
    try:
        check_wire_fields(payload)  # what parsing will allocate, from the bytes (rexnet_serving.brpc.tensors)
        request.ParseFromString(payload)
    except TooManyFields as exc:
        return Errno.EREQUEST, f"request refused before parsing ({len(payload)} bytes): {exc}", b""
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
