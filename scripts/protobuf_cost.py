#!/usr/bin/env python3
"""What protobuf costs per request on each front door, in-process: the messages each one parses and
serialises for one request with one ~100 KB image, timed on the protobuf implementation this interpreter
has: upb with protobuf 6 (this setup), pure Python with protobuf 3.20.3 on 3.11, C++ with 3.20.3 on 3.9.

Why a micro-benchmark and not rexnet-bench: the question is the per-request difference between two
protobuf implementations, which end-to-end latency on a shared machine buries in noise; the message
work itself is deterministic and can be timed alone. Each case is timed in REPEATS rounds of a fixed
number of calls; the median round is reported (microseconds per request).

    .venv/bin/python scripts/protobuf_cost.py [--json]
Run it with another venv's python to compare; --repo DIR imports that checkout's modules (the message
definitions of the code that venv was built for, e.g. the Python 3.9 branch) instead of this one's:
    /work/main/.venv/bin/python scripts/protobuf_cost.py --repo /work/main
"""
from __future__ import annotations

import base64
import json
import statistics
import struct
import sys
import time
from pathlib import Path

REPO = (Path(sys.argv[sys.argv.index("--repo") + 1]) if "--repo" in sys.argv
        else Path(__file__).resolve().parents[1])
sys.path.insert(0, str(REPO))
import rexnet_serving  # noqa: E402,F401  (before Paddle Serving: installs rexnet_serving.compat where it exists)
import numpy as np  # noqa: E402
from google.protobuf.internal import api_implementation  # noqa: E402

IMAGE_BYTES = 100 * 1024
REPEATS = 7
PREDICTION = json.dumps({"label": 281, "name": "tabby, tabby cat", "score": 0.91,
                         "top_k": [{"label": i, "name": f"class {i}", "score": 0.01} for i in range(5)]})


def image() -> bytes:
    return np.random.default_rng(0).integers(0, 256, IMAGE_BYTES, dtype=np.uint8).tobytes()


def pipeline_grpc():
    """Pipeline gRPC front door: parse Request{key, value=[base64 image]}, serialise Response."""
    from paddle_serving_server.pipeline.proto import pipeline_service_pb2 as pb
    wire = pb.Request(key=["image"], value=[base64.b64encode(image()).decode()]).SerializeToString()

    def one():
        request = pb.Request()
        request.ParseFromString(wire)
        _ = request.value[0]
        return pb.Response(err_no=0, key=["prediction"], value=[PREDICTION]).SerializeToString()
    return one


def pipeline_http():
    """Pipeline HTTP front door: build the Request from the JSON body's fields, read the Response."""
    from paddle_serving_server.pipeline.proto import pipeline_service_pb2 as pb
    value = base64.b64encode(image()).decode()

    def one():
        request = pb.Request(key=["image"], value=[value])
        response = pb.Response(err_no=0, key=["prediction"], value=[PREDICTION])
        return len(request.value[0]), list(response.value)
    return one


def oip_grpc():
    """Open Inference Protocol gRPC: parse ModelInferRequest (BYTES input, raw contents), serialise the
    ModelInferResponse (BYTES output with the JSON prediction)."""
    from rexnet_serving.oip.proto import open_inference_grpc_pb2 as proto
    raw = image()
    request = proto.ModelInferRequest(model_name="rexnet")
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(struct.pack("<I", len(raw)) + raw)
    wire = request.SerializeToString()
    prediction = PREDICTION.encode()

    def one():
        parsed = proto.ModelInferRequest()
        parsed.ParseFromString(wire)
        _ = parsed.raw_input_contents[0], parsed.inputs[0].shape
        response = proto.ModelInferResponse(model_name="rexnet")
        response.outputs.add(name="predictions", datatype="BYTES", shape=[1])
        response.raw_output_contents.append(struct.pack("<I", len(prediction)) + prediction)
        return response.SerializeToString()
    return one


def _brpc(tensor_builder, response_builder):
    from rexnet_serving.brpc import rpc_meta_pb2, tensors
    meta = rpc_meta_pb2.RpcMeta()
    meta.request.service_name = "baidu.paddle_serving.predictor.general_model.GeneralModelService"
    meta.request.method_name = "inference"
    meta.request.log_id = 1
    meta.correlation_id = 7
    meta_wire = meta.SerializeToString()
    request = tensors.Request(fetch_var_names=["prediction"], log_id=1)
    request.tensor.append(tensor_builder(tensors))
    wire = request.SerializeToString()

    def one():
        parsed_meta = rpc_meta_pb2.RpcMeta()
        parsed_meta.ParseFromString(meta_wire)
        tensors.check_wire_fields(wire)
        parsed = tensors.Request()
        parsed.ParseFromString(wire)
        _ = tensors.from_tensor(parsed.tensor[0])
        response = tensors.Response()
        response.outputs.add().tensor.append(response_builder(tensors))
        return response.SerializeToString()
    return one


def brpc_client_feed():
    """bRPC, Client-style feed: RpcMeta + Request with a float32 1x3x224x224 tensor in float_data;
    the reply's float32 1x1000 fetch tensor."""
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    scores = np.random.default_rng(1).random((1, 1000), dtype=np.float32)
    return _brpc(lambda t: t.to_tensor(x, "x"), lambda t: t.to_tensor(scores, "softmax"))


def brpc_image_feed():
    """bRPC, image feed: RpcMeta + Request with the encoded image (uint8 tensor_content); the reply's
    string tensor with the JSON prediction."""
    raw = np.frombuffer(image(), dtype=np.uint8)

    def reply(t):
        return t.Tensor(elem_type=20, alias_name="predictions", name="predictions", shape=[1], data=[PREDICTION])
    return _brpc(lambda t: t.to_tensor(raw, t.IMAGE_FEED, elem_type=7), reply)


CASES = {"pipeline_grpc": pipeline_grpc, "pipeline_http": pipeline_http, "oip_grpc": oip_grpc,
         "brpc_client_feed": brpc_client_feed, "brpc_image_feed": brpc_image_feed}


def median_us(one, calls: int) -> float:
    one()  # warm up: imports, descriptor pools
    rounds = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(calls):
            one()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(rounds)


def main() -> int:
    result = {"python": sys.version.split()[0], "protobuf": api_implementation.Type(), "us_per_request": {}}
    for name, setup in CASES.items():
        one = setup()
        # calibrate to ~0.2 s a round
        start = time.perf_counter()
        one()
        calls = max(3, int(0.2 / max(time.perf_counter() - start, 1e-6)))
        result["us_per_request"][name] = round(median_us(one, calls), 1)
    if "--json" in sys.argv:
        print(json.dumps(result))
    else:
        print(f"Python {result['python']}, protobuf implementation {result['protobuf']}")
        for name, us in result["us_per_request"].items():
            print(f"  {name:18s} {us:10.1f} us/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
