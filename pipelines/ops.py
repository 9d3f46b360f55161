"""The service DAG on Paddle Serving's Pipeline: request -> prepare -> infer -> response.

Each Op is a thin adapter: Paddle Serving's hook tuples (``(data, is_skip, err_no, err_msg)`` from
``preprocess``, ``(data, err_no, err_msg)`` from ``process``) stay here; the work is done by the stage
functions of rexnet_serving.classifier (decode, preprocess, probabilities, results), which are tested
without a server and timed one by one into ``rexnet_stage_seconds``.

Why this shape (measured on the 2-core CI machine with pass-through ops: every op hop costs about
0.5 ms and a thread): decode and preprocess run in one op (``prepare``), whose threads work on
different requests in parallel; the infer op runs one forward pass per auto-batch; top-k and the JSON
answer are built by the response op, which Paddle Serving runs in the calling front-door thread, so
they cost no hop and no thread of their own.

How Paddle Serving runs them (operator.py, thread mode): an op's ``preprocess`` hook runs once per
request, ``process`` once per auto-batch (requests merged with ``np.append``), ``postprocess`` once per
request again. Thread ops hand Python objects to each other by reference (ThreadChannel with one
consumer), so decoded images and the preprocessed batch stay where they are (on the GPU when serving on
one). With ``client_type: brpc`` the infer op's predictor is
rexnet_serving.runtimes.brpc_remote.RemotePredictor: a backend failure fails the auto-batch's requests with BACKEND_ERROR (retryable) while the service stays up.

Every request carries its admission ticket (rexnet_pipelines.admission) from the front door: a request
whose client is gone or whose deadline passed is dropped before decoding and before inference.
"""
from __future__ import annotations

import rexnet_serving.imageio  # noqa: F401  (first: binds zlib before Paddle does; see that module)

import queue
from dataclasses import dataclass
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from paddle_serving_server.pipeline import Op, RequestOp, ResponseOp
from paddle_serving_server.pipeline.channel import ChannelDataType, ChannelTimeoutError
from paddle_serving_server.pipeline.error_catch import CustomExceptionCode

from rexnet_serving import pipeline_wire
from rexnet_serving.imageio import DecodeLimits, RequestTooLargeError
from rexnet_serving.runtimes.brpc_remote import RemoteError

from . import admission, metrics
from .batcher import Batcher

# Keys of the dicts the ops pass along (never on the wire; a client key is a str from the request).
TICKET, TOP_K, COUNT, ERRORS, BATCH, PROBS, MODEL = ("ticket", "top_k", "count", "errors", "batch", "probs",
                                                     "model")
_FEED = "x"             # the infer op's feed: an object array of per-image [3, S, S] tensors ...
_MODELS = "models"      # ... and, in step, the key of the model each image goes to
_FAILED = "_failed"     # set by the response op when no image of the request could be classified
_POLL = 1e-9            # ThreadChannel.front timeout that only looks (0 would mean "wait forever")
# err_no of requests whose forward pass failed in the bRPC backend (down, timed out, mismatched): Paddle
# Serving's code for a failed inference client, 9000. Not in pipeline_wire.BAD_REQUEST_ERRNOS: retryable.
BACKEND_ERROR = CustomExceptionCode.CLIENT_ERROR.value


@dataclass
class ModelRuntime:
    """One served model version: its classifier (stage functions, labels), one predictor per infer
    thread (predictors are not thread-safe; each thread takes one from the queue), the images per forward
    pass and the inference settings it runs with (the service config's, or its settings.yaml's)."""

    name: str
    version: int
    classifier: Any  # rexnet_serving.classifier.Classifier (or the framework floor's stand-in)
    predictors: "queue.Queue[Any]"
    max_batch_images: int
    settings: Dict[str, Any]  # runtime, precision, max_batch_images, thread_num (+ settings_file)

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    @classmethod
    def create(cls, name: str, version: int, classifier: Any, predictor_count: int, max_batch_images: int,
               settings: Dict[str, Any]) -> "ModelRuntime":
        predictors: "queue.Queue[Any]" = queue.Queue()
        predictors.put(classifier.model)
        for _ in range(predictor_count - 1):
            predictors.put(classifier.model.clone())
        return cls(name, version, classifier, predictors, max_batch_images, settings)


