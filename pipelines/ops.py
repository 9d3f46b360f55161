"""The service DAG on Paddle Serving's Pipeline: request -> decode -> preprocess -> infer -> postprocess.

Each Op is a thin adapter: Paddle Serving's hook tuples (``(data, is_skip, err_no, err_msg)`` from
``preprocess``, ``(data, err_no, err_msg)`` from ``process``) stay here; the work is done by the stage
functions of rexnet_serving.classifier, which are tested without a server.

How Paddle Serving runs them (operator.py, thread mode): an op's ``preprocess`` hook runs once per
request, ``process`` once per auto-batch (``batch_size`` requests collected for at most
``auto_batching_timeout`` ms, their dict values merged with ``np.append``), ``postprocess`` once per
request again. Only the infer op does work in ``process``, so only it batches across requests.
Thread ops hand Python objects to each other by reference (ThreadChannel with one consumer), so decoded
images and the preprocessed batch stay where they are (on the GPU when serving on one). With
``client_type: brpc`` the infer op's predictor is rexnet_serving.remote.RemotePredictor: the batch is
copied to the host and forwarded to the bRPC backend, and a backend failure fails the auto-batch's
requests with BACKEND_ERROR (retryable: clients raise TransientError) while the service stays up.
"""
from __future__ import annotations

import rexnet_serving.imageio  # noqa: F401  (first: binds zlib before Paddle does; see that module)

import queue
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from paddle_serving_server.pipeline import Op, RequestOp, ResponseOp
from paddle_serving_server.pipeline.channel import ChannelDataType
from paddle_serving_server.pipeline.error_catch import CustomExceptionCode

from rexnet_serving.classifier import Classifier
from rexnet_serving.clients.base import ClientError
from rexnet_serving.imageio import DecodeLimits, RequestTooLargeError

from . import metrics, protocol

# Keys of the dicts the ops pass along (never on the wire).
PAYLOADS, TOP_K, COUNT, IMAGES, ERRORS, BATCH, PROBS = (
    "payloads", "top_k", "count", "images", "errors", "batch", "probs")
_FEED = "x"           # the infer op's feed: an object array of per-image [3, S, S] tensors
_FAILED = "_failed"   # set by the postprocess op when no image of the request could be classified
# err_no of requests whose forward pass failed in the bRPC backend (down, timed out, mismatched): Paddle
# Serving's code for a failed inference client, 9000. Not in protocol.BAD_REQUEST_ERRNOS: retryable.
BACKEND_ERROR = CustomExceptionCode.CLIENT_ERROR.value


@dataclass
class ServiceRuntime:
    """What the ops share: the loaded classifier, one predictor per infer thread, and the limits."""

    classifier: Classifier
    limits: DecodeLimits
    max_images: int
    default_top_k: int
    max_batch_images: int
    predictors: "queue.Queue[Any]"

    @classmethod
    def create(cls, classifier: Classifier, predictor_count: int, limits: DecodeLimits, max_images: int,
               default_top_k: int, max_batch_images: int) -> "ServiceRuntime":
        predictors: "queue.Queue[Any]" = queue.Queue()
        predictors.put(classifier.model)
        for _ in range(predictor_count - 1):  # Paddle predictors are not thread-safe: one per thread
            predictors.put(classifier.model.clone())
        return cls(classifier, limits, max_images, default_top_k, max_batch_images, predictors)

    def close(self) -> None:
        """Close what the predictors hold open (a remote predictor's connection)."""
        while True:
            try:
                predictor = self.predictors.get_nowait()
            except queue.Empty:
                return
            close = getattr(predictor, "close", None)
            if close is not None:
                close()


