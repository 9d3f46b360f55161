"""rexnet-batch end to end against a real HTTP server that decides per image how to answer.

The server stands in for the rexnet service: it knows each test image by the SHA-256 of its bytes and
answers with that image's class id, a per-image error, 503 a few times, 400, or slowly. Most tests reach
it through a test-local client (registered in a monkeypatched copy of PROTOCOLS) that speaks a minimal
JSON form with requests, mapping 503 and connection failures to TransientError and 400 to
BadRequestError, as the real clients do. One test goes through the real HttpClient: the server also
answers the Pipeline service's HTTP form (rexnet_serving.pipeline_wire) at /rexnet/prediction. The real
service end to end is covered elsewhere.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from base64 import b64decode, b64encode
from collections import Counter
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import pytest
import requests

from conftest import REPO_ROOT, free_port
from rexnet_serving import defaults
from rexnet_serving.clients import base
from rexnet_serving.clients.base import BadRequestError, TransientError, make_client
from rexnet_serving.clients.batch import (CSV_FIELDS, BatchSummary, UsageError, collect_inputs,
                                          default_address, main, run_batch)
from rexnet_serving.results import ImageResult, Prediction

FAKE = "fake"
FAKE_CLIENT = f"{Path(__file__).stem}:FakeServiceClient"


# ------------------------------------------------------------------------------------ the fake service

def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeService:
    """A real ThreadingHTTPServer on 127.0.0.1: POST /classify {"images": [base64], "top_k": k}."""

    def __init__(self) -> None:
        self.behaviour: Dict[str, dict] = {}
        self.hits: Counter = Counter()          # image digest -> times it arrived in a request
        self.request_sizes: List[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.barrier = None                     # set to a threading.Barrier to prove concurrency
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), self._handler())
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def add(self, data: bytes, class_id: int, error: str = "", fail_times: int = 0, bad: bool = False,
            delay: float = 0.0) -> None:
        self.behaviour[_digest(data)] = dict(class_id=class_id, error=error, fail_times=fail_times,
                                             bad=bad, delay=delay)

    def hits_of(self, data: bytes) -> int:
        return self.hits[_digest(data)]

    def answer(self, images: List[bytes], top_k: int) -> Tuple[int, object]:
        """(HTTP status, the per-image results or an error message) for one request."""
        digests = [_digest(image) for image in images]
        with self.lock:
            self.request_sizes.append(len(digests))
            self.hits.update(digests)
            known = [self.behaviour.get(d) for d in digests]
            if any(b is None or b["bad"] for b in known):
                return 400, "unknown or malformed image"
            flaky = [b for b in known if b["fail_times"] > 0]
            for b in flaky:
                b["fail_times"] -= 1
            if flaky:
                return 503, "overloaded"
        time.sleep(max(b["delay"] for b in known))
        if self.barrier is not None:
            self.barrier.wait(timeout=30)
        results = []
        for b in known:
            if b["error"]:
                results.append(ImageResult.failure(b["error"], f"image {b['class_id']} is {b['error']}"))
            else:
                results.append(ImageResult([Prediction(b["class_id"] + j, f"class {b['class_id'] + j}",
                                                       1.0 / (j + 2)) for j in range(top_k)]))
        return 200, results

    def test_protocol(self, body: dict) -> Tuple[int, dict]:
        """POST /classify {"images": [base64], "top_k": k} -> {"results": [...]} or {"error": "..."}."""
        status, answer = self.answer([b64decode(image) for image in body["images"]], body["top_k"])
        if status != 200:
            return status, {"error": answer}
        return status, {"results": [r.to_dict() for r in answer]}

    def pipeline_protocol(self, body: dict) -> Tuple[int, dict]:
        """POST /rexnet/prediction in the Pipeline service's JSON, read and written with its own helpers."""
        from rexnet_serving import pipeline_wire
        try:
            payloads, top_k = pipeline_wire.parse_fields(dict(zip(body["key"], body["value"])), max_images=64,
                                                    max_top_k=1000, default_top_k=pipeline_wire.DEFAULT_TOP_K)
        except pipeline_wire.RequestError as e:
            return 200, {"err_no": pipeline_wire.INVALID_REQUEST, "err_msg": e.message}
        status, answer = self.answer([b64decode(p) for p in payloads], top_k)
        if status == 400:
            return 200, {"err_no": pipeline_wire.INVALID_REQUEST, "err_msg": answer}
        if status != 200:
            return status, {"err_no": pipeline_wire.CLOSED_ERROR, "err_msg": answer}
        err_no = pipeline_wire.INVALID_IMAGE if all(not r.ok for r in answer) else pipeline_wire.OK
        return 200, {"err_no": err_no, "err_msg": "", "key": [pipeline_wire.RESULTS_KEY],
                     "value": [pipeline_wire.encode_results(answer)]}

    def _handler(self):
        service = self
        routes = {"/classify": service.test_protocol,
                  f"/{defaults.SERVICE_NAME}/prediction": service.pipeline_protocol}

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                with service.lock:
                    service.in_flight += 1
                    service.max_in_flight = max(service.max_in_flight, service.in_flight)
                try:
                    body = self.rfile.read(int(self.headers["Content-Length"]))
                    status, answer = routes[self.path](json.loads(body))
                finally:
                    with service.lock:
                        service.in_flight -= 1
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        return Handler