@dataclass
class ServiceRuntime:
    """What the ops share: the served models, the request limits and the admission control."""

    models: Dict[str, ModelRuntime]  # by key "name/version"
    default_model: str               # the name requests get when they name none
    limits: DecodeLimits
    max_images: int
    default_top_k: int
    admission: admission.Admission

    def __post_init__(self) -> None:
        self.latest: Dict[str, ModelRuntime] = {}
        for model in sorted(self.models.values(), key=lambda m: m.version):
            self.latest[model.name] = model
        if self.default_model not in self.latest:
            raise ValueError(f"default model {self.default_model!r} is not served")

    @property
    def default(self) -> ModelRuntime:
        return self.latest[self.default_model]

    def resolve(self, name: Optional[str], version: Optional[int] = None) -> ModelRuntime:
        """The model a request asks for (its highest served version unless it names one)."""
        name = self.default_model if name is None else name
        if name not in self.latest:
            raise pipeline_wire.RequestError("unknown_model", f"no model {name!r}; this service serves "
                                                         f"{', '.join(sorted(self.latest))}")
        if version is None:
            return self.latest[name]
        model = self.models.get(f"{name}/{version}")
        if model is None:
            served = sorted(m.version for m in self.models.values() if m.name == name)
            raise pipeline_wire.RequestError("unknown_model", f"model {name!r} has no served version {version} "
                                                         f"(served: {', '.join(map(str, served))})")
        return model

    def close(self) -> None:
        """Close what the predictors hold open (a remote predictor's connection)."""
        for model in self.models.values():
            while True:
                try:
                    predictor = model.predictors.get_nowait()
                except queue.Empty:
                    break
                close = getattr(predictor, "close", None)
                if close is not None:
                    close()


def _dropped(ticket: Optional[admission.Ticket], stage: str) -> Optional[Tuple]:
    """The preprocess-hook answer for a request that must not be worked on any more, else None."""
    why = ticket.dropped_because() if ticket is not None else None
    if why is None:
        return None
    metrics.REFUSED.labels(why).inc()
    return None, True, pipeline_wire.TIMEOUT, f"{why}: dropped before {stage} (the client gave up or the " \
                                         "request's deadline passed)"


class RexnetRequestOp(RequestOp):
    """Request -> {field: text or bytes} plus the admission ticket of the calling front door.

    Bytes tensors (elem_type 13) are taken as the encoded image. The stock RequestOp passes byte_data to
    ``np.load(allow_pickle=True)``, which unpickles whatever a client sends (code execution); here those
    bytes are never interpreted, only decoded as an image. The request may be Paddle's protobuf message
    (gRPC) or any object with the same fields (rexnet_pipelines.http_front builds one from JSON).
    """

    def unpack_request_package(self, request: Any) -> Tuple[Dict[str, Any], int, Optional[int], str]:
        fields: Dict[str, Any] = {}

        def put(name: str, value: Any) -> Optional[str]:
            if name in fields:
                return f"key {name!r} appears more than once"
            fields[name] = value
            return None

        if len(request.key) != len(request.value):
            return {}, request.logid, pipeline_wire.INVALID_REQUEST, (
                f"invalid_request: {len(request.key)} keys but {len(request.value)} values")
        problems = [put(k, v) for k, v in zip(request.key, request.value)]
        for tensor in request.tensors:
            if tensor.elem_type == pipeline_wire.BYTES_ELEM_TYPE:
                problems.append(put(tensor.name, tensor.byte_data))
            elif tensor.elem_type == pipeline_wire.STRING_ELEM_TYPE:
                problems.append(put(tensor.name, "".join(tensor.str_data)))
            else:
                problems.append(f"tensor {tensor.name!r} has elem_type {tensor.elem_type}; send images "
                                f"as bytes (elem_type {pipeline_wire.BYTES_ELEM_TYPE}) or base64 values")
        problems = [p for p in problems if p]
        if problems:
            return {}, request.logid, pipeline_wire.INVALID_REQUEST, f"invalid_request: {problems[0]}"
        return {"fields": fields, TICKET: admission.current_ticket()}, request.logid, None, ""


