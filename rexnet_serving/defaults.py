"""Defaults defined once: service name, ports, default model. Everything else imports them from here."""
from __future__ import annotations

import os
from pathlib import Path

SERVICE_NAME = "rexnet"
HTTP_PORT = 18080  # Pipeline HTTP gateway (PaddleClas's convention)
GRPC_PORT = 9993   # Pipeline gRPC PipelineService (PaddleClas's convention)
BRPC_PORT = 9393   # baidu_std GeneralModelService (Paddle Serving's C++ Serving default)
METRICS_PORT = 18081  # health (/healthz, /readyz) and Prometheus /metrics

DEFAULT_ARCH = "ReXNet_1_0"
LABELS_FILE = Path(__file__).resolve().parent / "data" / "imagenet1k_label_list.txt"

# Where exported models live: models/<arch>, relative to the current working directory.
MODELS_DIR = Path("models")
MODEL_DIR_ENV = "REXNET_MODEL_DIR"  # overrides default_model_dir() when set
WEIGHTS_ENV = "REXNET_WEIGHTS"      # PaddleClas's ReXNet_1_0_pretrained.pdparams, when available


def default_model_dir(arch: str = DEFAULT_ARCH) -> Path:
    """The model directory rexnet-export writes and the service loads: $REXNET_MODEL_DIR, else
    models/<arch>."""
    override = os.environ.get(MODEL_DIR_ENV)
    return Path(override) if override else MODELS_DIR / arch

# Images per forward pass (an auto-batch holding more runs in chunks of this size; TensorRT's engine
# profile is built for 1..this many). Images per request: rexnet_serving.imageio.DecodeLimits.
MAX_BATCH_IMAGES = 32


def device_of(device_type: int) -> str:
    """``cpu`` or ``gpu`` for Paddle Serving's ``device_type`` (0 CPU, 1 GPU, 2 GPU with TensorRT)."""
    return "cpu" if device_type == 0 else "gpu"


# Open Inference Protocol (KServe v2) endpoints: Triton's and KServe's default ports.
OIP_HTTP_PORT = 8000  # REST /v2/...
OIP_GRPC_PORT = 8001  # inference.GRPCInferenceService