class FakeServiceClient:
    """A ClassifierClient for FakeService, built by make_client through the patched registry."""

    def __init__(self, address: str, timeout: float = 30.0, **options) -> None:
        self.url = f"http://{address}/classify"
        self.timeout = timeout
        self.session = requests.Session()

    def classify(self, images: Sequence[bytes], top_k: int = 5) -> List[ImageResult]:
        payload = {"images": [b64encode(image).decode() for image in images], "top_k": top_k}
        try:
            response = self.session.post(self.url, json=payload, timeout=self.timeout)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise TransientError(str(e)) from e
        if response.status_code == 503:
            raise TransientError("503 overloaded")
        if response.status_code == 400:
            raise BadRequestError(response.json()["error"])
        response.raise_for_status()
        return [ImageResult.from_dict(r) for r in response.json()["results"]]

    def close(self) -> None:
        self.session.close()


@pytest.fixture
def service():
    fake = FakeService()
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()


@pytest.fixture(autouse=True)
def fake_protocol(monkeypatch):
    monkeypatch.setitem(base.PROTOCOLS, FAKE, FAKE_CLIENT)


def png(index: int) -> bytes:
    """A small real PNG, different for every index (the batch client never decodes it)."""
    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = index % 256, (index // 256) % 256, 77
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


def make_images(folder: Path, count: int, service: FakeService, name: str = "img{:03d}.png",
                first: int = 0, **behaviour) -> Dict[Path, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for i in range(first, first + count):
        path = folder / name.format(i)
        data = png(i)
        path.write_bytes(data)
        service.add(data, class_id=i, **behaviour)
        made[path.resolve()] = data
    return made


def cli(service: FakeService, *args: str) -> int:
    return main(["--protocol", FAKE, "--address", service.address, "--no-progress", "--backoff", "0.01",
                 *map(str, args)])


def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def class_of(path: str) -> int:
    return int(Path(path).stem[-3:])


# ---------------------------------------------------------------------------------------------- inputs

def test_folder_input_is_recursive_case_insensitive_and_sorted(tmp_path, service):
    made = make_images(tmp_path / "in", 3, service)
    made.update(make_images(tmp_path / "in" / "sub", 2, service, name="pic{:03d}.JPG", first=3))
    made.update(make_images(tmp_path / "in" / "sub", 1, service, name="pic{:03d}.WebP", first=5))
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "img999.gif").write_bytes(b"GIF89a")

    items = collect_inputs([tmp_path / "in"])
    assert [item.path for item in items] == sorted(made)
    assert all(item.label is None for item in items)

    out = tmp_path / "out.jsonl"
    assert cli(service, tmp_path / "in", "-o", out, "--concurrency", 3) == 0
    records = read_jsonl(out)
    assert sorted(r["path"] for r in records) == sorted(map(str, made))
    for r in records:
        assert r["ok"] is True and "error" not in r and "label" not in r
        assert [p["class_id"] for p in r["predictions"]] == [class_of(r["path"]) + j for j in range(5)]
        assert r["predictions"][0]["label"] == f"class {class_of(r['path'])}"


def test_real_photos_in_every_format_arrive_byte_for_byte(tmp_path, service):
    from images import make_photo_set  # real photos (JPEG, PNG, BMP, WebP) from the shared test helper

    photos = make_photo_set(tmp_path / "photos")
    for i, path in enumerate(photos):
        service.add(path.read_bytes(), class_id=i)
    out = tmp_path / "out.jsonl"
    assert cli(service, tmp_path / "photos", "-o", out, "--batch-size", 4, "--concurrency", 2) == 0
    records = {r["path"]: r for r in read_jsonl(out)}
    assert set(records) == {str(p.resolve()) for p in photos}
    for i, path in enumerate(photos):
        assert records[str(path.resolve())]["predictions"][0]["class_id"] == i
        assert service.hits_of(path.read_bytes()) == 1


def test_glob_and_list_file_inputs_into_csv(tmp_path, service):
    globbed = make_images(tmp_path / "g", 3, service)
    listed = make_images(tmp_path / "l" / "imgs", 3, service, first=10)
    spaced = tmp_path / "l" / "imgs" / "with space 020.png"
    spaced.write_bytes(png(20))
    service.add(png(20), class_id=20)
    listing = tmp_path / "l" / "val_list.txt"
    lines = ["# PaddleClas val list", ""]
    lines += [f"imgs/{p.name} {i}" for i, p in enumerate(sorted(listed))]
    lines += ["imgs/with space 020.png"]  # an existing path with a space and no label
    lines += [f"\t{sorted(listed)[0]}\t7"]  # absolute path, tab delimiter, duplicate: first mention wins
    listing.write_text("\n".join(lines) + "\n")

    items = collect_inputs([str(tmp_path / "g" / "*.png"), listing])
    assert [item.path for item in items] == sorted(globbed) + sorted(listed) + [spaced.resolve()]
    assert [item.label for item in items] == [None] * 3 + ["0", "1", "2", None]

    out = tmp_path / "res" / "out.csv"  # the folder is created
    assert cli(service, str(tmp_path / "g" / "*.png"), listing, "-o", out, "--top-k", 3,
               "--batch-size", 2) == 0
    with open(out, newline="") as f:
        assert tuple(next(csv.reader(f))) == CSV_FIELDS
    with open(out, newline="") as f:
        rows = {row["path"]: row for row in csv.DictReader(f)}
    assert set(rows) == {str(item.path) for item in items}
    for item in items:
        row = rows[str(item.path)]
        expected = 20 if item.path == spaced.resolve() else class_of(row["path"])
        assert row["ok"] == "true" and row["error_code"] == "" and row["error_message"] == ""
        assert int(row["top1_class_id"]) == expected and row["top1_label"] == f"class {expected}"
        assert float(row["top1_score"]) == 0.5
        assert [p["class_id"] for p in json.loads(row["topk"])] == [expected, expected + 1, expected + 2]
        assert row["label"] == (item.label or "")


def test_usage_errors_exit_2_with_one_line(tmp_path, service, capsys):
    make_images(tmp_path / "in", 1, service)
    (tmp_path / "empty").mkdir()
    (tmp_path / "d.jsonl").mkdir()
    out = tmp_path / "out.jsonl"
    cases = [
        ([tmp_path / "empty", "-o", out], "no images found"),
        ([tmp_path / "missing", "-o", out], "no such file or directory"),
        ([str(tmp_path / "*.jpg"), "-o", out], "no images found"),
        ([tmp_path / "in", "-o", tmp_path / "out.txt"], "cannot tell the output format"),
        ([tmp_path / "in", "-o", tmp_path / "d.jsonl"], "is a directory"),
    ]
    for args, message in cases:
        assert cli(service, *args) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1
    for flag in (["--concurrency", "0"], ["--batch-size", "-1"], ["--timeout", "0"], ["--retries", "x"],
                 ["--protocol", "smoke-signals"]):
        with pytest.raises(SystemExit) as exit_:
            cli(service, tmp_path / "in", "-o", out, *flag)
        assert exit_.value.code == 2
    assert not out.exists()

    binary_list = tmp_path / "photo.tiff"
    binary_list.write_bytes(bytes(range(256)))
    assert cli(service, binary_list, "-o", out) == 2
    assert "nor a UTF-8 list file" in capsys.readouterr().err

    with pytest.raises(UsageError, match="no inputs"):
        collect_inputs([])


def test_default_addresses_come_from_defaults(service, tmp_path, capsys):
    assert default_address("http") == f"127.0.0.1:{defaults.HTTP_PORT}"
    assert default_address("grpc") == f"127.0.0.1:{defaults.GRPC_PORT}"
    assert default_address("brpc") == f"127.0.0.1:{defaults.BRPC_PORT}"
    make_images(tmp_path / "in", 1, service)
    assert main(["--protocol", FAKE, str(tmp_path / "in"), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "--address" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ errors, retries

def test_per_image_errors_and_unreadable_files_are_recorded_and_exit_1(tmp_path, service, capsys):
    good = make_images(tmp_path / "in", 3, service)
    broken = make_images(tmp_path / "in", 1, service, first=3, error="truncated")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([*(str(p) for p in [*good, *broken]), "in/gone.png 4",
                                  "in/folder.png"]) + "\n")
    (tmp_path / "in" / "folder.png").mkdir()  # listed, exists, but cannot be read as a file
    out = tmp_path / "out.jsonl"

    assert cli(service, listing, "-o", out, "--batch-size", 3) == 1
    records = {r["path"]: r for r in read_jsonl(out)}
    assert len(records) == 6
    for path in good:
        assert records[str(path)]["ok"] is True
    (broken_path,) = broken
    assert records[str(broken_path)] == {"path": str(broken_path), "ok": False,
                                         "error": {"code": "truncated", "message": "image 3 is truncated"}}
    gone = records[str((tmp_path / "in" / "gone.png").resolve())]
    assert gone["ok"] is False and gone["error"]["code"] == "unreadable" and gone["label"] == "4"
    assert records[str((tmp_path / "in" / "folder.png").resolve())]["error"]["code"] == "unreadable"
    err = capsys.readouterr().err
    assert "6 images: 6 processed, 0 skipped" in err and "truncated=1" in err and "unreadable=2" in err

    # A rerun has nothing to do but still reports the failures in the output.
    assert cli(service, listing, "-o", out) == 1
    assert "6 skipped" in capsys.readouterr().err
    assert len(read_jsonl(out)) == 6


def test_transient_503s_are_retried_until_they_succeed(tmp_path, service):
    flaky = make_images(tmp_path / "in", 2, service, fail_times=3)
    out = tmp_path / "out.jsonl"
    assert cli(service, tmp_path / "in", "-o", out, "--retries", 3, "--batch-size", 2) == 0
    assert all(r["ok"] for r in read_jsonl(out))
    assert [service.hits_of(data) for data in flaky.values()] == [4, 4]  # 3 failures + 1 success


def test_retries_are_bounded_then_unavailable(tmp_path, service, capsys):
    flaky = make_images(tmp_path / "in", 3, service, fail_times=100)
    out = tmp_path / "out.csv"
    assert cli(service, tmp_path / "in", "-o", out, "--retries", 2) == 1
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert all(r["ok"] == "false" and r["error_code"] == "unavailable" for r in rows)
    assert all("503 overloaded" in r["error_message"] and "3 attempts" in r["error_message"] for r in rows)
    assert [service.hits_of(data) for data in flaky.values()] == [3, 3, 3]
    assert "unavailable=3" in capsys.readouterr().err


def test_redo_does_the_named_errors_again_and_keeps_each_image_once(tmp_path, service, capsys):
    made = make_images(tmp_path / "in", 4, service)
    others = make_images(tmp_path / "other", 1, service, first=4)
    for fmt in ("jsonl", "csv"):
        out = tmp_path / f"out.{fmt}"
        assert cli(service, tmp_path / "other", "-o", out) == 0
        service.server.shutdown()  # the service goes away: every image is "unavailable"
        rc = main(["--protocol", FAKE, "--address", f"127.0.0.1:{free_port()}", "--no-progress",
                   "--backoff", "0.01", "--retries", "0", str(tmp_path / "in"), "-o", str(out)])
        assert rc == 1
        service.thread = threading.Thread(target=service.server.serve_forever, args=(0.05,), daemon=True)
        service.thread.start()
        capsys.readouterr()
        assert cli(service, tmp_path / "in", "-o", out) == 1  # plain resume: the errors stay
        assert "4 skipped (already in the output, 4 of them errors)" in capsys.readouterr().err
        # A redo of another code changes nothing; of "unavailable", redoes exactly those four.
        assert cli(service, tmp_path / "in", "-o", out, "--redo", "truncated") == 1
        assert cli(service, tmp_path / "in", "-o", out, "--redo", "truncated,unavailable") == 0
        assert "redid 4 images" in capsys.readouterr().err
        if fmt == "jsonl":
            records = read_jsonl(out)
        else:
            with open(out, newline="") as f:
                records = [dict(row, ok=row["ok"] == "true") for row in csv.DictReader(f)]
        assert sorted(r["path"] for r in records) == sorted(map(str, [*made, *others]))
        assert all(r["ok"] for r in records)
        assert not (tmp_path / f"out.{fmt}.tmp").exists()


def test_bad_request_is_not_retried(tmp_path, service):
    bad = make_images(tmp_path / "in", 2, service, bad=True)
    out = tmp_path / "out.jsonl"
    assert cli(service, tmp_path / "in", "-o", out, "--retries", 5) == 1
    records = read_jsonl(out)
    assert [r["error"]["code"] for r in records] == ["bad_request"] * 2
    assert all(r["error"]["message"] == "unknown or malformed image" for r in records)
    assert [service.hits_of(data) for data in bad.values()] == [1, 1]


def test_no_server_means_unavailable_not_a_crash(tmp_path, service):
    make_images(tmp_path / "in", 2, service)
    out = tmp_path / "out.jsonl"
    nobody = f"127.0.0.1:{free_port()}"
    rc = main(["--protocol", FAKE, "--address", nobody, "--no-progress", "--backoff", "0.01",
               "--retries", "1", str(tmp_path / "in"), "-o", str(out)])
    assert rc == 1
    assert [r["error"]["code"] for r in read_jsonl(out)] == ["unavailable"] * 2


# -------------------------------------------------------------------------------- concurrency, batches

def test_requests_run_concurrently_and_images_are_grouped(tmp_path, service):
    make_images(tmp_path / "in", 8, service)
    service.barrier = threading.Barrier(4)  # passes only when 4 requests are inside the server at once
    out = tmp_path / "out.jsonl"
    assert cli(service, tmp_path / "in", "-o", out, "--concurrency", 4) == 0
    assert service.max_in_flight == 4
    assert service.request_sizes == [1] * 8

    service.barrier = None
    service.request_sizes.clear()
    assert cli(service, tmp_path / "in", "-o", out, "--overwrite", "--concurrency", 1,
               "--batch-size", 3) == 0
    assert service.request_sizes == [3, 3, 2]
    records = read_jsonl(out)
    # One worker: the output is in input order; --overwrite started the file over.
    assert [class_of(r["path"]) for r in records] == list(range(8))
    assert all(r["predictions"][0]["class_id"] == class_of(r["path"]) for r in records)


def test_python_api_returns_a_summary(tmp_path, service):
    make_images(tmp_path / "in", 4, service)
    make_images(tmp_path / "in", 1, service, first=4, error="unsupported")
    factory = partial(make_client, FAKE, service.address, timeout=5.0)
    summary = run_batch([tmp_path / "in"], tmp_path / "out.jsonl", factory, concurrency=2, batch_size=2,
                        top_k=1, retries=0, progress=False)
    assert isinstance(summary, BatchSummary)
    assert (summary.total, summary.processed, summary.skipped, summary.succeeded) == (5, 5, 0, 4)
    assert summary.errors == {"unsupported": 1} and summary.exit_code() == 1
    assert all(len(r.get("predictions", [])) in (0, 1) for r in read_jsonl(tmp_path / "out.jsonl"))
    with pytest.raises(ValueError, match="concurrency"):
        run_batch([tmp_path / "in"], tmp_path / "o2.jsonl", factory, concurrency=0)


# ------------------------------------------------------------------------------ resume, interruptions

def test_torn_last_line_is_cut_and_its_image_redone(tmp_path, service, capsys):
    made = make_images(tmp_path / "in", 4, service)
    paths = sorted(made)
    for fmt, header in (("jsonl", ""), ("csv", ",".join(CSV_FIELDS) + "\n")):
        out = tmp_path / f"out.{fmt}"
        assert cli(service, paths[0], paths[1], "-o", out) == 0
        done = out.read_text()
        torn = done + (json.dumps({"path": str(paths[2]), "ok": True})[:25] if fmt == "jsonl"
                       else f'{paths[2]},true,2,"class')
        out.write_text(torn)
        service.hits.clear()
        assert cli(service, tmp_path / "in", "-o", out) == 0
        err = capsys.readouterr().err
        assert "2 skipped" in err and "cut a torn last line" in err
        assert out.read_text().startswith(done)
        if fmt == "jsonl":
            got = [r["path"] for r in read_jsonl(out)]
        else:
            with open(out, newline="") as f:
                got = [row["path"] for row in csv.DictReader(f)]
        assert sorted(got) == sorted(map(str, paths))  # each exactly once
        assert [service.hits_of(made[p]) for p in paths] == [0, 0, 1, 1]

    # A torn CSV header alone is written again.
    out = tmp_path / "header.csv"
    out.write_text("path,ok,top1")
    assert cli(service, paths[0], "-o", out) == 0
    assert out.read_text().splitlines()[0] == ",".join(CSV_FIELDS)


def test_a_corrupt_line_in_the_middle_is_a_usage_error(tmp_path, service, capsys):
    make_images(tmp_path / "in", 2, service)
    out = tmp_path / "out.jsonl"
    out.write_text('{"path": "/a.png", "ok": true}\nnot json at all\n{"path": "/b.png", "ok": false}\n')
    before = out.read_text()
    assert cli(service, tmp_path / "in", "-o", out) == 2
    assert f"{out}:2: not a rexnet-batch jsonl result line" in capsys.readouterr().err
    assert out.read_text() == before  # harmed nothing
    assert cli(service, tmp_path / "in", "-o", out, "--overwrite") == 0
    assert len(read_jsonl(out)) == 2


def _start_cli(service: FakeService, *args: str) -> subprocess.Popen:
    # The subprocess registers the same fake protocol, then runs the real CLI.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from rexnet_serving.clients import base; "
            f"base.PROTOCOLS[{FAKE!r}] = {FAKE_CLIENT!r}; "
            "from rexnet_serving.clients.batch import main; sys.exit(main(sys.argv[2:]))")
    return subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent),
                             "--protocol", FAKE, "--address", service.address, *map(str, args)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lines(path: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and path.read_text().count("\n") >= count:
            return
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"the CLI wrote fewer than {count} lines (rc {process.poll()}): "
                         f"{process.communicate()[1]}")


