"""The framework-floor stand-in (``rexnet-serve --floor``): the same service with no model.

rexnet-bench measures what a request costs in the serving machinery alone: the same front doors, the
same DAG (same ops, same channels, same batching) and the same wire format as the real service, with
stages that pass the request through and answer every image with an empty prediction list. Its latency
is the floor under which no change to this project's own code can bring the service; the service's
latency minus the floor minus the in-process work is this project's own overhead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from rexnet_serving.manifest import Manifest, load_manifest
from rexnet_serving.results import ImageResult


class _NoModel:
    """A predictor that is never asked anything (the stand-in's probabilities ignore it)."""

    runtime, precision, device = "none", "none", "cpu"  # rexnet_serving.runtimes.base.runtime_info

    def clone(self) -> "_NoModel":
        return self


class FloorClassifier:
    """Classifier's stage interface (decode, preprocess, stack, probabilities, results) doing no work."""

    def __init__(self, model_dir: Path) -> None:
        self.manifest: Manifest = load_manifest(model_dir)
        self.model = _NoModel()

    @property
    def class_num(self) -> int:
        return self.manifest.class_num

    def decode(self, payloads: Sequence[Any]) -> Tuple[List[Any], Dict[int, Exception]]:
        return list(payloads), {}

    def preprocess(self, images: Sequence[Any]) -> List[Any]:
        return list(images)

    @staticmethod
    def stack(images: Sequence[Any]) -> List[Any]:
        return list(images)

    def probabilities(self, batch: Sequence[Any], model: Any = None) -> np.ndarray:
        return np.zeros((len(batch), 0), np.float32)

    def results(self, count: int, probs: np.ndarray, errors: Dict[int, Exception], k: int) -> List[ImageResult]:
        return [ImageResult() for _ in range(count)]
