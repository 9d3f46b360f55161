"""The Open Inference Protocol over HTTP/REST as one plain function, mounted by any HTTP server.

    status, headers, body = handle_rest(service, "POST", "/v2/models/ReXNet_1_0/infer", headers, body)

Routes (specification/protocol/inference_rest.md): ``GET /v2/health/live``, ``/v2/health/ready``,
``/v2``, ``/v2/models/{name}[/versions/{v}]``, ``.../ready``, ``POST .../infer``. Health answers 200 or
503 with an empty body, as the spec's "non-200 means not ready" allows and Kubernetes probes expect.
Errors: ``{"error": "..."}`` with 400 (bad request), 404 (unknown model, version or route), 405, 503.

Binary tensor data extension (Triton's, what tritonclient sends by default): the body is the JSON
header (``Inference-Header-Content-Length`` bytes) followed by each input that carries
``parameters.binary_data_size``, in input order. Outputs asked for with ``parameters.binary_data``
(or the request's ``parameters.binary_data_output``) are appended the same way in the response.
In plain JSON, ``image`` elements are base64 strings of the files (JSON cannot carry raw bytes), and
BYTES outputs (classification strings, ``errors``) are UTF-8 strings.

Hand-written rather than taken from a library: KServe's and Triton's Python servers bring their own
web frameworks (FastAPI, C++), and tritonclient holds only the client side of this format.
"""
from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from ..jsonbody import DEFAULT_MAX_VALUES, JsonBodyError, ascii_uint, load_json
from .service import OipService
from .tensors import (BYTES, InferRequest, InferResponse, InputTensor, OipError, RequestedOutput, check_shape,
                      datatype_check, invalid, raw_of, tensor_from_list, tensor_from_raw)

HEADER_LENGTH = "inference-header-content-length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
Headers = Dict[str, str]
Response = Tuple[int, Headers, bytes]

_MODEL = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
_ROUTES = [
    (re.compile(r"^/v2/health/live$"), "GET", "live"),
    (re.compile(r"^/v2/health/ready$"), "GET", "ready"),
    (re.compile(r"^/v2/?$"), "GET", "server_metadata"),
    (re.compile(f"^{_MODEL}/?$"), "GET", "model_metadata"),
    (re.compile(f"^{_MODEL}/ready$"), "GET", "model_ready"),
    (re.compile(f"^{_MODEL}/infer$"), "POST", "infer"),
]


def _json(status: int, data: Any) -> Response:
    return status, {"Content-Type": JSON_TYPE}, json.dumps(data).encode()


def _error(status: int, message: str) -> Response:
    return _json(status, {"error": message})


def _health(ok: bool) -> Response:
    return (200 if ok else 503), {"Content-Length": "0"}, b""


def handle_rest(service: OipService, method: str, path: str, headers: Mapping[str, str],
                body: Union[bytes, bytearray], options: Optional[Dict[str, Any]] = None,
                max_json_values: int = DEFAULT_MAX_VALUES) -> Response:
    """Answer one HTTP request; never raises for bad input (an error response instead).

    ``options``: transport hints handed to the model with an infer request (InferRequest.options);
    ``max_json_values``: the most JSON values the request header may hold (rexnet_serving.jsonbody)."""
    path = path.split("?", 1)[0]
    lowered = {k.lower(): v for k, v in headers.items()}
    for pattern, allowed, action in _ROUTES:
        match = pattern.match(path)
        if match is None:
            continue
        if method.upper() != allowed:
            return 405, {"Allow": allowed, "Content-Type": JSON_TYPE}, json.dumps(
                {"error": f"{method} not allowed on {path} (use {allowed})"}).encode()
        args = {k: v for k, v in match.groupdict().items()}
        try:
            return _dispatch(service, action, args.get("name") or "", args.get("version") or "", lowered, body,
                             options or {}, max_json_values)
        except OipError as exc:
            return _error(exc.http_status, exc.message)
    return _error(404, f"no such endpoint: {path}")


def _dispatch(service: OipService, action: str, name: str, version: str, headers: Headers,
              body: Union[bytes, bytearray], options: Dict[str, Any], max_json_values: int) -> Response:
    if action == "live":
        return _health(service.live())
    if action == "ready":
        return _health(service.ready())
    if action == "server_metadata":
        return _json(200, service.server_metadata())
    if action == "model_metadata":
        return _json(200, service.model_metadata(name, version))
    if action == "model_ready":
        return _health(service.model_ready(name, version))
    service.model(name, version)  # 404 before parsing the body
    request, binary_default = parse_infer_request(headers, body, max_json_values)
    request.options = options
    return encode_infer_response(service.infer(name, version, request), binary_default)


