"""Clients of the Open Inference Protocol (KServe v2) endpoints: ``classify`` over gRPC and REST.

The project's ClassifierClient on the v2 API (``rexnet-classify --protocol v2-grpc``, ``rexnet-batch``,
rexnet-bench's senders), for rexnet-serve's v2 ports or any v2 server with this project's model
signature (rexnet_serving/oip/README.md): the images go raw (gRPC ``raw_input_contents``; REST binary
tensor data), the top-k comes back through the classification extension (``"score:index:label"``), and
each refused image through the ``errors`` output. tritonclient would do the calls too, but needs a
newer grpcio/protobuf than the serving stack allows; the generated stub and requests do not.

When no image of a request could be classified the server answers 400 / INVALID_ARGUMENT, which
raises BadRequestError here (the message names every image's reason).
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import grpc
import requests

from ..defaults import DEFAULT_ARCH, OIP_GRPC_PORT, OIP_HTTP_PORT
from ..results import ImageResult, Prediction
from .base import BadRequestError, ClientError, TransientError
from .grpc import _TRANSIENT_CODES
from .http import _RETRYABLE_STATUS, with_default_port

_MESSAGE_BYTES = 256 * 1024 * 1024


def _model_path(model: str, version: str) -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "")


def results_of(classes: Sequence[bytes], errors: Optional[Sequence[bytes]], count: int, k: int) -> List[ImageResult]:
    """Per-image results from the classification strings ([count * k]) and the ``errors`` entries."""
    if len(classes) != count * k:
        raise ClientError(f"sent {count} images but got {len(classes)} classification entries for top-{k}")
    results = []
    for i in range(count):
        error = errors[i] if errors is not None and i < len(errors) else b""
        if error:
            detail = json.loads(error)
            results.append(ImageResult.failure(str(detail["code"]), str(detail["message"])))
            continue
        predictions = []
        for entry in classes[i * k:(i + 1) * k]:
            score, index, label = entry.decode("utf-8").split(":", 2)
            predictions.append(Prediction(int(index), label, float(score)))
        results.append(ImageResult(predictions=predictions))
    return results


class OipGrpcClient:
    """ClassifierClient over v2 gRPC (``inference.GRPCInferenceService/ModelInfer``). Thread-safe."""

    def __init__(self, address: str = f"127.0.0.1:{OIP_GRPC_PORT}", timeout: float = 30.0,
                 model: str = DEFAULT_ARCH, version: str = "", channel: Optional[grpc.Channel] = None) -> None:
        from ..oip.proto import open_inference_grpc_pb2 as pb
        from ..oip.proto import open_inference_grpc_pb2_grpc as pb_grpc
        self.address = with_default_port(address, OIP_GRPC_PORT)
        self.timeout, self.model, self.version = timeout, model, version
        self._pb = pb
        self._channel = channel or grpc.insecure_channel(
            self.address, options=[("grpc.max_send_message_length", _MESSAGE_BYTES),
                                   ("grpc.max_receive_message_length", _MESSAGE_BYTES)])
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    def request(self, images: Sequence[bytes], top_k: int) -> Any:
        from ..oip.tensors import serialize_bytes
        request = self._pb.ModelInferRequest(model_name=self.model, model_version=self.version)
        request.inputs.add(name="image", datatype="BYTES", shape=[len(images)])
        request.raw_input_contents.append(serialize_bytes([bytes(image) for image in images]))
        request.outputs.add(name="probs").parameters["classification"].int64_param = top_k
        request.outputs.add(name="errors")
        return request

    def classify(self, images: Sequence[bytes], top_k: int = 5) -> List[ImageResult]:
        from ..oip.tensors import deserialize_bytes
        if not images:
            raise ValueError("classify needs at least one image")
        try:
            response = self._stub.ModelInfer(self.request(images, top_k), timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            error = TransientError if code in _TRANSIENT_CODES else BadRequestError
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise error(f"{self.address}: gRPC {getattr(code, 'name', code)}: {details}") from None
        raw = {o.name: deserialize_bytes(o.name, data)
               for o, data in zip(response.outputs, response.raw_output_contents)}
        return results_of(raw.get("probs", []), raw.get("errors"), len(images), top_k)

    def close(self) -> None:
        self._channel.close()


class OipHttpClient:
    """ClassifierClient over v2 REST with the binary tensor data extension. Thread-safe (one Session)."""

    def __init__(self, address: str = f"127.0.0.1:{OIP_HTTP_PORT}", timeout: float = 30.0,
                 model: str = DEFAULT_ARCH, version: str = "", session: Optional[requests.Session] = None) -> None:
        address = with_default_port(address, OIP_HTTP_PORT)
        base = address if "://" in address else f"http://{address}"
        self.url = f"{base}{_model_path(model, version)}/infer"
        self.timeout = timeout
        self._session = session or requests.Session()

    @staticmethod
    def request(images: Sequence[bytes], top_k: int) -> Tuple[bytes, Dict[str, str]]:
        from ..oip.tensors import serialize_bytes
        raw = serialize_bytes([bytes(image) for image in images])
        header = json.dumps({
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                        "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [{"name": "probs", "parameters": {"classification": top_k, "binary_data": True}},
                        {"name": "errors", "parameters": {"binary_data": True}}]}).encode()
        return header + raw, {"Inference-Header-Content-Length": str(len(header)),
                              "Content-Type": "application/octet-stream"}

    def classify(self, images: Sequence[bytes], top_k: int = 5) -> List[ImageResult]:
        from ..oip.tensors import deserialize_bytes
        if not images:
            raise ValueError("classify needs at least one image")
        body, headers = self.request(images, top_k)
        try:
            response = self._session.post(self.url, data=body, headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            raise TransientError(f"{self.url}: {exc}") from None
        if response.status_code != 200:
            error = TransientError if response.status_code in _RETRYABLE_STATUS else BadRequestError
            try:
                message = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise error(f"{self.url}: HTTP {response.status_code}: {message}")
        length = int(response.headers.get("Inference-Header-Content-Length", len(response.content)))
        meta, offset, raw = json.loads(response.content[:length]), length, {}
        for output in meta["outputs"]:
            size = output.get("parameters", {}).get("binary_data_size")
            if size is None:
                raw[output["name"]] = [s.encode("utf-8") for s in output["data"]]
            else:
                raw[output["name"]] = deserialize_bytes(output["name"], response.content[offset:offset + size])
                offset += size
        return results_of(raw.get("probs", []), raw.get("errors"), len(images), top_k)

    def close(self) -> None:
        self._session.close()
