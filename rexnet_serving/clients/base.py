"""What every client (HTTP, gRPC, bRPC) offers, and the errors that tell retryable from not."""
from __future__ import annotations

import importlib
from typing import Any, Dict, List, Protocol, Sequence

from .. import defaults
from ..results import ImageResult


class ClientError(Exception):
    """A request that failed as a whole."""


class TransientError(ClientError):
    """Worth retrying: connection refused or reset, timeout, server overloaded or draining."""


class BadRequestError(ClientError):
    """The request itself is wrong (the service said so): retrying cannot help."""


class ClassifierClient(Protocol):
    def classify(self, images: Sequence[bytes], top_k: int = 5) -> List[ImageResult]:
        """Send encoded images (JPEG, PNG, ...) in one request; one result per image, in order."""

    def close(self) -> None:
        ...


# protocol name -> "module:factory"; each factory takes (address: str, timeout: float, **options).
PROTOCOLS: Dict[str, str] = {
    "http": "rexnet_serving.clients.http:HttpClient",
    "grpc": "rexnet_serving.clients.grpc:GrpcClient",
    "brpc": "rexnet_serving.clients.brpc:BrpcClient",
    "v2-http": "rexnet_serving.clients.oip:OipHttpClient",   # Open Inference Protocol (KServe v2) REST
    "v2-grpc": "rexnet_serving.clients.oip:OipGrpcClient",   # ... and gRPC
}


# protocol name -> the port its client talks to when no address names one.
DEFAULT_PORTS: Dict[str, int] = {"http": defaults.HTTP_PORT, "grpc": defaults.GRPC_PORT, "brpc": defaults.BRPC_PORT,
                                 "v2-http": defaults.OIP_HTTP_PORT, "v2-grpc": defaults.OIP_GRPC_PORT}


def make_client(protocol: str, address: str, timeout: float = 30.0, **options: Any) -> ClassifierClient:
    """Build the client for ``protocol`` ("http", "grpc", "brpc", "v2-http", "v2-grpc") talking to ``address``
    (host:port)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    module_name, factory = PROTOCOLS[protocol].split(":")
    return getattr(importlib.import_module(module_name), factory)(address, timeout=timeout, **options)