# -- request ---------------------------------------------------------------------------------------
def _header_length(headers: Headers, body: Union[bytes, bytearray]) -> Optional[int]:
    value = headers.get(HEADER_LENGTH)
    if value is None:
        return None
    length = ascii_uint(value)
    if length is None or length > len(body):
        raise invalid(f"Inference-Header-Content-Length {value[:40]!r} must be an integer 0..{len(body)} "
                      "(the body's size)")
    return length


def _flatten(values: Any) -> List[Any]:
    if not isinstance(values, list):
        return [values]
    flat: List[Any] = []
    stack = [iter(values)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _parameters(where: str, data: Mapping[str, Any]) -> Dict[str, Any]:
    params = data.get("parameters", {})
    if not isinstance(params, dict):
        raise invalid(f"{where}: parameters must be an object")
    return params


def parse_infer_request(headers: Headers, body: Union[bytes, bytearray],
                        max_json_values: int = DEFAULT_MAX_VALUES) -> Tuple[InferRequest, bool]:
    """The request, and whether outputs default to binary (``parameters.binary_data_output``).

    The JSON header's values are counted before it is parsed (``max_json_values``): what parsing may
    allocate is known from the bytes (rexnet_serving.jsonbody)."""
    if headers.get("content-encoding", "identity").lower() not in ("identity", ""):
        raise invalid(f"Content-Encoding {headers['content-encoding']!r} is not supported; send the body uncompressed")
    length = _header_length(headers, body)
    header, binary = (body, memoryview(b"")) if length is None else (body[:length], memoryview(body)[length:])
    try:
        data = load_json(header, max_json_values, "the request")
    except JsonBodyError as exc:
        raise invalid(str(exc)) from None
    if not isinstance(data, dict):
        raise invalid("the request must be a JSON object")
    params = _parameters("request", data)
    inputs_data = data.get("inputs")
    if not isinstance(inputs_data, list) or not inputs_data:
        raise invalid("the request needs a non-empty 'inputs' list")
    inputs: List[InputTensor] = []
    offset = 0
    for item in inputs_data:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise invalid("each input must be an object with a 'name'")
        name = item["name"]
        datatype = datatype_check(name, item.get("datatype"))
        shape = check_shape(name, item.get("shape"))
        size = _parameters(f"input '{name}'", item).get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise invalid(f"input '{name}': binary_data_size {size!r} does not fit the {len(binary) - offset} "
                              "binary bytes left in the body")
            array = tensor_from_raw(name, datatype, shape, binary[offset:offset + size])
            offset += size
        elif "data" in item:
            array = tensor_from_list(name, datatype, shape, _flatten(item["data"]))
        else:
            raise invalid(f"input '{name}' has neither 'data' nor parameters.binary_data_size")
        inputs.append(InputTensor(name, datatype, shape, array))
    if offset != len(binary):
        raise invalid(f"{len(binary) - offset} bytes of binary data in the body belong to no input")
    outputs = None
    if "outputs" in data:
        if not isinstance(data["outputs"], list):
            raise invalid("'outputs' must be a list")
        outputs = [_requested(out) for out in data["outputs"]]
    request_id = data.get("id", "")
    if not isinstance(request_id, str):
        raise invalid("'id' must be a string")
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise invalid("parameters.binary_data_output must be true or false")
    return InferRequest(inputs=inputs, outputs=outputs, id=request_id, parameters=params), binary_default


def _requested(out: Any) -> RequestedOutput:
    if not isinstance(out, dict) or not isinstance(out.get("name"), str):
        raise invalid("each requested output must be an object with a 'name'")
    params = _parameters(f"output '{out['name']}'", out)
    binary = params.get("binary_data")
    if binary is not None and not isinstance(binary, bool):
        raise invalid(f"output '{out['name']}': parameters.binary_data must be true or false")
    return RequestedOutput(out["name"], params.get("classification", 0), binary)


# -- response --------------------------------------------------------------------------------------
def _json_data(datatype: str, array: Any) -> List[Any]:
    flat = array.reshape(-1)
    if datatype == BYTES:
        return [item.decode("utf-8", errors="replace") for item in flat]
    return flat.tolist()


def encode_infer_response(response: InferResponse, binary_default: bool = False) -> Response:
    outputs: List[Dict[str, Any]] = []
    chunks: List[bytes] = []
    for output in response.outputs:
        entry: Dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        asked = response.requested.get(output.name)
        binary = asked.binary if asked is not None and asked.binary is not None else binary_default
        if binary:
            raw = raw_of(output)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_data(output.datatype, output.data)
        outputs.append(entry)
    data: Dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version,
                            "outputs": outputs}
    if response.id:
        data["id"] = response.id
    header = json.dumps(data).encode()
    if not chunks:
        return 200, {"Content-Type": JSON_TYPE}, header
    return 200, {"Content-Type": BINARY_TYPE, "Inference-Header-Content-Length": str(len(header))}, \
        header + b"".join(chunks)

