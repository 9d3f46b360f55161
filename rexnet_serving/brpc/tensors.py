"""Paddle Serving's GeneralModelService messages: Tensor <-> NumPy, model configs, and our image feed.

Messages: general_model_service.proto as shipped in paddle_serving_client/proto (Paddle Serving 0.9.0):
``Request{tensor, fetch_var_names, profile_server, log_id}``, ``Response{outputs: ModelOutput{tensor,
engine_name}, profile_time, err_no, err_msg}``; a Tensor carries ``elem_type``, ``shape``, ``name``,
``alias_name`` and its values in the field its element type selects (as the C++ client's
PredictorInputs::GenProto fills it).

Two feed forms reach this service:

* tensor feeds, exactly as ``paddle_serving_client.Client`` sends them: one Tensor per feed variable of
  serving_client_conf.prototxt (``alias_name`` = the feed alias, float32 values in ``float_data``, shape
  with the batch dimension first); the reply holds the requested fetch variables the same way;
* an image feed for clients that want the service's decoding and preprocessing: one Tensor per encoded
  image with ``alias_name`` "image" and either ``elem_type`` 7 (uint8) with the file's bytes in
  ``tensor_content``, or ``elem_type`` 20 (string) with the file base64-encoded in ``data`` (one entry per
  image; proto3 strings must be UTF-8, so raw bytes cannot go there); an optional int64 Tensor "top_k"
  (one value, default 5). The reply holds one string Tensor "predictions" whose ``data`` has one JSON
  document per image, in request order, in rexnet_serving.results' wire form.
"""
from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import Tuple, Union

import numpy as np
from google.protobuf import text_format
from paddle_serving_client.proto import general_model_config_pb2 as model_config_pb2
from paddle_serving_client.proto import general_model_service_pb2 as service_pb2

Request = service_pb2.Request
Response = service_pb2.Response
Tensor = service_pb2.Tensor
ModelOutput = service_pb2.ModelOutput
GeneralModelConfig = model_config_pb2.GeneralModelConfig

IMAGE_FEED = "image"
TOP_K_FEED = "top_k"
PREDICTIONS_FETCH = "predictions"
DEFAULT_TOP_K = 5
# The name C++ Serving gives its single inference op; clients key multi-model replies by it.
ENGINE_NAME = "GeneralInferOp_0"


class ElemType(enum.IntEnum):
    """Paddle Serving's element type codes (paddle_serving_client/client.py, core/predictor)."""
    INT64 = 0
    FLOAT32 = 1
    INT32 = 2
    FLOAT64 = 3
    FLOAT16 = 5
    UINT8 = 7
    INT8 = 8
    STRING = 20


DTYPES = {ElemType.INT64: np.int64, ElemType.FLOAT32: np.float32, ElemType.INT32: np.int32,
          ElemType.FLOAT64: np.float64, ElemType.FLOAT16: np.float16, ElemType.UINT8: np.uint8,
          ElemType.INT8: np.int8}
_REPEATED_FIELD = {ElemType.INT64: "int64_data", ElemType.FLOAT32: "float_data",
                   ElemType.INT32: "int_data", ElemType.FLOAT64: "float64_data"}
# Fixed-width repeated fields: on the wire (proto3 packs repeated scalars) their payload is the plain
# little-endian array, so it is moved as one block of bytes instead of element by element through Python
# (~100x faster for a 3x224x224 image; Paddle Serving's C++ client memcpy's it for the same reason).
_FIXED_WIDTH = {ElemType.FLOAT32: (Tensor.DESCRIPTOR.fields_by_name["float_data"].number, "<f4"),
                ElemType.FLOAT64: (Tensor.DESCRIPTOR.fields_by_name["float64_data"].number, "<f8")}
_LENGTH_DELIMITED = 2  # protobuf wire type of packed repeated fields, strings and bytes


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


# Fields one Request may hold on the wire, its Tensors' included (each element of a repeated string is
# one; packed numbers are one per tensor). Image feeds hold a few hundred at most, tensor feeds a few.
MAX_WIRE_FIELDS = 65_536
_TENSOR_FIELD = Request.DESCRIPTOR.fields_by_name["tensor"].number


class TooManyFields(ValueError):
    """A request message holds more fields than MAX_WIRE_FIELDS (refused before parsing)."""


def check_wire_fields(payload: bytes, limit: int = MAX_WIRE_FIELDS) -> None:
    """TooManyFields when a serialized Request holds more than ``limit`` fields, counted before it is
    parsed; a malformed one is left to the parser to report.

    Why: protobuf's parser spends ~60-90 bytes per repeated-string element, so a 16 MiB image feed of
    5.6 million 1-byte strings raised peak RSS by ~500 MB before any count could be checked. The count
    stops at ``limit``, so this costs at most that many steps, whatever the payload.
    """
    try:
        _count_fields(payload, limit)
    except TooManyFields:
        raise
    except (ValueError, IndexError):
        return


