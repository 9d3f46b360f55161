"""rexnet-serve end to end: a real Pipeline server on 127.0.0.1 (free ports), real photos over HTTP and
gRPC, compared with the offline predictor; bad input; readiness; metrics; the CLI; SIGTERM drain.

One server for the whole module (started as a subprocess in its own process group, killed as a group in
teardown); the drain test stops it. The pixel-bomb test after it starts its own with the default limits
and measures that server's peak memory.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterator, List

import rexnet_serving.imageio  # noqa: F401  (before paddle: see that module)
import numpy as np
import pytest
import requests

from conftest import free_port
from images import encode, make_photo_set, photo
from rexnet_serving import pipeline_wire
from rexnet_serving.classifier import Classifier
from rexnet_serving.clients.base import BadRequestError
from rexnet_serving.clients.grpc import GrpcClient
from rexnet_serving.clients.http import HttpClient
from rexnet_serving.imageio import DecodeLimits
from rexnet_serving.results import ImageResult
from conftest import SCORED_CLASSES

pytestmark = [pytest.mark.server, pytest.mark.slow]

BIN = Path(sys.executable).parent
MAX_BYTES, MAX_PIXELS = 3_000_000, 4_000_000
START_TIMEOUT = 240


class Service:
    def __init__(self, proc: subprocess.Popen, http: int, grpc: int, metrics: int, log: Path) -> None:
        self.proc, self.http, self.grpc, self.metrics, self.log = proc, http, grpc, metrics, log
        self.statuses: List[str] = []  # /readyz answers seen while starting

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}/rexnet/prediction"

    def readyz(self) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{self.metrics}/readyz", timeout=5)

    def metric(self, name: str, **labels: str) -> float:
        text = requests.get(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5).text
        label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = re.escape(name + (f"{{{label_text}}}" if labels else "")) + r" ([0-9.e+-]+)"
        found = re.search(pattern, text)
        return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def model_dir(scored_model_dir) -> Path:
    return scored_model_dir


@pytest.fixture(scope="module")
def offline(model_dir) -> Classifier:
    # Paddle Inference on purpose (the library's CPU default is OpenVINO, as the service's): every
    # comparison in this module checks the served OpenVINO against the other runtime.
    return Classifier(model_dir, limits=DecodeLimits(MAX_BYTES, MAX_PIXELS), runtime="paddle")


@contextlib.contextmanager
def running_service(model_dir: Path, work: Path, rexnet_settings: str) -> Iterator[Service]:
    """rexnet-serve on free ports with cpu.yml plus ``rexnet_settings`` (YAML under ``rexnet:``), ready;
    killed as a process group on exit."""
    config = work / "test.yml"
    config.write_text(f"extends: {Path(__file__).resolve().parents[1] / 'serving_configs' / 'cpu.yml'}\n"
                      f"rexnet:\n{rexnet_settings}", encoding="utf-8")
    http, grpc, metrics = free_port(), free_port(), free_port()
    log = work / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(BIN / "rexnet-serve"), "--config", str(config), "--model-dir", str(model_dir),
                                 "--http-port", str(http), "--grpc-port", str(grpc), "--oip-http-port", "0",
                                 "--oip-grpc-port", "0", "--metrics-port",
                                 str(metrics), "--workdir", str(work / "wd")],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    svc = Service(proc, http, grpc, metrics, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"rexnet-serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                reply = svc.readyz()
                svc.statuses.append(f"{reply.status_code} {reply.json()['status']}")
                if reply.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        else:
            pytest.fail(f"rexnet-serve not ready after {START_TIMEOUT}s:\n{log.read_text()[-3000:]}")
        yield svc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of the group still alive (the gateway)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    with running_service(model_dir, tmp_path_factory.mktemp("service_run"),
                         f"  max_image_bytes: {MAX_BYTES}\n  max_image_pixels: {MAX_PIXELS}\n"
                         "  drain_timeout_s: 60\n") as svc:
        yield svc


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> List[Path]:
    return make_photo_set(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def clients(service):
    http, grpc = HttpClient(f"127.0.0.1:{service.http}", timeout=120), GrpcClient(f"127.0.0.1:{service.grpc}",
                                                                                 timeout=120)
    yield {"http": http, "grpc": grpc}
    http.close()
    grpc.close()


def assert_same(served: ImageResult, expected: ImageResult) -> None:
    assert served.ok and expected.ok, (served, expected)
    assert [p.class_id for p in served.predictions] == [p.class_id for p in expected.predictions]
    assert [p.label for p in served.predictions] == [p.label for p in expected.predictions]
    np.testing.assert_allclose([p.score for p in served.predictions],
                               [p.score for p in expected.predictions], atol=1e-4)


def post(service: Service, body, **kw) -> Dict:
    reply = requests.post(service.url, data=body if isinstance(body, str) else json.dumps(body), timeout=60, **kw)
    return {"status": reply.status_code, **reply.json()}


def good_request_works(service: Service, offline: Classifier) -> None:
    image = encode(photo("china", (160, 120)), "jpeg")
    answer = post(service, {"key": ["image"], "value": [base64.b64encode(image).decode()]})
    assert answer["status"] == 200 and answer.get("err_no", 0) == 0, answer
    (result,) = pipeline_wire.decode_results(answer["value"][0])
    assert_same(result, offline.classify([image], top_k=5)[0])


# -- startup --------------------------------------------------------------------------------------
def test_not_ready_before_warm_up_then_ready(service):
    assert service.statuses[0] == "503 starting"
    assert service.statuses[-1] == "200 ready"
    assert requests.get(f"http://127.0.0.1:{service.metrics}/healthz", timeout=5).json() == {"status": "alive"}
    assert service.metric("rexnet_ready") == 1.0
    text = service.log.read_text()
    assert f"http://127.0.0.1:{service.http}/rexnet/prediction" in text and "/metrics" in text


def test_work_dir_holds_paddle_serving_files(service, model_dir):
    work = Path(re.search(r"logs in (\S+)", service.log.read_text()).group(1))
    assert (work / "PipelineServingLogs").is_dir()
    assert not (model_dir / "PipelineServingLogs").exists()


# -- answers equal the offline predictor -----------------------------------------------------------
@pytest.mark.parametrize("protocol_name", ["http", "grpc"])
def test_photos_one_per_request_match_offline(service, clients, offline, photos, protocol_name):
    """Same top-5 and scores to 1e-4 as the offline predictor (OpenVINO served, Paddle offline)."""
    for path in photos:
        data = path.read_bytes()
        (served,) = clients[protocol_name].classify([data], top_k=5)
        assert_same(served, offline.classify([data], top_k=5)[0])


def test_service_runs_openvino_fp32_and_the_offline_reference_paddle(service, offline):
    """cpu.yml serves with OpenVINO FP32 and says so (ready line, /metrics); the offline predictor runs
    Paddle Inference, so every comparison with it in this module is OpenVINO against Paddle."""
    assert offline.model.runtime == "paddle"
    assert service.metric("rexnet_runtime_info", device="cpu", precision="fp32", runtime="openvino") == 1.0
    assert "(cpu, openvino fp32)" in service.log.read_text()


@pytest.mark.parametrize("protocol_name", ["http", "grpc"])
def test_multi_image_request_with_a_bad_image(service, clients, offline, photos, protocol_name):
    payloads = [photos[0].read_bytes(), photos[1].read_bytes()[:500], photos[2].read_bytes(), b"not an image"]
    results = clients[protocol_name].classify(payloads, top_k=3)
    assert [r.error_code for r in results] == [None, "truncated", None, "not_an_image"]
    for served, data in zip([results[0], results[2]], [payloads[0], payloads[2]]):
        assert_same(served, offline.classify([data], top_k=3)[0])


def test_32_concurrent_requests_with_auto_batching_are_all_correct(service, clients, offline, photos):
    payloads = [p.read_bytes() for p in photos]
    expected = [offline.classify([p], top_k=5)[0] for p in payloads]
    jobs = [(i % len(payloads), "http" if i % 2 else "grpc") for i in range(32)]
    batches_before = service.metric("rexnet_batch_images_count")
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda job: clients[job[1]].classify([payloads[job[0]]], top_k=5), jobs))
    for (index, _), (served,) in zip(jobs, answers):
        assert_same(served, expected[index])
    passes = service.metric("rexnet_batch_images_count") - batches_before
    assert 1 <= passes <= 32  # how many forward passes the 32 requests took (reported, not asserted < 32)
    print(f"32 concurrent requests ran in {passes:.0f} forward passes")


# -- bad input -------------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


JPEG = encode(photo("flower", (200, 150)), "jpeg")
BAD_HTTP = [
    # (name, body, err_no, message part, per-image error code or None)
    ("missing key", {"key": ["top_k"], "value": ["5"]}, 51, "missing_image", None),
    ("unknown key", {"key": ["image", "picture"], "value": [b64(JPEG), "x"]}, 51, "unknown_key", None),
    ("top_k 0", {"key": ["image", "top_k"], "value": [b64(JPEG), "0"]}, 51, "invalid_top_k", None),
    ("top_k too big", {"key": ["image", "top_k"], "value": [b64(JPEG), str(SCORED_CLASSES + 1)]}, 51,
     "between 1 and 10", None),
    ("top_k text", {"key": ["image", "top_k"], "value": [b64(JPEG), "many"]}, 51, "integer", None),
    ("newline after the key", {"key": ["image_0\n"], "value": [b64(JPEG)]}, 51, "unknown_key", None),
    ("keys without values", {"key": ["image", "top_k"], "value": [b64(JPEG)]}, 51, "2 keys but 1 values", None),
    ("invalid base64", {"key": ["image"], "value": ["%%%not-base64"]}, 52, "invalid_base64", "invalid_base64"),
    ("empty payload", {"key": ["image"], "value": [""]}, 52, "empty", "empty"),
    ("non-image bytes", {"key": ["image"], "value": [b64(b"hello world, not a picture")]}, 52, "not_an_image",
     "not_an_image"),
    ("truncated image", {"key": ["image"], "value": [b64(JPEG[:len(JPEG) // 2])]}, 52, "truncated", "truncated"),
    ("unsupported format", {"key": ["image"], "value": [b64(b"GIF89a" + bytes(64))]}, 52, "unsupported_format",
     "unsupported_format"),
    ("over the size limit", {"key": ["image"], "value": [b64(b"\xff\xd8\xff" + bytes(MAX_BYTES))]}, 52,
     "too_large", "too_large"),
    ("over the pixel limit", {"key": ["image"], "value": [b64(encode(np.zeros((2100, 2000, 3), np.uint8), "png"))]},
     52, "too_many_pixels", "too_many_pixels"),
]


@pytest.mark.parametrize("name, body, err_no, message, image_code", BAD_HTTP, ids=[c[0] for c in BAD_HTTP])
def test_bad_http_input_is_answered_clearly_then_service_still_works(service, offline, name, body, err_no,
                                                                     message, image_code):
    answer = post(service, body)
    assert answer["status"] == 200
    assert answer["err_no"] == err_no, answer
    assert message in answer["err_msg"]
    if image_code is None:
        assert not answer.get("value")
    else:
        (result,) = pipeline_wire.decode_results(answer["value"][0])
        assert result.error_code == image_code
    good_request_works(service, offline)


def test_invalid_json_is_refused_by_the_gateway(service, offline):
    answer = post(service, '{"key": ["image"], "value": [')
    assert answer["status"] == 400
    assert "unexpected EOF" in answer["message"] or answer["message"], answer
    good_request_works(service, offline)


def test_wrong_service_name(service, offline):
    reply = requests.post(f"http://127.0.0.1:{service.http}/resnet/prediction",
                          json={"key": ["image"], "value": [b64(JPEG)]}, timeout=30).json()
    assert reply["err_no"] == pipeline_wire.NO_SERVICE
    assert "unknown service 'resnet'" in reply["err_msg"] and "/rexnet/prediction" in reply["err_msg"]
    with pytest.raises(BadRequestError, match="3002"):
        GrpcClient(f"127.0.0.1:{service.grpc}", service_name="resnet").classify([JPEG])
    good_request_works(service, offline)


def test_bad_grpc_tensors(service, clients, offline):
    grpc_client = clients["grpc"]
    pb2 = grpc_client._pb2
    request = pb2.Request(name="rexnet", tensors=[pb2.Tensor(name="image", elem_type=1, float_data=[1.0])])
    response = grpc_client.send(request)
    assert response.err_no == pipeline_wire.INVALID_REQUEST and "elem_type 1" in response.err_msg
    request = pb2.Request(name="rexnet", key=["image"], value=[b64(JPEG)],
                          tensors=[pb2.Tensor(name="image", elem_type=13, byte_data=JPEG)])
    response = grpc_client.send(request)
    assert response.err_no == pipeline_wire.INVALID_REQUEST and "more than once" in response.err_msg
    with pytest.raises(BadRequestError, match="invalid_top_k"):
        grpc_client.classify([JPEG], top_k=0)
    (result,) = grpc_client.classify([JPEG], top_k=SCORED_CLASSES)
    assert len(result.predictions) == SCORED_CLASSES
    good_request_works(service, offline)


# -- metrics ---------------------------------------------------------------------------------------
def test_metrics_count_what_was_sent(service, clients):
    ok_before = service.metric("rexnet_requests_total", err_no="0")
    bad_before = service.metric("rexnet_requests_total", err_no="51")
    images_before = service.metric("rexnet_images_total", code="ok")
    truncated_before = service.metric("rexnet_images_total", code="truncated")
    decode_before = service.metric("rexnet_stage_seconds_count", stage="decode")
    for _ in range(3):
        clients["grpc"].classify([JPEG, JPEG[:300]], top_k=1)
    post(service, {"key": ["top_k"], "value": ["1"]})
    assert service.metric("rexnet_requests_total", err_no="0") - ok_before == 3
    assert service.metric("rexnet_requests_total", err_no="51") - bad_before == 1
    assert service.metric("rexnet_images_total", code="ok") - images_before == 3
    assert service.metric("rexnet_images_total", code="truncated") - truncated_before == 3
    assert service.metric("rexnet_stage_seconds_count", stage="decode") - decode_before == 3
    assert service.metric("rexnet_in_flight_requests") == 0
    for stage in ("decode", "preprocess", "infer", "postprocess"):
        assert service.metric("rexnet_stage_seconds_count", stage=stage) > 0


# -- the command-line client ---------------------------------------------------------------------
def test_classify_cli(service, offline, photos, tmp_path):
    files = [str(p) for p in photos[:3]]
    for protocol_name, port in (("http", service.http), ("grpc", service.grpc)):
        run = subprocess.run([str(BIN / "rexnet-classify"), *files, "--protocol", protocol_name, "--address",
                              f"127.0.0.1:{port}", "--top-k", "3", "--json"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        lines = [json.loads(line) for line in run.stdout.splitlines()]
        assert [line["file"] for line in lines] == files
        for line, path in zip(lines, photos[:3]):
            assert_same(ImageResult.from_dict(line), offline.classify([path.read_bytes()], top_k=3)[0])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    run = subprocess.run([str(BIN / "rexnet-classify"), files[0], str(bad), "--address", f"127.0.0.1:{service.http}"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "error" in run.stdout and "0." in run.stdout.splitlines()[1]
    run = subprocess.run([str(BIN / "rexnet-classify"), str(tmp_path / "missing.jpg")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "cannot read" in run.stderr


# -- drain (last: stops the server) ----------------------------------------------------------------
def test_sigterm_drains_in_flight_request_and_leaves_no_process(service, clients, offline):
    big = encode(photo("flower", (1900, 1400)), "png")
    payloads = [big] * 16
    outcome: Dict[str, object] = {}

    def slow_request() -> None:
        try:
            outcome["results"] = clients["grpc"].classify(payloads, top_k=5)
        except Exception as exc:  # reported by the assertion below
            outcome["error"] = exc

    worker = threading.Thread(target=slow_request)
    worker.start()
    deadline = time.monotonic() + 30
    while service.metric("rexnet_in_flight_requests") < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(service.proc.pid, signal.SIGTERM)
    statuses = []
    while worker.is_alive():
        try:
            reply = service.readyz()
            statuses.append(f"{reply.status_code} {reply.json()['status']}")
        except requests.ConnectionError:
            break
        time.sleep(0.02)
    worker.join(120)
    assert "error" not in outcome, outcome.get("error")
    expected = offline.classify([big], top_k=5)[0]
    for served in outcome["results"]:
        assert_same(served, expected)
    # The signal is handled within ~0.2 s (the main thread's wake-up); from then on: draining only.
    assert "503 draining" in statuses, statuses
    assert set(statuses[statuses.index("503 draining"):]) == {"503 draining"}
    assert service.proc.wait(90) == 0
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.killpg(service.proc.pid, 0)  # no process of the server's group is left (gateway included)
    assert "stopped" in service.log.read_text()


def _status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def test_pixel_bomb_is_refused_within_the_memory_budget(model_dir, offline, tmp_path):
    """16 one-colour 36 MP PNGs (~2 MB of JSON): each passes the per-image limits of the default config,
    together they would decode to 1.7 GB. With the defaults the request gets err_no 53 and the service's
    peak RSS grows by less than the README's per-request budget."""
    from rexnet_serving.imageio import REQUEST_MEMORY_BUDGET_MB
    bombs = [encode(np.full((6000, 6000, 3), 40 * i + 20, np.uint8), "png") for i in range(4)] * 4
    body = {"key": pipeline_wire.image_keys(16), "value": [b64(data) for data in bombs]}
    with running_service(model_dir, tmp_path, "  drain_timeout_s: 10\n") as svc:
        rss_before = _status_mb(svc.proc.pid, "VmRSS")
        answer = post(svc, body)
        growth = _status_mb(svc.proc.pid, "VmHWM") - rss_before
        print(f"pixel bomb ({sum(map(len, bombs)) / 1e6:.1f} MB of PNG, 576 MP): err_no {answer.get('err_no')}, "
              f"peak RSS +{growth:.0f} MB")
        assert answer["err_no"] == pipeline_wire.REQUEST_TOO_LARGE, answer
        assert answer["err_msg"].startswith("request_too_large: ") and "64000000" in answer["err_msg"]
        assert growth < REQUEST_MEMORY_BUDGET_MB
        good_request_works(svc, offline)
        # The first forward pass of max_batch_images (32) images grows Paddle's memory pool once (about
        # 0.5 GB on the CPU, kept for later batches: the steady state, whatever the pixels); do it first.
        tiny = [encode(np.full((64, 64, 3), 3 * i, np.uint8), "png") for i in range(32)]
        assert post(svc, {"key": pipeline_wire.image_keys(32), "value": [b64(data) for data in tiny]})["status"] == 200
        # A request at the defaults' edge: 64 images (the most) of 1 MP (64 MP, the pixel budget; the
        # forward passes of 64 images and per-image buffers on top) -- classified, within the budget.
        edge = [encode(np.full((1000, 1000, 3), 3 * i, np.uint8), "png") for i in range(64)]
        rss_before = _status_mb(svc.proc.pid, "VmRSS")
        answer = post(svc, {"key": pipeline_wire.image_keys(64), "value": [b64(data) for data in edge]})
        growth = _status_mb(svc.proc.pid, "VmHWM") - rss_before
        print(f"64 x 1 MP: err_no {answer.get('err_no', 0)}, peak RSS +{growth:.0f} MB")
        assert answer.get("err_no", 0) == 0 and all(r.ok for r in pipeline_wire.decode_results(answer["value"][0]))
        assert growth < REQUEST_MEMORY_BUDGET_MB
