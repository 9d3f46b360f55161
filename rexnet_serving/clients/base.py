"""What every client (HTTP, gRPC, bRPC) offers, and the errors that tell retryable from not."""
from __future__ import annotations

import importlib
from typing import Any, Dict, List, Protocol, Sequence

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
}


def make_client(protocol: str, address: str, timeout: float = 30.0, **options: Any) -> ClassifierClient:
    """Build the client for ``protocol`` ("http", "grpc" or "brpc") talking to ``address`` (host:port)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    module_name, factory = PROTOCOLS[protocol].split(":")
    return getattr(importlib.import_module(module_name), factory)(address, timeout=timeout, **options)
