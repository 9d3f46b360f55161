"""rexnet-serve --model-repository: two exports side by side in one service (one of them as a numbered
version, with its own settings.yaml: another runtime and batch size), each request answered by the model
it names, with the same answers as that model's offline predictor; unknown models and versions refused;
requests counted by model; the ready line and /metrics say the CPUs and threads the service sized for."""
from __future__ import annotations

import base64
import json

import numpy as np
import rexnet_serving.imageio  # noqa: F401  (before paddle: see that module)
import pytest
import requests

from images import encode, photo
from servers import BIN, ServiceProcess
from rexnet_serving import pipeline_wire
from rexnet_serving.classifier import Classifier
from rexnet_serving.cpus import available_cpus
from conftest import free_port

pytestmark = [pytest.mark.server, pytest.mark.slow]
JPEG = encode(photo("flower", (300, 220)), "jpeg")


@pytest.fixture(scope="module")
def repository(scored_model_dir, random_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("repository")
    (root / "scored").symlink_to(scored_model_dir, target_is_directory=True)
    (root / "imagenet").mkdir()
    (root / "imagenet" / "3").symlink_to(random_model_dir, target_is_directory=True)
    # this model only: Paddle Inference (the service runs OpenVINO, cpu.yml), 4 images per forward pass
    (root / "imagenet" / "settings.yaml").write_text("runtime: paddle\nmax_batch_images: 4\nthread_num: 1\n")
    (root / "README.txt").write_text("models live in the directories beside this file\n")
    return root


@pytest.fixture(scope="module")
def service(repository, tmp_path_factory):
    work = tmp_path_factory.mktemp("repository_service")
    svc = ServiceProcess(repository, work, "rexnet:\n  default_model: scored\n", model_flag="--model-repository")
    yield svc
    svc.stop()


def ask(service, **extra: str) -> dict:
    keys, values = ["image", "top_k"], [base64.b64encode(JPEG).decode(), "3"]
    for key, value in extra.items():
        keys.append(key)
        values.append(value)
    return requests.post(service.url, json={"key": keys, "value": values}, timeout=60).json()


def test_each_request_goes_to_the_model_it_names(service, scored_model_dir, random_model_dir):
    for extra, model_dir in (({}, scored_model_dir), ({"model": "scored"}, scored_model_dir),
                             ({"model": "imagenet"}, random_model_dir),
                             ({"model": "imagenet", "model_version": "3"}, random_model_dir)):
        answer = ask(service, **extra)
        assert answer["err_no"] == 0, answer
        (served,) = pipeline_wire.decode_results(answer["value"][0])
        (expected,) = Classifier(model_dir).classify([JPEG], top_k=3)
        assert [p.label for p in served.predictions] == [p.label for p in expected.predictions]
        assert [round(p.score, 4) for p in served.predictions] == [round(p.score, 4) for p in expected.predictions]
    log = service.log.read_text()
    assert "imagenet/3 (ReXNet_1_0, runtime paddle" in log and "scored/1 (ReXNet_1_0, default)" in log


def test_unknown_models_and_versions_are_bad_requests(service):
    for extra, message in (({"model": "resnet"}, "no model 'resnet'; this service serves imagenet, scored"),
                           ({"model": "imagenet", "model_version": "1"}, "has no served version 1 (served: 3)"),
                           ({"model_version": "two"}, "model_version must be a version number")):
        answer = ask(service, **extra)
        assert answer["err_no"] == pipeline_wire.INVALID_REQUEST and message in answer["err_msg"], answer


def test_requests_are_counted_by_model(service):
    before = service.metric("rexnet_model_requests_total", err_no="0", model="imagenet", version="3")
    ask(service, model="imagenet")
    assert service.metric("rexnet_model_requests_total", err_no="0", model="imagenet", version="3") == before + 1
    assert service.metric("rexnet_model_request_seconds_count", model="scored", version="1") >= 1


def test_an_empty_repository_is_refused_at_start(tmp_path):
    import subprocess
    (tmp_path / "empty").mkdir()
    run = subprocess.run([str(BIN / "rexnet-serve"), "--model-repository", str(tmp_path / "empty"), "--host",
                          "127.0.0.1", "--http-port", str(free_port()), "--grpc-port", str(free_port()),
                          "--metrics-port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "holds no models" in run.stderr


def v2(service, path: str, **kwargs) -> requests.Response:
    return requests.request("POST" if "data" in kwargs else "GET", f"http://127.0.0.1:{service.oip_http}/v2/{path}",
                            timeout=60, **kwargs)


def infer_tensor(service, model: str, rows: int) -> requests.Response:
    """v2 REST with the preprocessed ``x`` input as binary data (zeros: any finite batch will do)."""
    size = v2(service, f"models/{model}").json()["inputs"][1]["shape"][-1]
    batch = np.zeros((rows, 3, size, size), np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 3, size, size],
                                     "parameters": {"binary_data_size": len(batch)}}]}).encode()
    return v2(service, f"models/{model}/infer", data=header + batch,
              headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"})


def test_each_model_runs_with_its_own_settings(service, repository):
    settings_file = repository / "imagenet" / "settings.yaml"
    log = service.log.read_text()
    assert f"imagenet/3 (ReXNet_1_0, runtime paddle, max_batch_images 4, thread_num 1 from {settings_file})" in log
    imagenet, scored = (v2(service, f"models/{m}").json()["parameters"] for m in ("imagenet", "scored"))
    # what the loaded predictors really run: the settings file's runtime for one, the service's for the other
    assert imagenet == {"runtime": "paddle", "precision": "fp32", "max_batch_images": 4, "thread_num": 1,
                        "settings_file": str(settings_file)}
    assert (scored["runtime"], scored["max_batch_images"]) == ("openvino", 32) and "settings_file" not in scored
    answer = infer_tensor(service, "imagenet", 5)
    assert answer.status_code == 400 and "5 rows in one request; send 1..4" in answer.json()["error"], answer.text
    for model, rows, classes in (("imagenet", 4, 1000), ("scored", 5, 10)):
        answer = infer_tensor(service, model, rows)
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["shape"] == [rows, classes]
    # six images in one Pipeline request: forward passes of at most 4 on this model, answers in order
    keys = pipeline_wire.image_keys(6) + ["top_k", "model"]
    answer = requests.post(service.url, json={"key": keys, "value": [base64.b64encode(JPEG).decode()] * 6 + ["2", "imagenet"]},
                           timeout=60).json()
    assert answer["err_no"] == 0, answer
    results = pipeline_wire.decode_results(answer["value"][0])
    assert len(results) == 6 and len({tuple(p.label for p in r.predictions) for r in results}) == 1


def test_the_ready_line_and_metrics_say_the_cpus_and_threads(service):
    cpus = available_cpus()  # this test process's, which the service inherits
    log = service.log.read_text()
    assert f") with {cpus}: prepare " in log and "(derived); from " in log, log[-2000:]
    assert service.metric("rexnet_cpus", source=cpus.source) == cpus.count
    assert service.metric("rexnet_sizing", origin="derived", setting="op.prepare.concurrency") >= 1
    assert service.metric("rexnet_sizing", origin="derived", setting="op.infer.concurrency") >= 1


def test_a_bad_settings_file_stops_the_start_naming_file_and_key(tmp_path, scored_model_dir):
    import subprocess
    (tmp_path / "repo" / "m").mkdir(parents=True)
    (tmp_path / "repo" / "m" / "1").symlink_to(scored_model_dir, target_is_directory=True)
    settings = tmp_path / "repo" / "m" / "settings.yaml"
    for text, message in (("batch_size: 4\n", "unknown key 'batch_size'"),
                          ("precision: fp16\n", "precision: precision fp16 is TensorRT's")):
        settings.write_text(text)
        run = subprocess.run([str(BIN / "rexnet-serve"), "--model-repository", str(tmp_path / "repo"), "--host",
                              "127.0.0.1", "--http-port", str(free_port()), "--grpc-port", str(free_port()),
                              "--metrics-port", str(free_port()), "--oip-http-port", "0", "--oip-grpc-port", "0",
                              "--workdir", str(tmp_path / "wd")], capture_output=True, text=True, timeout=300)
        assert run.returncode == 1 and str(settings) in run.stderr and message in run.stderr, run.stderr[-2000:]
