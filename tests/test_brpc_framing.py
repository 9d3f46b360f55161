"""baidu_std framing and GeneralModelService tensors, byte for byte, without a server or a model."""
from __future__ import annotations

import asyncio
import gzip
import struct
import zlib

import numpy as np
import pytest

from brpc_wire import deflate_bomb

from rexnet_serving.brpc import framing
from rexnet_serving.brpc.framing import (CompressType, Errno, FrameDecoder, FrameError, encode_frame,
                                          parse_header, request_meta, response_meta, split_body)
from rexnet_serving.brpc.rpc_meta_pb2 import RpcMeta
from rexnet_serving.brpc.tensors import ElemType, Tensor, from_tensor, to_tensor

# A request for GeneralModelService/inference, correlation_id 7, log_id 3, payload b"abc", written out by
# hand from docs/cn/baidu_std.md and the field numbers of baidu_rpc_meta.proto.
SERVICE = b"baidu.paddle_serving.predictor.general_model.GeneralModelService"
REQUEST_META = (b"\x0a" + bytes([2 + len(SERVICE) + 2 + 9 + 2])   # RpcMeta.request (1), length-delimited
                + b"\x0a" + bytes([len(SERVICE)]) + SERVICE      #   service_name (1)
                + b"\x12\x09inference"                           #   method_name (2)
                + b"\x18\x03"                                    #   log_id (3) = 3
                + b"\x18\x00"                                    # compress_type (3) = 0
                + b"\x20\x07")                                   # correlation_id (4) = 7
REQUEST_FRAME = b"PRPC" + struct.pack(">II", len(REQUEST_META) + 3, len(REQUEST_META)) + REQUEST_META + b"abc"


def test_request_frame_is_byte_exact():
    meta = request_meta(framing.SERVICE_FULL_NAME, "inference", correlation_id=7, log_id=3)
    assert encode_frame(meta, b"abc") == REQUEST_FRAME


def test_response_frame_is_byte_exact_and_round_trips():
    meta = response_meta(correlation_id=300, error_code=Errno.EREQUEST, error_text="bad")
    frame = encode_frame(meta, b"")
    # response (2) { error_code (1) = 1003 varint e8 07, error_text (2) = "bad" }, correlation_id (4) = 300
    expected_meta = b"\x12\x08\x08\xeb\x07\x12\x03bad" + b"\x20\xac\x02"
    assert frame == b"PRPC" + struct.pack(">II", len(expected_meta), len(expected_meta)) + expected_meta
    body_size, meta_size = parse_header(frame[:12])
    decoded = split_body(frame[12:12 + body_size], meta_size)
    assert decoded.meta.response.error_code == 1003 and decoded.meta.response.error_text == "bad"
    assert decoded.meta.correlation_id == 300 and decoded.payload == b""


def test_attachment_is_split_from_payload():
    frame = encode_frame(request_meta("S", "m", 1), b"payload", attachment=b"ATTACH")
    (decoded,) = FrameDecoder().feed(frame)
    assert decoded.meta.attachment_size == 6
    assert decoded.payload == b"payload" and decoded.attachment == b"ATTACH"
    assert framing.attachment_fits(decoded)


def test_oversized_attachment_size_is_left_for_the_request_check():
    meta = request_meta("S", "m", 1)
    meta.attachment_size = 100
    data = meta.SerializeToString()
    frame = b"PRPC" + struct.pack(">II", len(data) + 4, len(data)) + data + b"tiny"
    (decoded,) = FrameDecoder().feed(frame)
    assert decoded.payload == b"tiny" and not framing.attachment_fits(decoded)


@pytest.mark.parametrize("piece", [1, 2, 5, 11, 12, 13, 64])
def test_decoder_reassembles_frames_split_anywhere(piece):
    frames = [encode_frame(request_meta("S", "inference", cid), bytes([cid]) * cid) for cid in (1, 2, 30)]
    stream = b"".join(frames)
    decoder, out = FrameDecoder(), []
    for start in range(0, len(stream), piece):
        out += decoder.feed(stream[start:start + piece])
    assert [f.meta.correlation_id for f in out] == [1, 2, 30]
    assert [f.payload for f in out] == [b"\x01", b"\x02\x02", b"\x1e" * 30]
    assert decoder.pending == 0