class RexnetRequestOp(RequestOp):
    """Request -> {field: text or bytes}. Bytes tensors (elem_type 13) are taken as the encoded image.

    The stock RequestOp passes byte_data to ``np.load(allow_pickle=True)``, which unpickles whatever a
    client sends (code execution); here those bytes are never interpreted, only decoded as an image.
    """

    def unpack_request_package(self, request: Any) -> Tuple[Dict[str, Any], int, Optional[int], str]:
        fields: Dict[str, Any] = {}

        def put(name: str, value: Any) -> Optional[str]:
            if name in fields:
                return f"key {name!r} appears more than once"
            fields[name] = value
            return None

        if len(request.key) != len(request.value):
            return {}, request.logid, protocol.INVALID_REQUEST, (
                f"invalid_request: {len(request.key)} keys but {len(request.value)} values")
        problems = [put(k, v) for k, v in zip(request.key, request.value)]
        for tensor in request.tensors:
            if tensor.elem_type == protocol.BYTES_ELEM_TYPE:
                problems.append(put(tensor.name, tensor.byte_data))
            elif tensor.elem_type == protocol.STRING_ELEM_TYPE:
                problems.append(put(tensor.name, "".join(tensor.str_data)))
            else:
                problems.append(f"tensor {tensor.name!r} has elem_type {tensor.elem_type}; send images "
                                f"as bytes (elem_type {protocol.BYTES_ELEM_TYPE}) or base64 values")
        problems = [p for p in problems if p]
        if problems:
            return {}, request.logid, protocol.INVALID_REQUEST, f"invalid_request: {problems[0]}"
        return fields, request.logid, None, ""


class DecodeOp(Op):
    """Check the request's keys and decode each image (a bad image becomes that image's error)."""

    def __init__(self, runtime: ServiceRuntime, input_ops: List[Op]) -> None:
        super().__init__(name="decode", input_ops=input_ops)
        self.runtime = runtime

    def preprocess(self, input_dicts: Dict[str, Any], data_id: int = 0, log_id: int = 0) -> Tuple:
        (fields,) = input_dicts.values()
        rt = self.runtime
        try:
            payloads, top_k = protocol.parse_fields(fields, rt.max_images, rt.classifier.class_num, rt.default_top_k)
        except protocol.RequestError as exc:
            return None, True, protocol.INVALID_REQUEST, f"{exc.code}: {exc.message}"
        with metrics.STAGE_SECONDS.labels("decode").time():
            try:
                images, errors = rt.classifier.decode(payloads)
            except RequestTooLargeError as exc:  # the images together are over the per-request budget
                return None, True, protocol.REQUEST_TOO_LARGE, f"{exc.code}: {exc}"
        return {COUNT: len(payloads), TOP_K: top_k, IMAGES: images, ERRORS: errors}, True, None, ""


class PreprocessOp(Op):
    """The eval preprocessing of every decoded image of a request, as one [N, 3, S, S] tensor."""

    def __init__(self, runtime: ServiceRuntime, input_ops: List[Op]) -> None:
        super().__init__(name="preprocess", input_ops=input_ops)
        self.runtime = runtime

    def preprocess(self, input_dicts: Dict[str, Any], data_id: int = 0, log_id: int = 0) -> Tuple:
        (data,) = input_dicts.values()
        images = data.pop(IMAGES)
        batch = None
        if images:
            with metrics.STAGE_SECONDS.labels("preprocess").time():
                batch = self.runtime.classifier.preprocess(images)
        return dict(data, **{BATCH: batch}), True, None, ""


