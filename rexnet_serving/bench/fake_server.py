"""Instant servers: answer every request at once with a canned one-image result, to measure the load
generator alone (its ceiling in requests/s and its CPU cost per request, client code included).

Each speaks the real wire protocol of one endpoint, so the real clients (HttpClient, GrpcClient,
BrpcClient) parse real answers: HTTP/1.1 keep-alive with Pipeline JSON, gRPC PipelineService, bRPC
GeneralModelService (served by rexnet_serving.brpc.server.NativeServer with a canned service).

    python -m rexnet_serving.bench.fake_server --protocol http|grpc|brpc --port N
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
from concurrent import futures
from typing import List, Optional

from .. import pipeline_wire
from ..results import ImageResult, Prediction

PROTOCOLS = ("http", "grpc", "brpc")


def canned_results() -> List[ImageResult]:
    """One image's top-5, shaped like the service's answer."""
    return [ImageResult([Prediction(281 + i, f"class {281 + i}", 0.5 / (i + 1)) for i in range(5)])]


async def _http_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: bytes) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            writer.write(reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        writer.close()


def serve_http(port: int, stop: threading.Event) -> None:
    body = json.dumps({"err_no": 0, "err_msg": "", "key": [pipeline_wire.RESULTS_KEY],
                       "value": [pipeline_wire.encode_results(canned_results())]}).encode()
    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
             + str(len(body)).encode() + b"\r\n\r\n" + body)

    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: _http_connection(r, w, reply), "127.0.0.1", port,
                                            limit=64 << 20)
        async with server:
            while not stop.is_set():
                await asyncio.sleep(0.2)

    asyncio.run(main())


def serve_grpc(port: int, stop: threading.Event) -> None:
    import grpc

    from ..clients.grpc import pipeline_messages
    pb2 = pipeline_messages()
    response = pb2.Response(err_no=0, key=[pipeline_wire.RESULTS_KEY],
                            value=[pipeline_wire.encode_results(canned_results())])
    handler = grpc.method_handlers_generic_handler(
        "baidu.paddle_serving.pipeline_serving.PipelineService",
        {"inference": grpc.unary_unary_rpc_method_handler(
            lambda request, context: response, request_deserializer=pb2.Request.FromString,
            response_serializer=pb2.Response.SerializeToString)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                         options=[("grpc.max_receive_message_length", 256 << 20)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stop.wait()
    server.stop(0)


def serve_brpc(port: int, stop: threading.Event) -> None:
    from ..brpc.server import NativeServer, ServerOptions
    from ..brpc.tensors import ENGINE_NAME, PREDICTIONS_FETCH, ElemType, Response, Tensor
    response = Response()
    output = response.outputs.add(engine_name=ENGINE_NAME)
    output.tensor.append(Tensor(alias_name=PREDICTIONS_FETCH, name=PREDICTIONS_FETCH, elem_type=ElemType.STRING,
                                shape=[1], data=[json.dumps(r.to_dict()) for r in canned_results()]))
    server = NativeServer(lambda request: response, ServerOptions(port=port, workers=4))
    server.start()
    stop.wait()
    server.stop()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rexnet_serving.bench.fake_server",
                                     description="An instant server for calibrating the load generator.")
    parser.add_argument("--protocol", choices=PROTOCOLS, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    serve = {"http": serve_http, "grpc": serve_grpc, "brpc": serve_brpc}[args.protocol]
    if args.protocol == "http":
        serve(args.port, stop)
    else:
        worker = threading.Thread(target=serve, args=(args.port, stop), daemon=True)
        worker.start()
        while worker.is_alive() and not stop.is_set():
            stop.wait(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
