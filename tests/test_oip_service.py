"""The Open Inference Protocol served by rexnet-serve itself (pipelines/oip_front.py): a real service on a
model repository, called with the official tritonclient (HTTP and gRPC, the test extra's, in a child
process) through tests/oip_tritonclient_calls.py; the answers equal the offline Classifier's, go through the
service's front door (per-model metrics), and v2 readiness follows the service's."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests

from conftest import SCORED_CLASSES, tritonclient_report
from images import encode, photo
from rexnet_serving.classifier import Classifier
from servers import ServiceProcess

MODEL = "scored"
SIZE = 224
BAD = b"\xff\xd8\xff\xe0 this is no jpeg"
pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def service(scored_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    work = tmp_path_factory.mktemp("oip_service")
    repo = work / "repo"
    (repo / MODEL).mkdir(parents=True)
    (repo / MODEL / "3").symlink_to(scored_model_dir, target_is_directory=True)
    svc = ServiceProcess(repo, work, model_flag="--model-repository")
    try:
        yield svc
    finally:
        svc.stop()


def test_v2_health_and_metadata_over_rest(service: ServiceProcess) -> None:
    base = f"http://127.0.0.1:{service.oip_http}"
    assert requests.get(f"{base}/v2/health/live", timeout=10).status_code == 200
    assert requests.get(f"{base}/v2/health/ready", timeout=10).status_code == 200
    meta = requests.get(f"{base}/v2/models/{MODEL}", timeout=10).json()
    assert meta["versions"] == ["3"] and meta["outputs"][0]["shape"] == [-1, SCORED_CLASSES]
    missing = requests.get(f"{base}/v2/models/nope/ready", timeout=10)
    assert missing.status_code == 404 and "unknown model 'nope'" in missing.json()["error"]
    assert requests.get(f"{base}/elsewhere", timeout=10).status_code == 404


@pytest.mark.slow
def test_tritonclient_against_rexnet_serve(service: ServiceProcess, scored_model_dir: Path, tmp_path: Path) -> None:
    jpeg = encode(photo("china", (320, 240)), "jpeg", quality=90)
    before = service.metric("rexnet_model_requests_total", err_no="0", model=MODEL, version="3")
    report = tritonclient_report(service.oip_http, service.oip_grpc, MODEL, jpeg, BAD, SIZE, tmp_path)
    classifier = Classifier(scored_model_dir, mkldnn=False)
    expected = classifier.classify_arrays(classifier.decode([jpeg])[0])[0]
    top = classifier.classify([jpeg], top_k=3)[0].predictions
    batch = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    for protocol in ("http", "grpc"):
        got = report[protocol]
        assert got["live"] and got["ready"] and got["model_ready"] is True, protocol
    # version 1 is not served: HTTP 404 (tritonclient: not ready), gRPC NOT_FOUND
    assert report["http"]["model_ready_v1"] == {"ok": False}
    assert report["grpc"]["model_ready_v1"]["status"] == "StatusCode.NOT_FOUND"
    for protocol in ("http", "grpc"):
        got = report[protocol]
        images = got["images"]["ok"]
        np.testing.assert_allclose(images["probs"][0], expected, atol=1e-5)
        np.testing.assert_allclose(images["probs"][2], expected, atol=1e-5)
        assert not any(images["probs"][1]) and json.loads(images["errors"][1])["code"] == "truncated"
        classes = got["images_class_count"]["ok"]["probs"]
        assert [c.split(":")[1:] for c in classes[:3]] == [[str(p.class_id), p.label] for p in top]
        np.testing.assert_allclose(got["x"]["ok"]["probs"], classifier.probabilities(batch), atol=1e-5)
        assert "unknown model 'no_such_model'" in got["unknown_model"]["error"]
        assert "no image could be classified" in got["only_bad_images"]["error"]
    assert report["http"]["bad_shape"]["status"] == "400"
    assert report["grpc"]["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    # every v2 infer went through the service's front door: counted per model
    after = service.metric("rexnet_model_requests_total", err_no="0", model=MODEL, version="3")
    assert after - before >= 8


@pytest.mark.parametrize("protocol", ["v2-grpc", "v2-http"])
def test_project_clients_over_v2(service: ServiceProcess, scored_model_dir: Path, protocol: str) -> None:
    from rexnet_serving.clients.base import BadRequestError, make_client
    jpeg = encode(photo("flower", (300, 200)), "png")
    port = service.oip_grpc if protocol == "v2-grpc" else service.oip_http
    client = make_client(protocol, f"127.0.0.1:{port}", timeout=30, model=MODEL)
    try:
        good, bad = client.classify([jpeg, BAD], top_k=3)
        expected = Classifier(scored_model_dir, mkldnn=False).classify([jpeg], top_k=3)[0]
        assert [(p.class_id, p.label) for p in good.predictions] == [(p.class_id, p.label) for p in expected.predictions]
        np.testing.assert_allclose([p.score for p in good.predictions], [p.score for p in expected.predictions],
                                   atol=1e-5)
        assert not bad.ok and bad.error_code == "truncated"
        with pytest.raises(BadRequestError, match="no image could be classified"):
            client.classify([BAD])
    finally:
        client.close()
    with pytest.raises(BadRequestError, match="unknown model 'nope'"):
        make_client(protocol, f"127.0.0.1:{port}", model="nope").classify([jpeg])


def test_sigterm_drains_the_v2_front_doors_too(service: ServiceProcess) -> None:
    import signal
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(60) == 0, service.log.read_text()[-2000:]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{service.oip_http}/v2/health/live", timeout=5)