class InferOp(Op):
    """One forward pass per auto-batch: the images of every request Paddle Serving merged."""

    def __init__(self, runtime: ServiceRuntime, input_ops: List[Op]) -> None:
        super().__init__(name="infer", input_ops=input_ops)
        self.runtime = runtime

    def init_from_dict(self, conf: Dict[str, Any]) -> None:
        super().init_from_dict(conf)
        # Paddle Serving skips `process` for an op without its own model_config; ours brings its model.
        self.with_serving = True

    def init_client(self, client_config: Any, server_endpoints: Any) -> Any:
        return self.runtime.predictors  # loaded before the DAG starts (a load error exits cleanly)

    def preprocess(self, input_dicts: Dict[str, Any], data_id: int = 0, log_id: int = 0) -> Tuple:
        (data,) = input_dicts.values()
        batch = data[BATCH]
        # Paddle Serving merges a batch's feeds with np.append and splits the outputs by each feed's
        # length: an object array of per-image tensors merges without copying them off the device.
        feed = np.empty(0 if batch is None else len(batch), dtype=object)
        for i in range(len(feed)):
            feed[i] = batch[i]
        return {_FEED: feed}, False, None, ""

    def process(self, feed_batch: List[Dict[str, Any]], typical_logid: int = 0) -> Tuple:
        import paddle
        images = list(feed_batch[0][_FEED])
        metrics.BATCH_IMAGES.observe(len(images))
        classifier, step = self.runtime.classifier, self.runtime.max_batch_images
        predictor = self.runtime.predictors.get()
        try:
            with metrics.STAGE_SECONDS.labels("infer").time():
                parts = [classifier.probabilities(paddle.stack(images[i:i + step]), predictor)
                         for i in range(0, len(images), step)]
        except ClientError as exc:  # only a remote predictor raises these: the backend failed
            return {}, BACKEND_ERROR, str(exc)
        finally:
            self.runtime.predictors.put(predictor)
        probs = np.concatenate(parts) if parts else classifier.probabilities([])
        return {PROBS: probs}, 0, ""

    def postprocess(self, input_data: Dict[str, Any], fetch_data: Dict[str, Any], data_id: int = 0,
                    log_id: int = 0) -> Tuple:
        (data,) = input_data.values()
        out = {k: v for k, v in data.items() if k != BATCH}  # let the device batch go
        out[PROBS] = fetch_data[PROBS]
        return out, None, ""


class PostprocessOp(Op):
    """Top-k classes with label names per image, errors slotted back in order, as JSON text."""

    def __init__(self, runtime: ServiceRuntime, input_ops: List[Op]) -> None:
        super().__init__(name="postprocess", input_ops=input_ops)
        self.runtime = runtime

    def preprocess(self, input_dicts: Dict[str, Any], data_id: int = 0, log_id: int = 0) -> Tuple:
        (data,) = input_dicts.values()
        with metrics.STAGE_SECONDS.labels("postprocess").time():
            results = self.runtime.classifier.results(data[COUNT], data[PROBS], data[ERRORS], data[TOP_K])
        for result in results:
            metrics.IMAGES.labels(result.error_code or "ok").inc()
        out = {protocol.RESULTS_KEY: protocol.encode_results(results)}
        if not any(r.ok for r in results):
            out[_FAILED] = "; ".join(f"image {i}: {r.error_code}: {r.error_message}"
                                     for i, r in enumerate(results))
        return out, True, None, ""


class RexnetResponseOp(ResponseOp):
    """The response; when no image could be classified, err_no says so while results still name why."""

    def pack_response_package(self, channeldata: Any) -> Any:
        failed = None
        if channeldata.datatype == ChannelDataType.DICT.value:
            failed = channeldata.dictdata.pop(_FAILED, None)
        response = super().pack_response_package(channeldata)
        if failed is not None and response.err_no == protocol.OK:
            response.err_no = protocol.INVALID_IMAGE
            response.err_msg = f"no image could be classified: {failed}"
        if response.err_no == BACKEND_ERROR:
            response.err_msg = backend_error_message(response.err_msg)
        return response


def backend_error_message(paddle_message: str) -> str:
    """Our message out of Paddle Serving 0.9.0's wrapping of a failed ``process`` (operator.py
    _run_process: "[infer] failed to predict. <ours>. Please check the input dict and ..."), whose
    advice to check the input is wrong for a backend outage."""
    _, found, rest = paddle_message.partition("] failed to predict. ")
    message, found_end, _ = rest.rpartition(". Please check the input dict")
    return f"inference failed: {message}" if found and found_end else paddle_message


def build_dag(runtime: ServiceRuntime, request_op: RequestOp) -> Op:
    """decode -> preprocess -> infer -> postprocess; returns the last op (Paddle adds the response)."""
    decode = DecodeOp(runtime, [request_op])
    pre = PreprocessOp(runtime, [decode])
    infer = InferOp(runtime, [pre])
    return PostprocessOp(runtime, [infer])
