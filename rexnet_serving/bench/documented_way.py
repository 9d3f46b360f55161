"""The documented way to serve a PaddleClas classifier with Paddle Serving, as a benchmark baseline.

A faithful copy of the setup users follow from the docs, run on the same exported model and images as
the rest of the benchmark (the only changes: this model's feed/fetch names, its label file, CPU, and
free ports):

* PaddleClas ``deploy/paddleserving/classification_web_service.py`` + ``config.yml`` (the same op as
  Paddle Serving's ``examples/Pipeline/PaddleClas/imagenet/resnet50_web_service.py``): a Pipeline
  ``WebService`` with one ``Op`` whose ``preprocess`` base64-decodes, ``cv2.imdecode``s and runs
  ``paddle_serving_app.reader``'s ``Sequential([Resize(256), CenterCrop(224), RGB2BGR(),
  Transpose((2, 0, 1)), Div(255), Normalize(mean, std, True)])``; ``postprocess`` returns the arg-max
  label and probability as ``str(list)``.
* ``config.yml``: ``worker_num: 1``, ``dag.is_thread_op: False`` (the op in its own process),
  ``concurrency: 1``, ``local_service_conf`` with ``client_type: local_predictor`` and, for the CPU as
  the PaddleClas README says, ``device_type: 0``; everything else at Paddle Serving 0.9.0's defaults
  (``thread_num: 2``, ``ir_optim: False``, ``use_mkldnn: False``), batch 1 per request.
* The client: PaddleClas ``deploy/paddleserving/pipeline_http_client.py``: ``POST /imagenet/prediction``
  with ``{"key": ["image"], "value": [<base64 JPEG>]}`` (here over one kept-alive connection per client,
  which only helps the baseline).

``paddle_serving_app.reader`` imports sentencepiece, pyclipper and shapely at import time (for its OCR and
NLP readers); ``pip install 'rexnet-serving[bench]'`` provides them.

    python -m rexnet_serving.bench.documented_way --model-dir DIR --http-port N --grpc-port N --workdir D
"""
from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .keepalive import KeepAliveJsonPoster

SERVICE_NAME = "imagenet"  # the example's service and op name: POST /imagenet/prediction
LABEL_FILE = "imagenet.label"  # read from the working directory by the example's op


def pipeline_config(model_dir: Path, http_port: int, grpc_port: int) -> Dict[str, Any]:
    """PaddleClas's deploy/paddleserving/config.yml for the CPU, on this model (verified) and these ports."""
    from ..integrity import verify_files
    manifest = verify_files(model_dir)
    return {
        "worker_num": 1,
        "http_port": http_port,
        "rpc_port": grpc_port,
        "dag": {"is_thread_op": False},
        "op": {SERVICE_NAME: {
            "concurrency": 1,
            "local_service_conf": {
                "model_config": str(manifest.serving_server_dir),
                "device_type": 0,
                "devices": "",
                "client_type": "local_predictor",
                "fetch_list": [manifest.fetch.alias],
            },
        }},
    }


def prepare_workdir(model_dir: Path, workdir: Path, http_port: int, grpc_port: int) -> Path:
    """Write config.yml and imagenet.label (one class name per line) into ``workdir``."""
    from ..integrity import verify_files
    manifest = verify_files(model_dir)  # the labels are read from it
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / LABEL_FILE).write_text("\n".join(manifest.labels()) + "\n", encoding="utf-8")
    config = workdir / "config.yml"
    config.write_text(yaml.safe_dump(pipeline_config(model_dir, http_port, grpc_port), sort_keys=False),
                      encoding="utf-8")
    return config


