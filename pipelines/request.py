"""The one request type every front door hands the DAG, and the one answer type it gets back.

Every front door (the Pipeline's HTTP and gRPC, rexnet_pipelines.pipeline_front; the Open Inference
Protocol's REST and gRPC, rexnet_pipelines.oip_front) translates its wire format into a
:class:`ClassifyRequest` and reads a :class:`ClassifyAnswer`; the ops (rexnet_pipelines.ops) see only
these types and never which protocol brought a request. rexnet_pipelines.paddle_adapter carries them
through Paddle Serving's DAG.

Status codes: an answer's ``status`` is one of the service's status numbers (rexnet_serving.pipeline_wire:
OK, INVALID_REQUEST, INVALID_IMAGE, REQUEST_TOO_LARGE, OVERLOADED, CLOSED_ERROR, TIMEOUT, and
BACKEND_ERROR below). They are the Pipeline wire's ``err_no`` values and the ``err_no`` label of the
request metrics, so the Pipeline front doors pass them through and the v2 front doors map them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from rexnet_serving import pipeline_wire
from rexnet_serving.results import ImageResult

from .admission import Ticket

# Paddle Serving's code for a failed inference client (CustomExceptionCode.CLIENT_ERROR): the forward
# pass failed in the bRPC backend (down, timed out, mismatched). Not in pipeline_wire.BAD_REQUEST_ERRNOS:
# retryable. Stated here (not imported from Paddle Serving) so front doors need no Paddle import.
BACKEND_ERROR = 9000


@dataclass
class ClassifyRequest:
    """One request to classify, whatever protocol brought it.

    Exactly one of ``images`` (encoded image files, or base64 text of them: decoded in the prepare op)
    and ``tensor`` (an already preprocessed float32 [N, 3, S, S] batch) is set. ``top_k``: classes per
    image in the answer's results (None: the service's default, capped at the model's class count);
    the answer always carries the probabilities too. ``model``/``version``: None for the service's
    default model / the highest served version. ``ticket``: the admission ticket (deadline, cancelled
    flag), set by rexnet_pipelines.frontdoor.FrontDoor when the request is admitted.
    """

    images: Optional[List[Any]] = None
    tensor: Optional[np.ndarray] = None
    top_k: Optional[int] = None
    model: Optional[str] = None
    version: Optional[int] = None
    ticket: Optional[Ticket] = None
    log_id: int = 0

    def __post_init__(self) -> None:
        if (self.images is None) == (self.tensor is None):
            raise ValueError("a ClassifyRequest holds either images or a tensor")

    @property
    def count(self) -> int:
        return len(self.images) if self.images is not None else len(self.tensor)

    @property
    def deadline(self) -> Optional[float]:
        """``time.monotonic()`` seconds after which the request is dropped (None: not admitted yet)."""
        return self.ticket.deadline if self.ticket is not None else None


@dataclass
class ClassifyAnswer:
    """What a front door gets back: ``status`` 0 with one result per image and the probabilities, or a
    refusal (``status`` and ``message``; results and probabilities may still be there, e.g. INVALID_IMAGE).

    ``probs``: [N, C] float32 in request order, a zero row for an image that could not be classified;
    ``results``: one rexnet_serving.results.ImageResult per image (top-k, or the image's error).
    ``model``: the served model's key ``name/version`` (empty when the request never reached one).
    """

    status: int = pipeline_wire.OK
    message: str = ""
    results: List[ImageResult] = field(default_factory=list)
    probs: Optional[np.ndarray] = None
    model: str = ""

    @classmethod
    def refused(cls, status: int, message: str, model: str = "") -> "ClassifyAnswer":
        return cls(status=status, message=message, model=model)

    @classmethod
    def classified(cls, results: Sequence[ImageResult], probs: np.ndarray, model: str) -> "ClassifyAnswer":
        """Results of every image; INVALID_IMAGE (every image's reason) when none could be classified."""
        answer = cls(results=list(results), probs=probs, model=model)
        if results and not any(r.ok for r in results):
            answer.status = pipeline_wire.INVALID_IMAGE
            answer.message = "no image could be classified: " + "; ".join(
                f"image {i}: {r.error_code}: {r.error_message}" for i, r in enumerate(results))
        return answer

    @property
    def ok(self) -> bool:
        return self.status == pipeline_wire.OK

    @property
    def errors(self) -> Dict[int, Tuple[str, str]]:
        """(code, message) of every image that could not be classified, by its index."""
        return {i: (r.error_code, r.error_message) for i, r in enumerate(self.results) if not r.ok}