class PrepareOp(Op):
    """Check the request's keys, decode each image (a bad image becomes that image's error) and run
    the eval preprocessing of the decoded ones as one [N, 3, S, S] batch."""

    def __init__(self, runtime: ServiceRuntime, input_ops: List[Op]) -> None:
        super().__init__(name="prepare", input_ops=input_ops)
        self.runtime = runtime

    def preprocess(self, input_dicts: Dict[str, Any], data_id: int = 0, log_id: int = 0) -> Tuple:
        (data,) = input_dicts.values()
        ticket = data[TICKET]
        try:
            dropped = _dropped(ticket, "decoding")
            if dropped is not None:
                return dropped
            # In-process front doors (the Open Inference Protocol) hand their request over on the ticket.
            payload = ticket.payload if ticket is not None and ticket.payload is not None else {}
            fields = payload.get("fields", data["fields"])
            rt = self.runtime
            try:
                model = rt.resolve(*pipeline_wire.model_of(fields))
                if ticket is not None:
                    ticket.model = model.key
                if "tensor" in payload:  # already preprocessed: [N, 3, S, S] float32
                    return self._prepared(model, len(payload["tensor"]), payload["top_k"], {}, payload["tensor"],
                                          ticket)
                payloads, top_k = pipeline_wire.parse_fields(fields, rt.max_images, model.classifier.class_num,
                                                        rt.default_top_k)
            except pipeline_wire.RequestError as exc:
                return None, True, pipeline_wire.INVALID_REQUEST, f"{exc.code}: {exc.message}"
            with metrics.STAGE_SECONDS.labels("decode").time():
                try:
                    images, errors = model.classifier.decode(payloads)
                except RequestTooLargeError as exc:  # the images together are over the per-request budget
                    return None, True, pipeline_wire.REQUEST_TOO_LARGE, f"{exc.code}: {exc}"
            batch = None
            if images:
                with metrics.STAGE_SECONDS.labels("preprocess").time():
                    batch = model.classifier.preprocess(images)
            return self._prepared(model, len(payloads), top_k, errors, batch, ticket)
        finally:
            if ticket is not None:
                ticket.prepared()

    @staticmethod
    def _prepared(model: ModelRuntime, count: int, top_k: int, errors: Dict[int, Any], batch: Any,
                  ticket: Optional[admission.Ticket]) -> Tuple:
        return {COUNT: count, TOP_K: top_k, ERRORS: errors, BATCH: batch, TICKET: ticket, MODEL: model.key}, \
            True, None, ""


class _ChannelQueue:
    """Paddle Serving's ThreadChannel as a rexnet_pipelines.batcher.BatchQueue."""

    def __init__(self, channel: Any, op_name: str) -> None:
        self.channel, self.op_name = channel, op_name

    def take(self, timeout: Optional[float]) -> Any:
        if timeout is None:
            return self.channel.front(self.op_name)
        try:  # front's timeout 0 would mean "wait forever": look with _POLL instead
            return self.channel.front(self.op_name, max(timeout, _POLL))
        except ChannelTimeoutError:
            raise queue.Empty from None