@pytest.mark.slow
def test_resume_after_sigkill_writes_every_image_exactly_once(tmp_path, service):
    made = make_images(tmp_path / "in", 24, service, delay=0.15)
    out = tmp_path / "out.jsonl"
    first = _start_cli(service, tmp_path / "in", "-o", out, "--concurrency", 2)
    try:
        _wait_for_lines(out, 6, first)
        os.kill(first.pid, signal.SIGKILL)
        first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL
    written = out.read_text()
    done = [json.loads(line)["path"] for line in written.split("\n")[:-1]]  # complete lines only
    assert 6 <= len(done) < 24

    service.hits.clear()
    second = _start_cli(service, tmp_path / "in", "-o", out, "--concurrency", 4)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert f"24 images: {24 - len(done)} processed, {len(done)} skipped" in err
    records = read_jsonl(out)
    assert sorted(r["path"] for r in records) == sorted(map(str, made))  # each exactly once
    assert all(r["ok"] and r["predictions"][0]["class_id"] == class_of(r["path"]) for r in records)
    for path, data in made.items():
        assert service.hits_of(data) == (0 if str(path) in done else 1)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_flushes_reports_and_exits_128_plus_signal(tmp_path, service, sig, code):
    made = make_images(tmp_path / "in", 40, service, delay=0.2)
    out = tmp_path / "out.csv"
    process = _start_cli(service, tmp_path / "in", "-o", out, "--concurrency", 2)
    try:
        _wait_for_lines(out, 4, process)  # the header and 3 rows
        process.send_signal(sig)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == code, err
    assert "interrupted" in err and "Traceback" not in err
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert out.read_text().endswith("\n") and 3 <= len(rows) < 40
    assert all(row["ok"] == "true" for row in rows)
    assert f"40 images: {len(rows)} processed, 0 skipped" in err

    assert cli(service, tmp_path / "in", "-o", out, "--concurrency", 4) == 0
    with open(out, newline="") as f:
        assert sorted(row["path"] for row in csv.DictReader(f)) == sorted(map(str, made))


