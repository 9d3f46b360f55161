"""What every predictor runtime shares: the names of the choices and the batch contract.

A predictor (runtimes.paddle.InferenceModel for Paddle Inference, runtimes.openvino.OpenVinoModel for
OpenVINO, runtimes.brpc_remote.RemotePredictor for a bRPC backend) has ``run(batch) -> float32
[N, class_num]``, ``clone()`` for another thread, and the attributes ``manifest``, ``max_batch``,
``device``, ``runtime`` and ``precision`` (what it really runs in); optionally ``warm_up(batch)`` where
one ``run`` would not claim what serving will (OpenVinoModel: every stream at once).
rexnet_serving.runtimes.load_model builds the local ones. This module sits below every runtime module so none imports another, and it
imports neither Paddle nor OpenVINO, so config checks and command-line flags stay light.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

from ..manifest import INFERENCE, MODEL_FILE, PARAMS_FILE, Manifest

RUNTIMES = ("paddle", "openvino")
# fp16: TensorRT on the GPU (runtime paddle); bf16: OpenVINO on a CPU with BF16 instructions.
PRECISIONS = ("fp32", "fp16", "bf16")


class OptionError(ValueError):
    """A runtime option that cannot be used; ``option`` names it ("runtime" or "precision")."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


def check_runtime_options(runtime: str, precision: str, device: str) -> None:
    """OptionError (a ValueError) naming the option when ``runtime`` cannot run ``precision`` on ``device``.

    The one statement of these rules: rexnet_serving.runtimes.load_model, the tools' flags and the
    serving config's checks all call it.
    """
    if runtime not in RUNTIMES:
        raise OptionError("runtime", f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if precision not in PRECISIONS:
        raise OptionError("precision", f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if runtime == "openvino":
        if device != "cpu":
            raise OptionError("runtime", f"runtime openvino runs on the CPU only, not on device {device!r}; "
                                         "use runtime paddle on a GPU")
        if precision == "fp16":
            raise OptionError("precision", "precision fp16 is TensorRT's (runtime paddle on a GPU); runtime "
                                           "openvino takes fp32 or bf16")
    elif precision == "bf16":
        raise OptionError("precision", "precision bf16 needs runtime openvino (runtime paddle runs fp32, or "
                                       "fp16 with TensorRT on a GPU)")
    elif precision == "fp16" and device != "gpu":
        raise OptionError("precision", "precision fp16 with runtime paddle is TensorRT FP16 and needs a GPU; "
                                       "on the CPU use fp32, or runtime openvino with bf16")


def check_batch_shape(manifest: Manifest, max_batch: int, shape: Any) -> None:
    """ValueError unless ``shape`` is [N, 3, S, S] with S the export's input size and 1 <= N <= max_batch."""
    size = manifest.input_size
    shape = tuple(int(d) for d in shape)
    if len(shape) != 4 or shape[1:] != (3, size, size):
        raise ValueError(f"expected a batch of shape [N, 3, {size}, {size}], got {list(shape)}")
    if not 1 <= shape[0] <= max_batch:
        raise ValueError(f"batch size must be 1..{max_batch}, got {shape[0]}")


def model_files(manifest: Manifest) -> Tuple[Path, Path]:
    """``inference/inference.pdmodel`` and ``.pdiparams`` of the export, which both runtimes read: the
    listed files as verify_files resolved them (IntegrityError if unlisted); FileNotFoundError naming
    the one that is missing."""
    files = (manifest.file_in(INFERENCE, MODEL_FILE), manifest.file_in(INFERENCE, PARAMS_FILE))
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"not an exported model directory: {path} is missing (re-run rexnet-export)")
    return files


def runtime_info(model: Any) -> Dict[str, str]:
    """``runtime``, ``precision`` and ``device`` of a predictor, for logs and the /metrics info metric."""
    return {"runtime": str(model.runtime), "precision": str(model.precision), "device": str(model.device)}
