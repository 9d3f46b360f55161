"""Run by tests/test_oip.py in a child process of the venv's Python (tritonclient is in the test extra),
as a user's client would be: the official tritonclient, HTTP and gRPC, against the v2 endpoints.

    python oip_tritonclient_calls.py HTTP_URL GRPC_URL MODEL IMAGE_FILE BAD_FILE

Prints one JSON object of what each call returned (or the error it raised); the test asserts on it.
"""
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def observe(call):
    try:
        return {"ok": call()}
    except InferenceServerException as exc:
        return {"error": exc.message(), "status": exc.status()}


def as_list(array):
    return [x.decode() if isinstance(x, bytes) else x for x in array.reshape(-1).tolist()]


def run(module, client, model, image, bad, size):
    images = np.array([image, bad, image], dtype=np.object_)
    out = {}
    out["live"] = client.is_server_live()
    out["ready"] = client.is_server_ready()
    out["model_ready"] = client.is_model_ready(model)
    out["model_ready_v1"] = observe(lambda: client.is_model_ready(model, "1"))
    meta = client.get_server_metadata()
    model_meta = client.get_model_metadata(model)
    if module is grpcclient:
        from google.protobuf.json_format import MessageToDict
        meta, model_meta = MessageToDict(meta), MessageToDict(model_meta)
    out["server_metadata"], out["model_metadata"] = meta, model_meta

    def infer_images(class_count=0, binary=True):
        inp = module.InferInput("image", [len(images)], "BYTES")
        kwargs = {"binary_data": binary} if module is httpclient else {}
        inp.set_data_from_numpy(images, **kwargs)
        outputs = [module.InferRequestedOutput("probs", class_count=class_count, **kwargs),
                   module.InferRequestedOutput("errors", **kwargs)]
        result = client.infer(model, [inp], outputs=outputs, request_id="req-7")
        probs = result.as_numpy("probs")
        return {"probs_shape": list(probs.shape), "probs_dtype": str(probs.dtype),
                "probs": probs.tolist() if probs.dtype != np.object_ else as_list(probs),
                "errors": as_list(result.as_numpy("errors")), "id": result.get_response()["id"]
                if module is httpclient else result.get_response().id}

    out["images"] = observe(infer_images)
    out["images_class_count"] = observe(lambda: infer_images(class_count=3))

    def infer_x(binary=True, class_count=0):
        batch = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
        inp = module.InferInput("x", list(batch.shape), "FP32")
        kwargs = {"binary_data": binary} if module is httpclient else {}
        inp.set_data_from_numpy(batch, **kwargs)
        result = client.infer(model, [inp], outputs=[module.InferRequestedOutput("probs", class_count=class_count,
                                                                                 **kwargs)])
        probs = result.as_numpy("probs")
        return {"shape": list(probs.shape), "probs": probs.tolist() if probs.dtype != np.object_ else as_list(probs)}

    out["x"] = observe(infer_x)
    out["x_class_count"] = observe(lambda: infer_x(class_count=2))
    if module is httpclient:
        out["x_json"] = observe(lambda: infer_x(binary=False))

    def infer_unknown():
        inp = module.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([image], dtype=np.object_))
        return client.infer("no_such_model", [inp]).get_response() is not None

    out["unknown_model"] = observe(infer_unknown)
    out["unknown_model_ready"] = observe(lambda: client.is_model_ready("no_such_model"))

    def infer_bad_shape():
        inp = module.InferInput("x", [1, 3, 8, 8], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
        return client.infer(model, [inp]).get_response() is not None

    out["bad_shape"] = observe(infer_bad_shape)

    def infer_only_bad():
        inp = module.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(np.array([bad], dtype=np.object_))
        return client.infer(model, [inp]).get_response() is not None

    out["only_bad_images"] = observe(infer_only_bad)
    return out


def main():
    http_url, grpc_url, model, image_file, bad_file, size = sys.argv[1:7]
    image = open(image_file, "rb").read()
    bad = open(bad_file, "rb").read()
    report = {
        "http": run(httpclient, httpclient.InferenceServerClient(http_url), model, image, bad, int(size)),
        "grpc": run(grpcclient, grpcclient.InferenceServerClient(grpc_url), model, image, bad, int(size)),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