def build_service(model_dir: Path) -> Any:
    """The example's ImageService (WebService) with its ImagenetOp, fed and fetched by this model's names."""
    import cv2
    import numpy as np
    from paddle_serving_app.reader import (CenterCrop, Div, Normalize, Resize, RGB2BGR, Sequential,
                                           Transpose)
    from paddle_serving_server.web_service import Op, WebService

    from ..manifest import load_manifest
    manifest = load_manifest(model_dir)
    pre = manifest.preprocess
    feed, fetch = manifest.feed.alias, manifest.fetch.alias

    class ImagenetOp(Op):
        def init_op(self) -> None:
            self.seq = Sequential([Resize(pre.resize_short), CenterCrop(pre.crop_size), RGB2BGR(),
                                   Transpose((2, 0, 1)), Div(255), Normalize(list(pre.mean), list(pre.std), True)])
            with open(LABEL_FILE, encoding="utf-8") as fin:
                self.label_dict = {i: line.strip() for i, line in enumerate(fin)}

        def preprocess(self, input_dicts: Dict, data_id: int, log_id: int) -> Tuple[Dict, bool, Any, str]:
            (_, input_dict), = input_dicts.items()
            imgs = []
            for key in input_dict.keys():
                data = np.frombuffer(base64.b64decode(input_dict[key].encode("utf8")), np.uint8)
                img = self.seq(cv2.imdecode(data, cv2.IMREAD_COLOR))
                imgs.append(img[np.newaxis, :].copy())
            return {feed: np.concatenate(imgs, axis=0)}, False, None, ""

        def postprocess(self, input_dicts: Dict, fetch_dict: Dict, data_id: int,
                        log_id: int) -> Tuple[Dict, Any, str]:
            result: Dict[str, List] = {"label": [], "prob": []}
            for score in fetch_dict[fetch]:
                score = score.tolist()
                max_score = max(score)
                result["label"].append(self.label_dict[score.index(max_score)].strip().replace(",", ""))
                result["prob"].append(max_score)
            return {"label": str(result["label"]), "prob": str(result["prob"])}, None, ""

    class ImageService(WebService):
        def get_pipeline_response(self, read_op: Any) -> Any:
            return ImagenetOp(name=SERVICE_NAME, input_ops=[read_op])

    return ImageService(name=SERVICE_NAME)


class DocumentedClient:
    """pipeline_http_client.py's request as a loadgen Sender: one image per POST, the answer checked.

    The same lean keep-alive transport as the service's HTTP sender (rexnet_serving.bench.keepalive), so
    both sides of the comparison pay the same client cost.
    """

    def __init__(self, address: str, timeout: float = 30.0, payloads: Sequence[bytes] = ()) -> None:
        self._poster = KeepAliveJsonPoster(address, f"/{SERVICE_NAME}/prediction", timeout, request_body, payloads)

    def send(self, data: bytes) -> None:
        answer = self._poster.post(data)
        if int(answer.get("err_no", 0)) != 0 or "label" not in answer.get("key", []):
            raise RuntimeError(f"err_no {answer.get('err_no')}: {str(answer.get('err_msg', ''))[:200]}")

    def close(self) -> None:
        self._poster.close()


def request_body(data: bytes) -> Dict[str, Any]:
    """pipeline_http_client.py's body: key "image", the base64 file as value."""
    return {"key": ["image"], "value": [base64.b64encode(data).decode("utf8")]}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rexnet_serving.bench.documented_way",
                                     description="Run PaddleClas's documented Paddle Serving Pipeline "
                                                 "classification service (CPU) on an exported model.")
    parser.add_argument("--model-dir", type=Path, required=True, help="rexnet-export output directory")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--workdir", type=Path, required=True,
                        help="where config.yml, imagenet.label and Paddle Serving's logs go")
    args = parser.parse_args(argv)
    try:
        import paddle_serving_app.reader  # noqa: F401 - fail here, with the fix, not inside the op process
    except ImportError as exc:
        print(f"documented_way: paddle_serving_app.reader cannot be imported ({exc}); install "
              "'rexnet-serving[bench]' (sentencepiece, pyclipper, shapely)", file=sys.stderr)
        return 1
    try:
        config = prepare_workdir(args.model_dir, args.workdir.resolve(), args.http_port, args.grpc_port)
    except (OSError, ValueError, KeyError) as exc:
        print(f"documented_way: {exc}", file=sys.stderr)
        return 1
    os.chdir(config.parent)  # the op reads imagenet.label, Paddle Serving writes its logs, here
    service = build_service(args.model_dir.resolve())
    service.prepare_pipeline_config(str(config))
    service.run_service()
    return 0


if __name__ == "__main__":
    sys.exit(main())