def test_through_the_real_http_client(tmp_path, service, capsys):
    # --protocol http: the registered HttpClient, unpatched, against the Pipeline JSON form.
    good = make_images(tmp_path / "in", 5, service)
    broken = make_images(tmp_path / "in", 1, service, first=5, error="truncated")
    flaky = make_images(tmp_path / "in", 2, service, first=6, fail_times=2)
    bad = make_images(tmp_path / "in", 1, service, first=8, bad=True)
    out = tmp_path / "out.jsonl"
    rc = main(["--protocol", "http", "--address", service.address, "--no-progress", "--backoff", "0.01",
               "--top-k", "2", str(tmp_path / "in"), "-o", str(out)])
    assert rc == 1
    records = {r["path"]: r for r in read_jsonl(out)}
    assert len(records) == 9
    for path in [*good, *flaky]:
        r = records[str(path)]
        assert r["ok"] and [p["class_id"] for p in r["predictions"]] == [class_of(str(path)),
                                                                          class_of(str(path)) + 1]
    assert records[str(next(iter(broken)))]["error"]["code"] == "truncated"
    assert records[str(next(iter(bad)))]["error"]["code"] == "bad_request"
    assert [service.hits_of(d) for d in flaky.values()] == [3, 3]
    assert [service.hits_of(d) for d in bad.values()] == [1]
    assert "bad_request=1, truncated=1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- shards

