#!/usr/bin/env bash
# Regenerates rexnet_serving/oip/proto/open_inference_grpc_pb2{,_grpc}.py from the .proto beside them,
# with the service venv's grpcio-tools 1.33.2 (its protoc emits code for protobuf 3.20, which Paddle
# Serving pins). The .proto is the Open Inference Protocol's, unchanged (see rexnet_serving/oip/README.md).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python="${PYTHON:-$root/.venv/bin/python}"
cd "$root"
"$python" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \
  rexnet_serving/oip/proto/open_inference_grpc.proto
echo "generated rexnet_serving/oip/proto/open_inference_grpc_pb2.py and _pb2_grpc.py"
