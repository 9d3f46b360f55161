"""The predictor runtimes, and ``load_model``: the one way to build a local predictor.

Modules: ``base`` (the interface every predictor has, the runtime and precision names, the option
rules), ``paddle`` (Paddle Inference: CPU with oneDNN, GPU, TensorRT FP16), ``openvino`` (OpenVINO on
the CPU, FP32 or BF16), ``brpc_remote`` (a bRPC GeneralModelService backend; built by the service from
its ``client_type: brpc`` config, not by load_model). ``default_runtime`` is the one statement of which
runtime a device gets when no one says.

Importing this package imports neither Paddle nor OpenVINO: load_model imports the runtime it builds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from ..defaults import MAX_BATCH_IMAGES
from .base import check_runtime_options


def default_runtime(device: str) -> str:
    """The runtime the service and the command-line tools use unless told: OpenVINO on the CPU (about
    twice Paddle Inference's speed there), Paddle Inference on a GPU (OpenVINO here is CPU-only)."""
    return "openvino" if device == "cpu" else "paddle"


def load_model(model_dir: Union[str, Path], runtime: Optional[str] = None, precision: str = "fp32",
               device: str = "cpu", gpu_id: int = 0, cpu_threads: int = 2, mkldnn: bool = True,
               max_batch: int = MAX_BATCH_IMAGES, streams: int = 1) -> Any:
    """The predictor for ``model_dir`` on ``runtime``: InferenceModel or OpenVinoModel.

    Every part that runs a model locally calls it (the Pipeline infer op through Classifier, the bRPC
    endpoint, the benchmark, the offline tools). ``precision``: fp32 (both runtimes), fp16 (paddle on
    the GPU: TensorRT FP16), bf16 (openvino on a CPU with BF16). ``cpu_threads``: math threads per
    predictor; ``streams`` (openvino): infer requests that run at once, each with ``cpu_threads``
    threads (Paddle's clones are separate predictors, so it needs none). ``mkldnn`` (oneDNN) and
    ``gpu_id`` are Paddle's. A combination that cannot run is a ValueError naming the option.

    ``runtime`` None is ``default_runtime(device)``, as for the service and the command-line tools, so a
    library caller (``Classifier(model_dir)``) runs what the service runs on the same device.
    """
    runtime = runtime or default_runtime(device)
    check_runtime_options(runtime, precision, device)
    if runtime == "openvino":
        from .openvino import OpenVinoModel
        return OpenVinoModel(model_dir, precision=precision, cpu_threads=cpu_threads, streams=streams,
                             max_batch=max_batch)
    from .paddle import InferenceModel
    return InferenceModel(model_dir, device=device, gpu_id=gpu_id, cpu_threads=cpu_threads, mkldnn=mkldnn,
                          trt_fp16=precision == "fp16", max_batch=max_batch)