def test_shards_through_the_service_then_merge(tmp_path, service, capsys, monkeypatch):
    made = make_images(tmp_path / "in", 30, service)
    out = tmp_path / "res" / "out.csv"
    for index in range(3):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))  # as an Indexed Job's pod
        assert cli(service, tmp_path / "in", "-o", out, "--shard-count", 3, "--concurrency", 2) == 0
        assert f"rexnet-batch shard {index}/3:" in capsys.readouterr().err
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    assert all(service.hits_of(data) == 1 for data in made.values())  # each image sent once
    for index in range(3):
        with open(tmp_path / "res" / f"out-{index:05d}-of-00003.csv", newline="") as f:
            assert list(csv.DictReader(f))  # every shard got some images
    assert main(["merge", str(tmp_path / "in"), "-o", str(out)]) == 0
    assert "COMPLETE, every input exactly once" in capsys.readouterr().err
    summary = json.loads((tmp_path / "res" / "out-summary.json").read_text())
    assert summary["records"] == summary["inputs"] == 30 and summary["model"] is None  # a service: no digest
    # an image added to the folder after the run: the merge names it and fails
    make_images(tmp_path / "in", 1, service, first=30)
    assert main(["merge", str(tmp_path / "in"), "-o", str(out)]) == 1
    assert "missing 1" in capsys.readouterr().err
