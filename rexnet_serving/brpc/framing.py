"""baidu_std framing: the wire format of bRPC (and so of Paddle Serving's C++ Serving) over TCP.

Spec: bRPC's docs/cn/baidu_std.md. A frame is a 12-byte header -- the ASCII magic ``PRPC``, the body size
and the meta size as big-endian uint32 -- then the body: a serialized ``RpcMeta`` (rpc_meta.proto), the
payload (the method's request or response message, possibly compressed) and an optional attachment whose
length is ``RpcMeta.attachment_size``. Error codes are bRPC's (src/brpc/errno.proto).

Both the server (asyncio) and the client (blocking socket) use the pieces here: ``parse_header`` and
``split_body`` for one frame, ``FrameDecoder`` for a byte stream that arrives in arbitrary pieces.
"""
from __future__ import annotations

import asyncio
import enum
import gzip
import struct
import zlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from google.protobuf.message import DecodeError

from .rpc_meta_pb2 import RpcMeta

MAGIC = b"PRPC"
HEADER = struct.Struct(">4sII")  # magic, body size, meta size; network byte order
HEADER_SIZE = HEADER.size
DEFAULT_MAX_BODY_SIZE = 64 * 1024 * 1024  # bRPC's -max_body_size default

# The Paddle Serving service this package speaks (general_model_service.proto, package
# baidu.paddle_serving.predictor.general_model).
SERVICE_FULL_NAME = "baidu.paddle_serving.predictor.general_model.GeneralModelService"
SERVICE_SHORT_NAME = "GeneralModelService"


class Errno(enum.IntEnum):
    """The brpc::Errno values this package sends or understands (src/brpc/errno.proto)."""
    ENOSERVICE = 1001    # service not found
    ENOMETHOD = 1002     # method not found
    EREQUEST = 1003      # bad request
    ERPCTIMEDOUT = 1008  # RPC call timed out
    EFAILEDSOCKET = 1009  # broken socket
    EOVERCROWDED = 1011  # the server is overcrowded
    EINTERNAL = 2001     # internal server error
    ERESPONSE = 2002     # bad response
    ELOGOFF = 2003       # server is stopping
    ELIMIT = 2004        # reached the server's limit on resources


# Worth retrying elsewhere or later; everything else in the 1xxx range is the caller's fault.
TRANSIENT_ERRNOS = frozenset({Errno.EOVERCROWDED, Errno.EINTERNAL, Errno.ELOGOFF, Errno.ELIMIT,
                              Errno.ERPCTIMEDOUT, Errno.EFAILEDSOCKET})


class CompressType(enum.IntEnum):
    """brpc::CompressType (src/brpc/options.proto); snappy has no standard-library codec here."""
    NONE = 0
    SNAPPY = 1
    GZIP = 2
    ZLIB = 3


class FrameError(Exception):
    """The byte stream is not baidu_std (or breaks a limit): the connection cannot continue."""


@dataclass(frozen=True)
class Frame:
    meta: RpcMeta
    payload: bytes
    attachment: bytes = b""
    skipped: bool = False  # the body was not admitted (read_frame's ``admit``): read past, not kept


# A frame whose body is not admitted is still answered, so its meta (correlation id) is read; it must be
# small, as real RpcMeta are (tens of bytes), or the frame is garbage.
MAX_SKIPPED_META_SIZE = 64 * 1024


def encode_frame(meta: RpcMeta, payload: bytes = b"", attachment: bytes = b"") -> bytes:
    """Header + meta + payload + attachment; sets ``meta.attachment_size`` when there is an attachment."""
    if attachment:
        meta.attachment_size = len(attachment)
    meta_bytes = meta.SerializeToString()
    body_size = len(meta_bytes) + len(payload) + len(attachment)
    return HEADER.pack(MAGIC, body_size, len(meta_bytes)) + meta_bytes + payload + attachment


def parse_header(header: bytes, max_body_size: int = DEFAULT_MAX_BODY_SIZE) -> Tuple[int, int]:
    """(body size, meta size) of a 12-byte header; FrameError for a bad magic, size or meta size."""
    if len(header) != HEADER_SIZE:
        raise FrameError(f"header is {len(header)} bytes, baidu_std needs {HEADER_SIZE}")
    magic, body_size, meta_size = HEADER.unpack(header)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}: not a baidu_std frame (expected {MAGIC!r})")
    if body_size > max_body_size:
        raise FrameError(f"body_size={body_size} exceeds max_body_size={max_body_size}")
    if meta_size > body_size:
        raise FrameError(f"meta_size={meta_size} is bigger than body_size={body_size}")
    return body_size, meta_size