def test_decoder_holds_a_truncated_frame():
    decoder = FrameDecoder()
    assert decoder.feed(REQUEST_FRAME[:-1]) == []
    assert decoder.pending == len(REQUEST_FRAME) - 1
    (frame,) = decoder.feed(REQUEST_FRAME[-1:])
    assert frame.payload == b"abc"


@pytest.mark.parametrize("garbage, message", [
    (b"GET / HTTP/1.1\r\n\r\n", "bad magic"),
    (b"HTTP", "bad magic"),
    (b"PRPX" + b"\x00" * 8, "bad magic"),
    (b"PRPC" + struct.pack(">II", 10, 11), "meta_size=11 is bigger than body_size=10"),
    (b"PRPC" + struct.pack(">II", 64 * 2**20 + 1, 0), "exceeds max_body_size"),
    (b"PRPC" + struct.pack(">II", 3, 3) + b"\xff\xff\xff", "undecodable RpcMeta"),
])
def test_decoder_rejects_garbage(garbage, message):
    with pytest.raises(FrameError, match=message):
        FrameDecoder().feed(garbage)


def test_decoder_fails_on_a_wrong_first_byte_without_waiting_for_a_header():
    with pytest.raises(FrameError, match="bad magic"):
        FrameDecoder().feed(b"G")


def test_max_body_size_is_configurable():
    frame = encode_frame(request_meta("S", "m", 1), b"x" * 100)
    with pytest.raises(FrameError, match="max_body_size=50"):
        FrameDecoder(max_body_size=50).feed(frame)


def _read(chunks, body_timeout=None):
    async def run():
        reader = asyncio.StreamReader()
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        return await framing.read_frame(reader, body_timeout=body_timeout)
    return asyncio.new_event_loop().run_until_complete(run())


def test_async_reader_reads_frames_and_clean_eof():
    frame = _read([REQUEST_FRAME[:3], REQUEST_FRAME[3:20], REQUEST_FRAME[20:]])
    assert frame.meta.request.method_name == "inference" and frame.payload == b"abc"
    assert _read([]) is None


@pytest.mark.parametrize("cut", [1, 5, 11, 12, len(REQUEST_FRAME) - 1])
def test_async_reader_reports_truncation(cut):
    with pytest.raises(FrameError, match="stream ended inside"):
        _read([REQUEST_FRAME[:cut]])


def test_async_reader_times_out_on_a_stalled_frame():
    async def run():
        reader = asyncio.StreamReader()
        reader.feed_data(REQUEST_FRAME[:20])  # never completed, never closed
        return await framing.read_frame(reader, body_timeout=0.2)
    with pytest.raises(FrameError, match="not complete within"):
        asyncio.new_event_loop().run_until_complete(run())


@pytest.mark.parametrize("kind, codec", [(CompressType.GZIP, gzip.compress), (CompressType.ZLIB, zlib.compress)])
def test_payload_codecs(kind, codec):
    assert framing.decompress(codec(b"payload"), kind) == b"payload"
    assert framing.decompress(framing.compress(b"payload", kind), kind) == b"payload"


def test_unsupported_codec_is_named():
    with pytest.raises(ValueError, match="snappy"):
        framing.decompress(b"x", CompressType.SNAPPY)
    with pytest.raises(ValueError, match="compress_type 9"):
        framing.decompress(b"x", 9)


def test_rpc_meta_field_numbers_match_brpc():
    fields = {f.name: f.number for f in RpcMeta.DESCRIPTOR.fields}
    assert fields == {"request": 1, "response": 2, "compress_type": 3, "correlation_id": 4,
                      "attachment_size": 5, "authentication_data": 7}
    request = {f.name: f.number for f in RpcMeta.DESCRIPTOR.fields_by_name["request"].message_type.fields}
    assert request["service_name"] == 1 and request["method_name"] == 2 and request["log_id"] == 3
    response = {f.name: f.number for f in RpcMeta.DESCRIPTOR.fields_by_name["response"].message_type.fields}
    assert response == {"error_code": 1, "error_text": 2}


