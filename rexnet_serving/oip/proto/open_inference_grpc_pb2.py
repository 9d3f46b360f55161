"""The Open Inference Protocol's gRPC messages (package ``inference``), built at import time from the
serialized descriptor that scripts/oip_descriptor.py takes from the ``kserve`` package (setup time, see
that script for why): ``ModelInferRequest``, ``ModelInferResponse``, ``ServerLiveRequest`` ... as module
attributes, as protoc-generated code would have them, on the protobuf installed here.
"""
from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pool
from google.protobuf.internal import builder

_DESCRIPTOR_FILE = Path(__file__).with_name("inference_v2.desc")
if not _DESCRIPTOR_FILE.is_file():
    raise ImportError(f"{_DESCRIPTOR_FILE} is missing: run `make setup` (scripts/bootstrap.sh runs "
                      "scripts/oip_descriptor.py, which takes the protocol's definitions from the kserve package)")

DESCRIPTOR = descriptor_pool.Default().AddSerializedFile(_DESCRIPTOR_FILE.read_bytes())
builder.BuildMessageAndEnumDescriptors(DESCRIPTOR, globals())
builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, __name__, globals())
SERVICE = DESCRIPTOR.services_by_name["GRPCInferenceService"]