def parse_meta(data: bytes) -> RpcMeta:
    meta = RpcMeta()
    try:
        meta.ParseFromString(data)
    except DecodeError as exc:
        raise FrameError(f"undecodable RpcMeta: {exc}") from None
    return meta


def split_body(body: bytes, meta_size: int) -> Frame:
    """Cut a frame body into meta, payload and attachment; FrameError when the meta is garbage.

    An attachment_size larger than what follows the meta is a request error, not a framing one
    (bRPC answers it with EREQUEST), so it is left for the caller to check with ``attachment_fits``.
    """
    meta = parse_meta(body[:meta_size])
    rest = body[meta_size:]
    size = meta.attachment_size if meta.HasField("attachment_size") else 0
    if 0 < size <= len(rest):
        return Frame(meta, rest[:len(rest) - size], rest[len(rest) - size:])
    return Frame(meta, rest)


def attachment_fits(frame: Frame) -> bool:
    size = frame.meta.attachment_size if frame.meta.HasField("attachment_size") else 0
    return 0 <= size == len(frame.attachment)


class FrameDecoder:
    """Turns a byte stream into frames, whatever the piece boundaries (partial headers, split bodies)."""

    def __init__(self, max_body_size: int = DEFAULT_MAX_BODY_SIZE) -> None:
        self.max_body_size = max_body_size
        self._buffer = bytearray()

    def feed(self, data: bytes) -> List[Frame]:
        """Append ``data``; return every frame now complete. FrameError leaves the stream unusable."""
        self._buffer += data
        frames = []
        while True:
            if len(self._buffer) < HEADER_SIZE:
                # A wrong magic is known from its first bytes: fail now instead of waiting for 12.
                if not MAGIC.startswith(bytes(self._buffer[:len(MAGIC)])):
                    raise FrameError(f"bad magic {bytes(self._buffer[:4])!r}: not a baidu_std frame")
                return frames
            body_size, meta_size = parse_header(bytes(self._buffer[:HEADER_SIZE]), self.max_body_size)
            end = HEADER_SIZE + body_size
            if len(self._buffer) < end:
                return frames
            body = bytes(self._buffer[HEADER_SIZE:end])
            del self._buffer[:end]
            frames.append(split_body(body, meta_size))

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back (non-zero at EOF means a truncated frame)."""
        return len(self._buffer)


class IdleTimeout(Exception):
    """No frame began within the idle timeout (the connection itself is fine)."""


async def read_frame(reader: asyncio.StreamReader, max_body_size: int = DEFAULT_MAX_BODY_SIZE,
                     body_timeout: Optional[float] = None, idle_timeout: Optional[float] = None,
                     admit: Optional[Callable[[int], bool]] = None) -> Optional[Frame]:
    """The next frame, or None at a clean end of stream; FrameError for garbage or a truncated frame.

    Waiting for a frame to begin may take ``idle_timeout`` seconds (None: forever), then IdleTimeout;
    once its first byte has arrived, the rest must follow within ``body_timeout`` seconds, so a peer
    that stalls mid-frame cannot hold the connection forever. A first byte that cannot start ``PRPC``
    fails at once. ``admit(body_size)`` is asked once the header is read: False reads the body past in
    small pieces without keeping it and returns a ``skipped`` frame (meta only), so a memory budget
    holds whatever peers send.
    """
    try:
        # Cancelling readexactly(1) while it waits consumes nothing: a later call still sees every byte.
        first = await asyncio.wait_for(reader.readexactly(1), idle_timeout)
    except asyncio.IncompleteReadError:
        return None
    except asyncio.TimeoutError:
        raise IdleTimeout(f"no frame within {idle_timeout:g}s") from None
    if first != MAGIC[:1]:
        raise FrameError(f"bad magic: first byte {first!r}, not a baidu_std frame")
    try:
        return await asyncio.wait_for(_read_rest(reader, first, max_body_size, admit), body_timeout)
    except asyncio.TimeoutError:
        raise FrameError(f"frame not complete within {body_timeout:g}s") from None


async def _read_rest(reader: asyncio.StreamReader, first: bytes, max_body_size: int,
                     admit: Optional[Callable[[int], bool]]) -> Frame:
    try:
        header = first + await reader.readexactly(HEADER_SIZE - 1)
    except asyncio.IncompleteReadError as exc:
        raise FrameError(f"stream ended inside a header ({1 + len(exc.partial)} of {HEADER_SIZE} bytes)") \
            from None
    body_size, meta_size = parse_header(header, max_body_size)
    try:
        if admit is None or admit(body_size):
            return split_body(await reader.readexactly(body_size), meta_size)
        if meta_size > MAX_SKIPPED_META_SIZE:
            raise FrameError(f"meta_size={meta_size} is not a plausible RpcMeta")
        meta = parse_meta(await reader.readexactly(meta_size))
        left = body_size - meta_size
        while left:
            left -= len(await reader.readexactly(min(left, 1 << 16)))
        return Frame(meta, b"", skipped=True)
    except asyncio.IncompleteReadError as exc:
        raise FrameError(f"stream ended inside a body ({len(exc.partial)} of {body_size} bytes)") from None


def request_meta(service: str, method: str, correlation_id: int, log_id: int = 0,
                 compress_type: int = CompressType.NONE) -> RpcMeta:
    meta = RpcMeta(correlation_id=correlation_id, compress_type=compress_type)
    meta.request.service_name = service
    meta.request.method_name = method
    if log_id:
        meta.request.log_id = log_id
    return meta


def response_meta(correlation_id: int, error_code: int = 0, error_text: str = "") -> RpcMeta:
    meta = RpcMeta(correlation_id=correlation_id)
    meta.response.error_code = int(error_code)
    if error_text:
        meta.response.error_text = error_text
    return meta


class PayloadTooLarge(ValueError):
    """A compressed payload inflates past the size limit (a decompression bomb): a request error."""


_INFLATE_STEP = 1 << 20  # bytes inflated per step: the overshoot past the limit is at most this


def _inflate(data: bytes, wbits: int, max_size: int, codec: str) -> bytes:
    """Inflate ``data`` (a zlib stream, or gzip members with ``wbits`` 31) to at most ``max_size`` bytes.

    zlib.decompress / gzip.decompress materialise the whole output whatever its size (2 MiB of zlib
    can hold 2 GiB of zeros); decompressobj.decompress with max_length is the standard library's only
    bounded form, so the loop is written here. Output grows in steps of _INFLATE_STEP and the call
    fails as soon as it passes max_size, so a bomb costs max_size + one step at most.
    """
    parts: List[bytes] = []  # joined once at the end: no growing buffer that over-allocates
    size = 0
    while True:
        inflater = zlib.decompressobj(wbits)
        tail = data
        while not inflater.eof:
            chunk = inflater.decompress(tail, _INFLATE_STEP)
            tail = inflater.unconsumed_tail
            parts.append(chunk)
            size += len(chunk)
            if size > max_size:
                raise PayloadTooLarge(f"the {codec} payload inflates past max_body_size={max_size} bytes")
            if not chunk and not tail:
                raise EOFError(f"the {codec} stream is truncated")
        data = inflater.unused_data
        # gzip (RFC 1952) allows several members back to back, as gzip.decompress reads them.
        if wbits != 31 or not data.startswith(b"\x1f\x8b"):
            return b"".join(parts)


def decompress(payload: bytes, compress_type: int, max_size: int = DEFAULT_MAX_BODY_SIZE) -> bytes:
    """The payload as sent before compression, at most ``max_size`` bytes of it.

    PayloadTooLarge when it inflates past ``max_size`` (the body limit: a payload may not be bigger
    inflated than it could have been sent plain); ValueError names an unknown or unsupported codec;
    zlib.error / EOFError for corrupt or truncated data.
    """
    if compress_type == CompressType.NONE:
        return payload
    if compress_type == CompressType.GZIP:
        return _inflate(payload, 31, max_size, "gzip")
    if compress_type == CompressType.ZLIB:
        return _inflate(payload, 15, max_size, "zlib")
    try:
        name = CompressType(compress_type).name.lower()
    except ValueError:
        name = str(compress_type)
    raise ValueError(f"unsupported compress_type {name} (this server reads none, gzip and zlib)")


def compress(payload: bytes, compress_type: int) -> bytes:
    if compress_type == CompressType.NONE:
        return payload
    if compress_type == CompressType.GZIP:
        return gzip.compress(payload)
    if compress_type == CompressType.ZLIB:
        return zlib.compress(payload)
    raise ValueError(f"unsupported compress_type {compress_type}")
