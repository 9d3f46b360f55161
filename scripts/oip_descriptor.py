#!/usr/bin/env python3
"""Writes rexnet_serving/oip/proto/inference_v2.desc: the Open Inference Protocol's gRPC definitions
(package ``inference``, service ``GRPCInferenceService``) as a serialized FileDescriptorProto, taken from the
``kserve`` package on PyPI (its kserve/protocol/grpc/grpc_predict_v2_pb2.py, Apache-2.0), pinned below.

Run by scripts/bootstrap.sh and the Dockerfiles, never by the service or the tests: the descriptor is a
build product (gitignored). Why this way: KServe publishes the protocol's definitions in its package,
and the package itself (FastAPI, pandas, the Kubernetes client...) has no place in the serving image;
the serialized descriptor is independent of the protobuf version, and rexnet_serving.oip.proto builds
the message classes from it with the protobuf that is installed. The pin is the test extra's kserve.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "kserve==0.21.0"
MEMBER = "kserve/protocol/grpc/grpc_predict_v2_pb2.py"
TARGET = Path(__file__).resolve().parents[1] / "rexnet_serving" / "oip" / "proto" / "inference_v2.desc"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        PACKAGE, "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("kserve-*.whl")
        source = zipfile.ZipFile(wheel).read(MEMBER).decode("utf-8")
    found = re.search(r"AddSerializedFile\(\s*(b'(?:[^'\\]|\\.)*')\s*\)", source, re.S)
    if found is None:
        print(f"oip_descriptor: no serialized descriptor in {PACKAGE}'s {MEMBER}", file=sys.stderr)
        return 1
    data = ast.literal_eval(found.group(1))
    TARGET.write_bytes(data)
    print(f"oip_descriptor: wrote {TARGET} ({len(data)} bytes) from {PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
