"""What the protocol needs of a model: ``OipModel``, and one backed by rexnet_serving.classifier.Classifier.

The protocol core (rexnet_serving.oip.service) never touches Paddle or the serving DAG: it calls a
model's two infer callables. The service's DAG (batching, limits, deadlines) implements ``OipModel``
in pipelines/; ``ClassifierModel`` runs the offline Classifier in the calling thread (tests, tools).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np

from ..defaults import MAX_BATCH_IMAGES
from ..imageio import DecodeLimits
from ..manifest import Manifest
from .tensors import Element

PLATFORM = "paddle_inference"  # what v2 metadata's "platform" names (Paddle Inference runs the model)
IMAGE_INPUT = "image"  # BYTES [N]: encoded image files (JPEG, PNG, BMP, WebP)
TENSOR_INPUT = "x"     # FP32 [N, 3, S, S]: preprocessed (the export's feed)
PROBS_OUTPUT = "probs"   # FP32 [N, C] (the export's fetch)
ERRORS_OUTPUT = "errors"  # BYTES [N]: "" or {"code", "message"} JSON per image


@dataclass(frozen=True)
class ModelInfo:
    """The facts the protocol reports and checks, read from an export's manifest."""

    name: str
    version: str
    input_size: int
    class_num: int
    labels: Tuple[str, ...]
    max_images: int = DecodeLimits.max_request_images  # images per request on the ``image`` input
    max_batch: int = MAX_BATCH_IMAGES                   # rows per request on the ``x`` input
    platform: str = PLATFORM
    # REST metadata's "parameters": the inference settings the model runs with (runtime, precision,
    # max_batch_images, thread_num, settings_file when it has a settings.yaml). gRPC's message has no field.
    parameters: Tuple[Tuple[str, Any], ...] = ()

    @classmethod
    def from_manifest(cls, name: str, version: str, manifest: Manifest,
                      max_images: int = DecodeLimits.max_request_images, max_batch: int = MAX_BATCH_IMAGES,
                      parameters: Optional[Mapping[str, Any]] = None) -> "ModelInfo":
        return cls(name=name, version=str(version), input_size=manifest.input_size,
                   class_num=manifest.class_num, labels=tuple(manifest.labels()),
                   max_images=max_images, max_batch=max_batch, parameters=tuple((parameters or {}).items()))

    def metadata(self, versions: Sequence[str]) -> Dict[str, object]:
        """The v2 model metadata object (REST JSON form; gRPC builds the same fields)."""
        size = self.input_size
        meta: Dict[str, object] = {
            "name": self.name, "versions": list(versions), "platform": self.platform,
            "inputs": [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
                       {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, 3, size, size]}],
            "outputs": [{"name": PROBS_OUTPUT, "datatype": "FP32", "shape": [-1, self.class_num]},
                        {"name": ERRORS_OUTPUT, "datatype": "BYTES", "shape": [-1]}],
        }
        if self.parameters:
            meta["parameters"] = dict(self.parameters)
        return meta


@dataclass
class ImagesOutcome:
    """``probs`` [N, C] for every image of the request (zero rows for refused images) and why each
    refused image was refused: index -> (code, message), codes as rexnet_serving.imageio's."""

    probs: np.ndarray
    errors: Dict[int, Tuple[str, str]] = field(default_factory=dict)


class OipModel(Protocol):
    info: ModelInfo

    def ready(self) -> bool:
        """Loaded and warmed up: requests may come."""

    def infer_images(self, images: Sequence[Element], options: Mapping[str, Any]) -> ImagesOutcome:
        """Encoded image files (bytes; str is base64 text) -> probabilities, per-image errors kept.
        ``options``: InferRequest.options (deadline, cancellation); raise OipError for refusals."""

    def infer_tensor(self, batch: np.ndarray, options: Mapping[str, Any]) -> np.ndarray:
        """A preprocessed float32 [N, 3, S, S] batch -> probabilities [N, C]."""


class ClassifierModel:
    """OipModel over a rexnet_serving.classifier.Classifier, run in the caller's thread."""

    def __init__(self, classifier, name: str, version: str = "1",
                 max_images: int = DecodeLimits.max_request_images) -> None:
        self.classifier = classifier
        max_batch = getattr(classifier.model, "max_batch", MAX_BATCH_IMAGES)
        self.info = ModelInfo.from_manifest(name, version, classifier.manifest, max_images, max_batch)

    def ready(self) -> bool:
        return True

    def infer_images(self, images: Sequence[Element], options: Mapping[str, Any]) -> ImagesOutcome:
        decoded, refused = self.classifier.decode(images)
        probs = np.zeros((len(images), self.info.class_num), np.float32)
        if decoded:
            rows: List[int] = [i for i in range(len(images)) if i not in refused]
            probs[rows] = self.classifier.probabilities(self.classifier.preprocess(decoded))
        return ImagesOutcome(probs, {i: (exc.code, str(exc)) for i, exc in refused.items()})

    def infer_tensor(self, batch: np.ndarray, options: Mapping[str, Any]) -> np.ndarray:
        return self.classifier.probabilities(batch)
