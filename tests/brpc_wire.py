"""Raw baidu_std pieces for the bRPC tests: reading answers off a socket, an image request payload, and
deflate bombs. Imported as ``from brpc_wire import ...`` (pytest puts tests/ on sys.path)."""
from __future__ import annotations

import socket
import zlib
from typing import List

import numpy as np

from rexnet_serving.brpc import framing
from rexnet_serving.brpc.framing import FrameDecoder
from rexnet_serving.brpc.tensors import ElemType, Request, Tensor, to_tensor


def responses(sock: socket.socket, count: int) -> List[framing.Frame]:
    """The next ``count`` frames on ``sock``; fails if the server closes the connection first."""
    decoder, frames = FrameDecoder(), []
    while len(frames) < count:
        data = sock.recv(65536)
        assert data, "the server closed the connection instead of answering"
        frames += decoder.feed(data)
    return frames


def image_request(images: List[bytes], top_k: int = 1) -> bytes:
    """A serialized GeneralModelService Request of encoded images (the image feed) and top_k."""
    request = Request(fetch_var_names=["predictions"])
    for data in images:
        request.tensor.append(Tensor(alias_name="image", elem_type=ElemType.UINT8, shape=[len(data)],
                                     tensor_content=data))
    request.tensor.append(to_tensor(np.array([top_k]), alias="top_k", elem_type=ElemType.INT64))
    return request.SerializeToString()


def deflate_bomb(wbits: int, inflated: int) -> bytes:
    """``inflated`` zero bytes (a multiple of 1 MiB) as a zlib (wbits 15) or gzip (31) stream, built a
    MiB at a time so the test never holds the inflated size: 2 GiB come to about 2 MiB."""
    packer, zeros, parts = zlib.compressobj(9, zlib.DEFLATED, wbits), bytes(1 << 20), []
    for _ in range(inflated >> 20):
        parts.append(packer.compress(zeros))
    parts.append(packer.flush())
    return b"".join(parts)