def test_float_tensor_round_trip_as_paddle_client_sends_it():
    array = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    tensor = to_tensor(array, alias="x", name="x_var")
    assert tensor.elem_type == 1 and list(tensor.shape) == [2, 3, 4, 4]
    assert tensor.alias_name == "x" and tensor.name == "x_var" and len(tensor.float_data) == array.size
    wire = Tensor.FromString(tensor.SerializeToString())
    np.testing.assert_array_equal(from_tensor(wire), array)


@pytest.mark.parametrize("elem, dtype", [(ElemType.INT64, np.int64), (ElemType.INT32, np.int32),
                                         (ElemType.FLOAT64, np.float64), (ElemType.UINT8, np.uint8),
                                         (ElemType.INT8, np.int8), (ElemType.FLOAT16, np.float16)])
def test_other_tensor_types_round_trip(elem, dtype):
    array = (np.arange(12).reshape(3, 4) - 3).astype(dtype)
    np.testing.assert_array_equal(from_tensor(to_tensor(array, alias="v", elem_type=elem)), array)


def test_tensor_shape_mismatch_is_an_error():
    tensor = to_tensor(np.zeros((2, 3), np.float32), alias="x")
    del tensor.shape[:]
    tensor.shape.extend([2, 4])
    with pytest.raises(ValueError, match=r"6 values do not fill shape \[2, 4\]"):
        from_tensor(tensor)
    with pytest.raises(ValueError, match="unsupported elem_type 42"):
        from_tensor(Tensor(elem_type=42))


def test_block_copied_floats_equal_element_wise_encoding():
    array = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    element_wise = Tensor(elem_type=1, name="x", alias_name="x", shape=list(array.shape))
    element_wise.float_data.extend(array.ravel().tolist())
    assert to_tensor(array, alias="x").SerializeToString() == element_wise.SerializeToString()
    np.testing.assert_array_equal(from_tensor(element_wise), array)


def test_unpacked_float_encoding_from_old_senders_decodes():
    # float_data (2) as individual fixed32 fields (wire type 5), shape (11) packed [2], elem_type (10) = 1
    legacy = b"\x15" + struct.pack("<f", 1.5) + b"\x15" + struct.pack("<f", -2.0) + b"\x5a\x01\x02\x50\x01"
    np.testing.assert_array_equal(from_tensor(Tensor.FromString(legacy)), np.array([1.5, -2.0], np.float32))


@pytest.mark.parametrize("kind, wbits", [(CompressType.ZLIB, 15), (CompressType.GZIP, 31)])
def test_decompression_stops_at_the_size_limit(kind, wbits):
    import tracemalloc
    bomb = deflate_bomb(wbits, 256 << 20)  # 256 MiB of zeros in about 250 kB
    tracemalloc.start()
    try:
        with pytest.raises(framing.PayloadTooLarge, match="inflates past max_body_size=8388608"):
            framing.decompress(bomb, kind, max_size=8 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 24 << 20  # the limit plus one inflate step, never the 256 MiB
    # exactly at the limit is fine; one byte more is not
    exact = deflate_bomb(wbits, 8 << 20)
    assert framing.decompress(exact, kind, max_size=8 << 20) == bytes(8 << 20)
    with pytest.raises(framing.PayloadTooLarge):
        framing.decompress(exact, kind, max_size=(8 << 20) - 1)


def test_gzip_members_and_truncated_streams():
    assert framing.decompress(gzip.compress(b"ab") + gzip.compress(b"cd"), CompressType.GZIP) == b"abcd"
    with pytest.raises(EOFError, match="truncated"):
        framing.decompress(zlib.compress(b"payload" * 100)[:-6], CompressType.ZLIB)
    with pytest.raises(zlib.error):
        framing.decompress(b"not zlib at all", CompressType.ZLIB)