class InferOp(Op):
    """One forward pass per auto-batch: the images of every request taken together."""

    def __init__(self, runtime: ServiceRuntime, input_ops: List[Op]) -> None:
        super().__init__(name="infer", input_ops=input_ops)
        self.runtime = runtime

    def init_from_dict(self, conf: Dict[str, Any]) -> None:
        super().init_from_dict(conf)
        # Paddle Serving skips `process` for an op without its own model_config; ours brings its model.
        self.with_serving = True

    def init_client(self, client_config: Any, server_endpoints: Any) -> Any:
        return self.runtime.models  # loaded before the DAG starts (a load error exits cleanly)

    def _auto_batching_generator(self, input_channel: Any, op_name: str, batch_size: int,
                                 timeout: Optional[float], op_info_prefix: str) -> Any:
        """Paddle Serving's hook for forming auto-batches (operator.py ``_run``), replaced by
        rexnet_pipelines.batcher.Batcher: its wait policy never makes a lone request wait."""
        batcher = Batcher(batch_size, timeout, lambda: self.runtime.admission.preparing)
        source = _ChannelQueue(input_channel, op_name)
        while True:
            batch = batcher.next_batch(source)
            metrics.BATCH_WAIT.observe(batch.waited)
            yield batch.items

    def preprocess(self, input_dicts: Dict[str, Any], data_id: int = 0, log_id: int = 0) -> Tuple:
        (data,) = input_dicts.values()
        dropped = _dropped(data[TICKET], "inference")
        if dropped is not None:
            return dropped[0], False, dropped[2], dropped[3]
        batch = data[BATCH]
        # Paddle Serving merges a batch's feeds with np.append and splits the outputs by each feed's
        # length: object arrays of per-image tensors merge without copying them off the device.
        count = 0 if batch is None else len(batch)
        feed, models = np.empty(count, dtype=object), np.empty(count, dtype=object)
        for i in range(count):
            feed[i], models[i] = batch[i], data[MODEL]
        return {_FEED: feed, _MODELS: models}, False, None, ""

    def process(self, feed_batch: List[Dict[str, Any]], typical_logid: int = 0) -> Tuple:
        images, keys = list(feed_batch[0][_FEED]), list(feed_batch[0][_MODELS])
        metrics.BATCH_IMAGES.observe(len(images))
        rows = np.empty(len(images), dtype=object)  # one probability row per image, in feed order
        by_model: Dict[str, List[int]] = defaultdict(list)
        for index, key in enumerate(keys):
            by_model[key].append(index)
        try:
            with metrics.STAGE_SECONDS.labels("infer").time():
                for key, indices in by_model.items():
                    self._forward(self.runtime.models[key], images, indices, rows)
        except RemoteError as exc:  # only a remote predictor raises these: the backend failed
            return {}, BACKEND_ERROR, str(exc)
        return {PROBS: rows}, 0, ""

    def _forward(self, model: ModelRuntime, images: Sequence[Any], indices: List[int], rows: np.ndarray) -> None:
        """The images at ``indices`` through ``model``, at most its max_batch_images per forward pass."""
        step, classifier = model.max_batch_images, model.classifier
        predictor = model.predictors.get()
        try:
            for start in range(0, len(indices), step):
                chunk = indices[start:start + step]
                probs = classifier.probabilities(classifier.stack([images[i] for i in chunk]), predictor)
                for i, row in zip(chunk, probs):
                    rows[i] = row
        finally:
            model.predictors.put(predictor)

    def postprocess(self, input_data: Dict[str, Any], fetch_data: Dict[str, Any], data_id: int = 0,
                    log_id: int = 0) -> Tuple:
        (data,) = input_data.values()
        out = {k: v for k, v in data.items() if k not in (BATCH, TICKET)}  # let the device batch go
        rows = list(fetch_data[PROBS])
        classes = self.runtime.models[data[MODEL]].classifier.class_num
        out[PROBS] = np.stack(rows) if rows else np.zeros((0, classes), np.float32)
        return out, None, ""


class RexnetResponseOp(ResponseOp):
    """Top-k classes with label names per image, errors slotted back in order, as the JSON answer.

    Paddle Serving calls this in the front-door thread that waits for the request (DAGExecutor.call),
    so the postprocess stage runs there, in parallel across requests, with no op hop of its own. When
    no image could be classified, err_no says so while the results still name why.
    """

    def __init__(self, runtime: ServiceRuntime, input_ops: List[Op]) -> None:
        super().__init__(input_ops=input_ops)
        self.runtime = runtime

    def pack_response_package(self, channeldata: Any) -> Any:
        failed = None
        if channeldata.error_code == 0 and channeldata.datatype == ChannelDataType.DICT.value:
            data = channeldata.dictdata
            classifier = self.runtime.models[data[MODEL]].classifier
            with metrics.STAGE_SECONDS.labels("postprocess").time():
                results = classifier.results(data[COUNT], data[PROBS], data[ERRORS], data[TOP_K])
            ticket = admission.current_ticket()  # this runs in the calling front door's thread
            if ticket is not None and ticket.payload is not None:
                ticket.outcome = (data[PROBS], results)
            for result in results:
                metrics.IMAGES.labels(result.error_code or "ok").inc()
            channeldata.dictdata = {pipeline_wire.RESULTS_KEY: pipeline_wire.encode_results(results)}
            if not any(r.ok for r in results):
                failed = "; ".join(f"image {i}: {r.error_code}: {r.error_message}" for i, r in enumerate(results))
        response = super().pack_response_package(channeldata)
        if failed is not None and response.err_no == pipeline_wire.OK:
            response.err_no = pipeline_wire.INVALID_IMAGE
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
    """prepare -> infer; returns the last op (the response op follows it)."""
    return InferOp(runtime, [PrepareOp(runtime, [request_op])])
