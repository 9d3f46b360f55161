"""rexnet-serve --model-repository: two exports side by side in one service (one of them as a numbered
version), each request answered by the model it names, with the same answers as that model's offline
predictor; unknown models and versions refused; requests counted by model."""
from __future__ import annotations

import base64

import rexnet_serving.imageio  # noqa: F401  (before paddle: see that module)
import pytest
import requests

from images import encode, photo
from servers import BIN, ServiceProcess
from rexnet_pipelines import protocol
from rexnet_serving.classifier import Classifier
from conftest import free_port

pytestmark = [pytest.mark.server, pytest.mark.slow]
JPEG = encode(photo("flower", (300, 220)), "jpeg")


@pytest.fixture(scope="module")
def repository(scored_model_dir, random_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("repository")
    (root / "scored").symlink_to(scored_model_dir, target_is_directory=True)
    (root / "imagenet").mkdir()
    (root / "imagenet" / "3").symlink_to(random_model_dir, target_is_directory=True)
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
        (served,) = protocol.decode_results(answer["value"][0])
        (expected,) = Classifier(model_dir).classify([JPEG], top_k=3)
        assert [p.label for p in served.predictions] == [p.label for p in expected.predictions]
        assert [round(p.score, 4) for p in served.predictions] == [round(p.score, 4) for p in expected.predictions]
    log = service.log.read_text()
    assert "imagenet/3 (ReXNet_1_0)" in log and "scored/1 (ReXNet_1_0, default)" in log


def test_unknown_models_and_versions_are_bad_requests(service):
    for extra, message in (({"model": "resnet"}, "no model 'resnet'; this service serves imagenet, scored"),
                           ({"model": "imagenet", "model_version": "1"}, "has no served version 1 (served: 3)"),
                           ({"model_version": "two"}, "model_version must be a version number")):
        answer = ask(service, **extra)
        assert answer["err_no"] == protocol.INVALID_REQUEST and message in answer["err_msg"], answer


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
