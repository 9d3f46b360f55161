"""Optional ONNX copy of the exported model: ``onnx/model.onnx`` via Paddle2ONNX, checked with
ONNX Runtime.

Converted from ``inference/`` (the same program Paddle Serving runs), opset 11 (the lowest that has
every op ReXNet uses in the form Paddle2ONNX emits), then run once against Paddle Inference on the
same random batch: an export that does not reproduce Paddle's output is an error, not a file.
Both packages are the ``onnx`` extra (``pip install rexnet-serving[onnx]``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..manifest import MODEL_FILE, PARAMS_FILE

ONNX_FILE = "model.onnx"
OPSET = 11
TOLERANCE = 1e-4  # max abs difference to Paddle on probabilities/logits of a random batch


class OnnxUnavailable(RuntimeError):
    """paddle2onnx or onnxruntime is not installed."""


def convert(inference_dir: Path, out_file: Path, opset: int = OPSET) -> None:
    try:
        import paddle2onnx
    except ImportError:
        raise OnnxUnavailable("ONNX export needs paddle2onnx==1.3.1 and onnxruntime==1.19.2: "
                              "pip install 'rexnet-serving[onnx]'") from None
    out_file.parent.mkdir(parents=True, exist_ok=True)
    paddle2onnx.export(str(inference_dir / MODEL_FILE), str(inference_dir / PARAMS_FILE),
                       save_file=str(out_file), opset_version=opset, auto_upgrade_opset=True,
                       verbose=False, enable_onnx_checker=True)
    if not out_file.is_file() or out_file.stat().st_size == 0:
        raise RuntimeError(f"paddle2onnx wrote no model to {out_file}")


def run_onnx(onnx_file: Path, batch: np.ndarray) -> np.ndarray:
    """Run ``batch`` through ``onnx_file`` with ONNX Runtime on the CPU."""
    try:
        import onnxruntime
    except ImportError:
        raise OnnxUnavailable("checking the ONNX export needs onnxruntime==1.19.2: "
                              "pip install 'rexnet-serving[onnx]'") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(str(onnx_file), options,
                                           providers=["CPUExecutionProvider"])
    feed_name = session.get_inputs()[0].name
    return np.asarray(session.run(None, {feed_name: batch})[0])


def check_against(onnx_file: Path, batch: np.ndarray, expected: np.ndarray,
                  tolerance: float = TOLERANCE) -> float:
    """Max abs difference of ONNX Runtime's output to ``expected``; an error above ``tolerance``."""
    got = run_onnx(onnx_file, batch)
    if got.shape != expected.shape:
        raise RuntimeError(f"{onnx_file}: output shape {got.shape}, Paddle gives {expected.shape}")
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= tolerance:
        raise RuntimeError(f"{onnx_file}: differs from Paddle Inference by {diff:.3g} "
                           f"(> {tolerance:g}) on a random batch")
    return diff
