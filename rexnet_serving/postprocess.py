"""Postprocessing: class scores -> the top-k classes per image with label names (PaddleClas's Topk).

PaddleClas's ``Topk`` postprocess sorts softmax scores and maps class ids to the label list; this does
the same for a whole batch and builds rexnet_serving.results objects, whose JSON form every client reads.
Images refused before inference are slotted back in request order with their error.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .results import ImageResult, Prediction


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (then float32), stable for large logits."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def top_k_order(probs: np.ndarray, k: int) -> np.ndarray:
    """The class ids [N, k] of the ``k`` best scores of each row of ``probs`` [N, C], best first; ties go
    to the lower id (a stable sort). The one ordering every answer uses (Pipeline results, the Open
    Inference Protocol's classification extension)."""
    return np.argsort(-probs, axis=1, kind="stable")[:, :k]


def top_k(probs: np.ndarray, k: int, labels: Sequence[str]) -> list:
    """The ``k`` best classes of each row of ``probs`` [N, C], best first; ties go to the lower id."""
    if probs.ndim != 2:
        raise ValueError(f"scores must be [images, classes], got shape {probs.shape}")
    classes = probs.shape[1]
    if not 1 <= k <= classes:
        raise ValueError(f"top_k must be between 1 and {classes}, got {k}")
    if len(labels) != classes:
        raise ValueError(f"{len(labels)} labels for {classes} classes")
    order = top_k_order(probs, k)
    return [[Prediction(int(c), labels[int(c)], float(row[c])) for c in ids]
            for row, ids in zip(probs, order)]


def assemble(count: int, predictions: Sequence[list], errors: Mapping[int, Exception]) -> list:
    """``count`` results in request order: ``errors`` maps an image's index to why it was refused (an
    exception with ``.code``); the successful images' predictions fill the other slots in order."""
    if len(predictions) + len(errors) != count:
        raise ValueError(f"{len(predictions)} predictions and {len(errors)} errors for {count} images")
    remaining = iter(predictions)
    results = []
    for index in range(count):
        error = errors.get(index)
        if error is None:
            results.append(ImageResult(predictions=list(next(remaining))))
        else:
            results.append(ImageResult.failure(getattr(error, "code", "error"), str(error)))
    return results
