"""The service DAG on Paddle Serving's Pipeline: request -> prepare -> infer -> response.

What flows through it is typed: the rexnet_pipelines.request.ClassifyRequest every front door builds,
the :class:`Prepared` request, and the ClassifyAnswer the response op returns to the front door. Paddle
Serving's hook tuples, channel dicts and auto-batching hook stay in rexnet_pipelines.paddle_adapter;
the ops here are thin stage code over the stage functions of rexnet_serving.classifier (decode,
preprocess, probabilities, results), which are tested without a server and timed one by one into
``rexnet_stage_seconds``. No op knows which protocol brought a request.

Why this shape (measured on the 2-core CI machine with pass-through ops: every op hop costs about
0.5 ms and a thread): decode and preprocess run in one op (``prepare``), whose threads work on
different requests in parallel; the infer op runs one forward pass per auto-batch; top-k and the answer
are built by the response op, which Paddle Serving runs in the calling front-door thread, so they cost
no hop and no thread of their own.

How Paddle Serving runs them (operator.py, thread mode): an op's ``preprocess`` hook runs once per
request, ``process`` once per auto-batch, ``postprocess`` once per request again. Thread ops hand Python
objects to each other by reference (ThreadChannel with one consumer), so decoded images and the
preprocessed batch stay where they are (on the GPU when serving on one). With ``client_type: brpc`` the
infer op's predictor is rexnet_serving.runtimes.brpc_remote.RemotePredictor: a backend failure fails the auto-batch's
requests with BACKEND_ERROR (retryable) while the service stays up.

Every request carries its admission ticket (rexnet_pipelines.admission) from the front door: a request
whose client is gone or whose deadline passed is dropped before decoding and before inference.
"""
from __future__ import annotations

import rexnet_serving.imageio  # noqa: F401  (first: binds zlib before Paddle does; see that module)

import queue
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from paddle_serving_server.pipeline import Op

from rexnet_serving import pipeline_wire
from rexnet_serving.runtimes.brpc_remote import RemoteError
from rexnet_serving.imageio import DecodeLimits, ImageError, RequestTooLargeError

from . import admission, metrics
from .paddle_adapter import BatchingOp, Refused, StageOp, TypedResponseOp
from .request import BACKEND_ERROR, ClassifyAnswer, ClassifyRequest


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
    default_top_k: int
    admission: admission.Admission

    def __post_init__(self) -> None:
        self.latest: Dict[str, ModelRuntime] = {}
        for model in sorted(self.models.values(), key=lambda m: m.version):
            self.latest[model.name] = model
        if self.default_model not in self.latest:
            raise ValueError(f"default model {self.default_model!r} is not served")

    @property
    def max_images(self) -> int:
        """Encoded images per request."""
        return self.limits.max_request_images

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


def _check_dropped(ticket: Optional[admission.Ticket], stage: str) -> None:
    """Refused (TIMEOUT) for a request that must not be worked on any more."""
    why = ticket.dropped_because() if ticket is not None else None
    if why is not None:
        metrics.REFUSED.labels(why).inc()
        raise Refused(pipeline_wire.TIMEOUT, f"{why}: dropped before {stage} (the client gave up or the request's "
                                        "deadline passed)")


@dataclass
class Prepared:
    """A request after the prepare op: its model, its top-k, the per-image errors of the images that
    could not be decoded and the preprocessed batch of the others (None when there is none); the infer
    op adds their probabilities."""

    request: ClassifyRequest
    model: ModelRuntime
    top_k: int
    errors: Dict[int, ImageError]
    batch: Any
    probs: Optional[np.ndarray] = None


