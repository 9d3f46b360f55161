"""The Open Inference Protocol's tensors and errors, independent of HTTP and gRPC.

Spec: https://github.com/kserve/open-inference-protocol (specification/protocol/inference_rest.md,
inference_grpc.md). Data types are the protocol's names (``FP32``, ``BYTES``, ...); a BYTES tensor's
binary form (REST binary extension, gRPC ``raw_*_contents``) is each element as a 4-byte little-endian
length followed by its bytes, as Triton and tritonclient write it.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

# The protocol's data types and their NumPy equivalents (BYTES is an object array of bytes).
DTYPES: Dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}
BYTES = "BYTES"
FP32 = "FP32"

# Error kinds: the gRPC status name, and the HTTP status the REST side answers with.
INVALID_ARGUMENT = "INVALID_ARGUMENT"
NOT_FOUND = "NOT_FOUND"
UNAVAILABLE = "UNAVAILABLE"          # not ready, draining, overloaded: retry elsewhere or later
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
INTERNAL = "INTERNAL"
HTTP_STATUS = {INVALID_ARGUMENT: 400, NOT_FOUND: 404, UNAVAILABLE: 503, DEADLINE_EXCEEDED: 504, INTERNAL: 500}


class OipError(Exception):
    """A request the protocol answers with an error: ``kind`` is one of the names above."""

    def __init__(self, kind: str, message: str) -> None:
        if kind not in HTTP_STATUS:
            raise ValueError(f"unknown error kind {kind!r}")
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.kind]


def invalid(message: str) -> OipError:
    return OipError(INVALID_ARGUMENT, message)


Element = Union[bytes, str]  # a BYTES element: raw bytes, or text from REST JSON


@dataclass
class InputTensor:
    """One request input; ``data`` is a NumPy array of ``shape`` (an object array for BYTES)."""

    name: str
    datatype: str
    shape: Tuple[int, ...]
    data: np.ndarray


@dataclass
class RequestedOutput:
    name: str
    classification: int = 0          # > 0: Triton's classification extension, top-k strings
    binary: Optional[bool] = None    # REST binary tensor data extension (None: the request default)


@dataclass
class InferRequest:
    inputs: List[InputTensor]
    outputs: Optional[List[RequestedOutput]] = None  # None: every default output
    id: str = ""
    parameters: Dict[str, Any] = field(default_factory=dict)
    # Transport hints for the model, opaque to the protocol: ``timeout_s`` (the client's remaining
    # deadline) and ``cancel_hook`` (called with a function to run when the client goes away).
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: Tuple[int, ...]
    data: np.ndarray  # an object array of bytes for BYTES


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    outputs: List[OutputTensor]
    id: str = ""
    requested: Dict[str, RequestedOutput] = field(default_factory=dict)  # by output name, as asked


_MAX_DIM = 2**63 - 1  # the protocol's shapes are int64


def check_shape(name: str, shape: Sequence[Any]) -> Tuple[int, ...]:
    """A request tensor's shape as ints 0..2**63-1; INVALID_ARGUMENT naming the input otherwise."""
    if not isinstance(shape, (list, tuple)) or not all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape):
        text = repr(shape)
        raise invalid(f"input '{name}': shape must be a list of integers 0..2**63-1, got "
                      f"{text if len(text) <= 80 else text[:80] + '...'}")
    return tuple(shape)


def element_count(shape: Sequence[int]) -> int:
    """Exact (Python ints): a forged shape must not wrap around to a small count."""
    return math.prod(shape)


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """BYTES elements in the binary form: <uint32 LE length><bytes> each."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def deserialize_bytes(name: str, buffer: Union[bytes, memoryview]) -> List[bytes]:
    """The binary form back into elements; INVALID_ARGUMENT when a length runs past the end."""
    view = memoryview(buffer)
    items: List[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise invalid(f"input '{name}': BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise invalid(f"input '{name}': BYTES element of {length} bytes runs past the end of the data")
        items.append(bytes(view[offset:offset + length]))
        offset += length
    return items


def tensor_from_raw(name: str, datatype: str, shape: Tuple[int, ...], raw: Union[bytes, memoryview]) -> np.ndarray:
    """An input from its binary form (REST binary extension, gRPC raw_input_contents)."""
    count = element_count(shape)
    if datatype == BYTES:
        items = deserialize_bytes(name, raw)
        if len(items) != count:
            raise invalid(f"input '{name}': shape {list(shape)} holds {count} elements, the data has {len(items)}")
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape)
    dtype = np.dtype(DTYPES[datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise invalid(f"input '{name}': shape {list(shape)} of {datatype} needs {count * dtype.itemsize} bytes, "
                      f"got {len(raw)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def tensor_from_list(name: str, datatype: str, shape: Tuple[int, ...], values: Sequence[Any]) -> np.ndarray:
    """An input from a flat sequence of values (REST JSON ``data``, gRPC typed ``contents``), counted
    before anything is converted."""
    count = element_count(shape)
    if len(values) != count:
        raise invalid(f"input '{name}': shape {list(shape)} holds {count} elements, the data has {len(values)}")
    if datatype == BYTES:
        if not all(isinstance(v, (bytes, str)) for v in values):
            raise invalid(f"input '{name}': BYTES data must be strings")
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    try:
        if isinstance(values, list):
            array = np.asarray(values, dtype=DTYPES[datatype])
        else:  # a protobuf repeated field: one value at a time, no list of Python numbers beside it
            array = np.fromiter(values, dtype=DTYPES[datatype], count=count)
        return array.reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:  # wrong types, 2**70 or 1e400 for an integer type
        raise invalid(f"input '{name}': data is not {datatype}: {exc}") from None


def raw_of(output: OutputTensor) -> bytes:
    """An output's binary form (REST binary extension, gRPC raw_output_contents)."""
    if output.datatype == BYTES:
        return serialize_bytes(list(output.data.reshape(-1)))
    return np.ascontiguousarray(output.data, dtype=np.dtype(DTYPES[output.datatype]).newbyteorder("<")).tobytes()


def datatype_check(name: str, datatype: Any) -> str:
    if datatype not in DTYPES:
        raise invalid(f"input '{name}': unknown datatype {datatype!r} (one of {', '.join(DTYPES)})")
    return datatype
