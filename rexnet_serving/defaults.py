"""Defaults defined once: service name, ports, default model. Everything else imports them from here."""
from __future__ import annotations

from pathlib import Path

SERVICE_NAME = "rexnet"
HTTP_PORT = 18080  # Pipeline HTTP gateway (PaddleClas's convention)
GRPC_PORT = 9993   # Pipeline gRPC PipelineService (PaddleClas's convention)
BRPC_PORT = 9393   # baidu_std GeneralModelService (Paddle Serving's C++ Serving default)
METRICS_PORT = 18081  # health (/healthz, /readyz) and Prometheus /metrics

DEFAULT_ARCH = "ReXNet_1_0"
LABELS_FILE = Path(__file__).resolve().parent / "data" / "imagenet1k_label_list.txt"