class PrepareOp(StageOp):
    """Resolve the model, check the request against it and the service's limits, decode each image (a
    bad image becomes that image's error) and run the eval preprocessing of the decoded ones as one
    [N, 3, S, S] batch. A preprocessed tensor passes through."""

    def __init__(self, runtime: ServiceRuntime, input_ops: List[Op]) -> None:
        super().__init__(name="prepare", input_ops=input_ops)
        self.runtime = runtime

    def work(self, request: ClassifyRequest) -> Prepared:
        ticket, rt = request.ticket, self.runtime
        try:
            _check_dropped(ticket, "decoding")
            try:
                model = rt.resolve(request.model, request.version)
                if ticket is not None:
                    ticket.model = model.key
                class_num = model.classifier.class_num
                top_k = pipeline_wire.parse_top_k(None if request.top_k is None else str(request.top_k), class_num,
                                             rt.default_top_k)
                if request.tensor is not None:  # already preprocessed: [N, 3, S, S] float32
                    return Prepared(request, model, top_k, {}, request.tensor)
                if request.count > rt.max_images:
                    raise pipeline_wire.RequestError("too_many_images", f"{request.count} images in one request, "
                                                                   f"over the limit of {rt.max_images}")
            except pipeline_wire.RequestError as exc:
                raise Refused(pipeline_wire.INVALID_REQUEST, f"{exc.code}: {exc.message}") from None
            with metrics.STAGE_SECONDS.labels("decode").time():
                try:
                    images, errors = model.classifier.decode(request.images)
                except RequestTooLargeError as exc:  # the images together are over the per-request budget
                    raise Refused(pipeline_wire.REQUEST_TOO_LARGE, f"{exc.code}: {exc}") from None
            batch = None
            if images:
                with metrics.STAGE_SECONDS.labels("preprocess").time():
                    batch = model.classifier.preprocess(images)
            return Prepared(request, model, top_k, errors, batch)
        finally:
            if ticket is not None:
                ticket.prepared()


class InferOp(BatchingOp):
    """One forward pass per auto-batch: the images of every request taken together, each model's at
    most its max_batch_images at a time."""

    def __init__(self, runtime: ServiceRuntime, input_ops: List[Op]) -> None:
        super().__init__(name="infer", input_ops=input_ops)
        self.runtime = runtime

    def preparing(self) -> int:
        return self.runtime.admission.preparing

    def images(self, item: Prepared) -> Tuple[Sequence[Any], str]:
        _check_dropped(item.request.ticket, "inference")
        batch = item.batch
        return ([] if batch is None else [batch[i] for i in range(len(batch))]), item.model.key

    def forward(self, images: List[Any], keys: List[str]) -> np.ndarray:
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
            raise Refused(BACKEND_ERROR, str(exc)) from None
        return rows

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

    def collect(self, item: Prepared, rows: List[Any]) -> Prepared:
        item.batch = None  # let the device batch go
        item.probs = np.stack(rows) if rows else np.zeros((0, item.model.classifier.class_num), np.float32)
        return item


class RexnetResponseOp(TypedResponseOp):
    """Top-k classes with label names per image, errors slotted back in order, and the probabilities
    ([N, C], zero rows for the images that could not be classified) as the typed answer.

    Paddle Serving calls this in the front-door thread that waits for the request (DAGExecutor.call),
    so the postprocess stage runs there, in parallel across requests, with no op hop of its own.
    """

    def __init__(self, runtime: ServiceRuntime, input_ops: List[Op]) -> None:
        super().__init__(input_ops=input_ops)
        self.runtime = runtime

    def answer(self, item: Prepared) -> ClassifyAnswer:
        classifier, count = item.model.classifier, item.request.count
        with metrics.STAGE_SECONDS.labels("postprocess").time():
            results = classifier.results(count, item.probs, item.errors, item.top_k)
            probs = np.zeros((count, item.probs.shape[1]), np.float32)  # the floor's rows are empty
            classified = [i for i, r in enumerate(results) if r.ok]
            if classified:
                probs[classified] = item.probs
        for result in results:
            metrics.IMAGES.labels(result.error_code or "ok").inc()
        return ClassifyAnswer.classified(results, probs, item.model.key)


def build_dag(runtime: ServiceRuntime, request_op: Op) -> Op:
    """prepare -> infer; returns the last op (the response op follows it)."""
    return InferOp(runtime, [PrepareOp(runtime, [request_op])])
