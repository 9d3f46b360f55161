"""The Open Inference Protocol's semantics over a set of OipModels: what REST and gRPC both answer.

Endpoints (https://github.com/kserve/open-inference-protocol): server live / ready / metadata, model
ready / metadata (per model, optionally per version), infer. Extensions: Triton's classification
(``parameters.classification = k`` on the ``probs`` output turns it into BYTES [N, k] strings
``"score:index:label"``, what tritonclient's ``class_count`` asks for) and binary tensor data (the
REST and gRPC adapters). The adapters parse the wire into rexnet_serving.oip.tensors objects and call
``OipService``; it never sees HTTP or gRPC.

Per-image errors in a batch of ``image``s: the request succeeds when at least one image was
classified. A refused image gets a zero row in ``probs``, the classification entries
``"0.000000:-1:error:<code>"``, and the output ``errors`` (BYTES [N], one entry per image: empty for a
classified image, else JSON ``{"code": ..., "message": ...}``) is added to the response even when the
request asked only for other outputs, so a client never mistakes a zero row for a result. When no
image could be classified the request fails (INVALID_ARGUMENT, every image's reason in the message),
as the Pipeline's err_no 52 does.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

from .. import __version__
from ..postprocess import top_k_order
from .model import ERRORS_OUTPUT, IMAGE_INPUT, PROBS_OUTPUT, TENSOR_INPUT, ImagesOutcome, OipModel
from .tensors import (BYTES, FP32, NOT_FOUND, InferRequest, InferResponse, OipError, OutputTensor,
                      RequestedOutput, invalid)

SERVER_NAME = "rexnet-serving"
EXTENSIONS = ("classification", "binary_tensor_data")


def _version_key(version: str) -> tuple:
    return (0, int(version)) if version.isdigit() else (1, version)


class OipService:
    """Models by name and version, the server's readiness, and the protocol's answers.

    ``models``: every served (name, version); a request without a version gets a name's highest.
    ``ready``: the server's own readiness (loaded, warmed up, not draining), ANDed with each model's.
    """

    def __init__(self, models: Iterable[OipModel], ready: Callable[[], bool] = lambda: True,
                 live: Callable[[], bool] = lambda: True, server_name: str = SERVER_NAME,
                 server_version: str = __version__) -> None:
        self._models: Dict[str, Dict[str, OipModel]] = {}
        for model in models:
            versions = self._models.setdefault(model.info.name, {})
            if model.info.version in versions:
                raise ValueError(f"model {model.info.name} version {model.info.version} given twice")
            versions[model.info.version] = model
        if not self._models:
            raise ValueError("an OipService needs at least one model")
        self._ready = ready
        self._live = live
        self.server_name = server_name
        self.server_version = server_version

    # -- lookups ------------------------------------------------------------------------------------
    def model(self, name: str, version: str = "") -> OipModel:
        versions = self._models.get(name)
        if versions is None:
            raise OipError(NOT_FOUND, f"unknown model '{name}' (served: {', '.join(sorted(self._models))})")
        if not version:
            return versions[max(versions, key=_version_key)]
        if version not in versions:
            raise OipError(NOT_FOUND, f"model '{name}' has no version '{version}' (served: "
                                      f"{', '.join(sorted(versions, key=_version_key))})")
        return versions[version]

    def versions(self, name: str) -> List[str]:
        return sorted(self._models[name], key=_version_key)

    # -- health and metadata ------------------------------------------------------------------------
    def live(self) -> bool:
        return bool(self._live())

    def ready(self) -> bool:
        return bool(self._ready()) and all(m.ready() for v in self._models.values() for m in v.values())

    def model_ready(self, name: str, version: str = "") -> bool:
        return bool(self._ready()) and self.model(name, version).ready()

    def server_metadata(self) -> Dict[str, object]:
        return {"name": self.server_name, "version": self.server_version, "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str = "") -> Dict[str, object]:
        model = self.model(name, version)
        return model.info.metadata([version] if version else self.versions(name))

    # -- infer --------------------------------------------------------------------------------------
    def infer(self, name: str, version: str, request: InferRequest) -> InferResponse:
        model = self.model(name, version)
        if len(request.inputs) != 1 or request.inputs[0].name not in (IMAGE_INPUT, TENSOR_INPUT):
            got = ", ".join(repr(i.name) for i in request.inputs) or "none"
            raise invalid(f"expected exactly one input, '{IMAGE_INPUT}' (BYTES [N], encoded image files) or "
                          f"'{TENSOR_INPUT}' (FP32 [N, 3, {model.info.input_size}, {model.info.input_size}], "
                          f"preprocessed); got {got}")
        requested = _requested_outputs(request.outputs, model.info.class_num)
        tensor = request.inputs[0]
        if tensor.name == IMAGE_INPUT:
            outcome = _infer_images(model, tensor.datatype, tensor.shape, tensor.data, request.options)
        else:
            outcome = ImagesOutcome(_infer_tensor(model, tensor.datatype, tensor.shape, tensor.data, request.options))
        outputs = [self._output(model, out, outcome) for out in requested.values()]
        if outcome.errors and ERRORS_OUTPUT not in requested:
            outputs.append(self._output(model, RequestedOutput(ERRORS_OUTPUT), outcome))
        return InferResponse(model_name=model.info.name, model_version=model.info.version, outputs=outputs,
                             id=request.id, requested=requested)

    @staticmethod
    def _output(model: OipModel, requested: RequestedOutput, outcome: ImagesOutcome) -> OutputTensor:
        probs, errors = outcome.probs, outcome.errors
        if requested.name == ERRORS_OUTPUT:
            entries = [json.dumps({"code": errors[i][0], "message": errors[i][1]}).encode() if i in errors
                       else b"" for i in range(len(probs))]
            return OutputTensor(ERRORS_OUTPUT, BYTES, (len(entries),), _object_array(entries))
        if not requested.classification:
            return OutputTensor(PROBS_OUTPUT, FP32, tuple(probs.shape), probs.astype(np.float32, copy=False))
        k = requested.classification
        order = top_k_order(probs, k)
        labels = model.info.labels
        rows = []
        for row, (scores, ids) in enumerate(zip(probs, order)):
            if row in errors:
                rows.extend([f"{0.0:f}:-1:error:{errors[row][0]}".encode()] * k)
            else:
                rows.extend(f"{float(scores[c]):f}:{int(c)}:{labels[int(c)]}".encode() for c in ids)
        return OutputTensor(PROBS_OUTPUT, BYTES, (len(probs), k), _object_array(rows).reshape(len(probs), k))


def _object_array(items: Sequence[bytes]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = list(items)
    return array


def _requested_outputs(outputs: Optional[List[RequestedOutput]], class_num: int) -> "OrderedDict[str, RequestedOutput]":
    if not outputs:
        return OrderedDict([(PROBS_OUTPUT, RequestedOutput(PROBS_OUTPUT))])
    requested: "OrderedDict[str, RequestedOutput]" = OrderedDict()
    for out in outputs:
        if out.name not in (PROBS_OUTPUT, ERRORS_OUTPUT):
            raise invalid(f"unknown output '{out.name}' (this model has '{PROBS_OUTPUT}' and '{ERRORS_OUTPUT}')")
        if out.name in requested:
            raise invalid(f"output '{out.name}' requested twice")
        k = out.classification
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= class_num:
            raise invalid(f"output '{out.name}': classification must be an integer 1..{class_num}, got {k!r}")
        if k and out.name != PROBS_OUTPUT:
            raise invalid(f"output '{out.name}': classification applies to '{PROBS_OUTPUT}' only")
        requested[out.name] = out
    return requested


def _batch_size(name: str, shape: Sequence[int], limit: int, what: str) -> int:
    n = shape[0] if shape else 0
    if not 1 <= n <= limit:
        raise invalid(f"input '{name}': {n} {what} in one request; send 1..{limit}")
    return n


def _infer_images(model: OipModel, datatype: str, shape: Sequence[int], data: np.ndarray,
                  options: Dict[str, Any]) -> ImagesOutcome:
    if datatype != BYTES:
        raise invalid(f"input '{IMAGE_INPUT}' must be BYTES (encoded image files), got {datatype}")
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise invalid(f"input '{IMAGE_INPUT}' must have shape [N] (or [N, 1]), got {list(shape)}")
    _batch_size(IMAGE_INPUT, shape, model.info.max_images, "images")
    outcome = model.infer_images(list(data.reshape(-1)), options)
    if len(outcome.errors) == len(outcome.probs):
        reasons = "; ".join(f"image {i}: {code}: {message}" for i, (code, message) in sorted(outcome.errors.items()))
        raise invalid(f"no image could be classified: {reasons}")
    return outcome


def _infer_tensor(model: OipModel, datatype: str, shape: Sequence[int], data: np.ndarray,
                  options: Dict[str, Any]) -> np.ndarray:
    size = model.info.input_size
    if datatype != FP32:
        raise invalid(f"input '{TENSOR_INPUT}' must be FP32, got {datatype}")
    if len(shape) != 4 or tuple(shape[1:]) != (3, size, size):
        raise invalid(f"input '{TENSOR_INPUT}' must have shape [N, 3, {size}, {size}], got {list(shape)}")
    _batch_size(TENSOR_INPUT, shape, model.info.max_batch, "rows")
    if not np.all(np.isfinite(data)):
        raise invalid(f"input '{TENSOR_INPUT}' holds NaN or infinite values")
    return np.asarray(model.infer_tensor(np.ascontiguousarray(data, dtype=np.float32), options), np.float32)
