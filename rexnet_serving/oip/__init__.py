"""The Open Inference Protocol (KServe v2) for rexnet-serving: REST and gRPC over an abstract model.

    service = OipService([ClassifierModel(classifier, "ReXNet_1_0")], ready=state.is_ready)
    status, headers, body = handle_rest(service, method, path, headers, body)   # any HTTP server
    add_to_server(service, grpc_server)                                         # any grpc.server

See README.md here for the protocol coverage and the encoding of per-image errors.
"""
from .model import ClassifierModel, ImagesOutcome, ModelInfo, OipModel
from .service import OipService
from .tensors import OipError

__all__ = ["ClassifierModel", "ImagesOutcome", "ModelInfo", "OipModel", "OipService", "OipError"]