def _count_fields(payload: bytes, limit: int) -> None:
    count, spans = 0, [(0, len(payload), True)]
    while spans:
        pos, end, top = spans.pop()
        while pos < end:
            key, pos = _read_varint(payload, pos)
            count += 1
            if count > limit:
                raise TooManyFields(f"the request holds more than {limit} protobuf fields (e.g. image strings); "
                                 "send at most the images one request may carry")
            wire = key & 7
            if wire == 0:
                _, pos = _read_varint(payload, pos)
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            elif wire == _LENGTH_DELIMITED:
                length, pos = _read_varint(payload, pos)
                if top and key >> 3 == _TENSOR_FIELD:
                    spans.append((pos, min(pos + length, end), False))
                pos += length
            else:
                raise ValueError(f"unexpected wire type {wire}")


def _packed_field(data: bytes, number: int) -> bytes:
    """The concatenated payloads of length-delimited field ``number`` in a serialized message."""
    pos, chunks = 0, []
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == _LENGTH_DELIMITED:
            length, pos = _read_varint(data, pos)
            if field == number:
                chunks.append(data[pos:pos + length])
            pos += length
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return b"".join(chunks)


def to_tensor(array: np.ndarray, alias: str, name: str = "", elem_type: int = ElemType.FLOAT32) -> Tensor:
    """A Tensor as Paddle Serving's client fills it (typed repeated field, or raw bytes for 8/16-bit)."""
    elem = ElemType(elem_type)
    if elem == ElemType.STRING:
        raise ValueError("string tensors carry text in `data`; build them directly")
    values = np.ascontiguousarray(array, dtype=DTYPES[elem])
    tensor = Tensor(elem_type=int(elem), name=name or alias, alias_name=alias, shape=list(values.shape))
    if elem in _FIXED_WIDTH:
        number, wire_dtype = _FIXED_WIDTH[elem]
        raw = values.astype(wire_dtype, copy=False).tobytes()
        tensor.MergeFromString(_varint(number << 3 | _LENGTH_DELIMITED) + _varint(len(raw)) + raw)
    elif elem in _REPEATED_FIELD:
        getattr(tensor, _REPEATED_FIELD[elem]).extend(values.ravel().tolist())
    else:
        tensor.tensor_content = values.tobytes()
    return tensor


def from_tensor(tensor: Tensor) -> Union[np.ndarray, list]:
    """The tensor's values with its shape; ValueError when the values do not fill the shape."""
    try:
        elem = ElemType(tensor.elem_type)
    except ValueError:
        raise ValueError(f"tensor {tensor_label(tensor)}: unsupported elem_type {tensor.elem_type}") from None
    if elem == ElemType.STRING:
        return list(tensor.data)
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor {tensor_label(tensor)}: negative dimension in shape {list(shape)}")
    if elem in _FIXED_WIDTH:
        number, wire_dtype = _FIXED_WIDTH[elem]
        values = np.frombuffer(_packed_field(tensor.SerializeToString(), number), dtype=wire_dtype)
        values = values.astype(DTYPES[elem], copy=False)
    elif elem in _REPEATED_FIELD:
        values = np.asarray(getattr(tensor, _REPEATED_FIELD[elem]), dtype=DTYPES[elem])
    else:
        content = tensor.tensor_content
        itemsize = np.dtype(DTYPES[elem]).itemsize
        if len(content) % itemsize:
            raise ValueError(f"tensor {tensor_label(tensor)}: {len(content)} bytes is not a whole number "
                             f"of {np.dtype(DTYPES[elem]).name} values")
        values = np.frombuffer(content, dtype=DTYPES[elem])
    expected = math.prod(shape)  # Python ints: a forged shape cannot overflow
    if values.size != expected:
        raise ValueError(f"tensor {tensor_label(tensor)}: {values.size} values do not fill shape {list(shape)}")
    return values.reshape(shape)


def tensor_label(tensor: Tensor) -> str:
    return repr(tensor.alias_name or tensor.name or "<unnamed>")


def load_model_config(path: Union[str, Path]) -> GeneralModelConfig:
    """serving_{server,client}_conf.prototxt (a file, or the directory holding one) as a message."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "serving_client_conf.prototxt", path / "serving_server_conf.prototxt"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no serving_client_conf.prototxt or serving_server_conf.prototxt")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model config")
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), GeneralModelConfig())
    except text_format.ParseError as exc:
        raise ValueError(f"{path}: not a GeneralModelConfig prototxt: {exc}") from None

