"""rexnet-predict end to end: real exports, real photo files, the real service to compare with.

The records must equal what rexnet-serve answers for the same files (top-5 classes and scores within
1e-4, the same error codes for refused files); the output modes (table, JSONL into a pipe, JSONL/CSV
files), exit codes, and a resume after SIGKILL with a torn last line.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import rexnet_serving.imageio  # noqa: F401  (before paddle: see that module)
import numpy as np
import pytest
import requests

from conftest import SCORED_CLASSES, free_port
from images import make_photo_set
from rexnet_serving.classifier import inference_model_options
from rexnet_serving.clients.http import HttpClient
from rexnet_serving.predict_cli import build_parser, main
from rexnet_serving.results import ImageResult
from rexnet_serving.runs.cli import model_options

BIN = Path(sys.executable).parent
START_TIMEOUT = 240


def run_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "rexnet-predict"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def read_jsonl(path: Path) -> List[Dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The shared photo set (every format and colour mode) plus a truncated JPEG and a non-image."""
    folder = tmp_path_factory.mktemp("predict_photos")
    paths = make_photo_set(folder)
    (folder / "truncated.jpg").write_bytes(paths[0].read_bytes()[:700])
    (folder / "text.png").write_bytes(b"not an image at all")
    return folder


@pytest.fixture(scope="module")
def service(scored_model_dir, tmp_path_factory):
    """rexnet-serve on the same export (cpu.yml, free ports), stopped with its process group."""
    work = tmp_path_factory.mktemp("predict_service")
    http, grpc, metrics = free_port(), free_port(), free_port()
    log = work / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(BIN / "rexnet-serve"), "--model-dir", str(scored_model_dir),
                                 "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port",
                                 str(metrics), "--oip-http-port", "0", "--oip-grpc-port", "0",
                                 "--workdir", str(work / "wd")],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert proc.poll() is None, f"rexnet-serve exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"rexnet-serve not ready:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"http://127.0.0.1:{metrics}/readyz", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        client = HttpClient(f"127.0.0.1:{http}", timeout=120)
        yield client
        client.close()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)


@pytest.mark.server
def test_records_equal_the_service_answers(service, scored_model_dir, photos, tmp_path):
    out = tmp_path / "out.jsonl"
    run = run_cli(photos, "-m", scored_model_dir, "-o", out, "--batch-size", "4", "--top-k", "5")
    assert run.returncode == 1, run.stderr  # two refused files
    records = read_jsonl(out)
    files = sorted(p for p in photos.iterdir())
    assert sorted(Path(r["path"]) for r in records) == files
    compared, worst = 0, 0.0
    for record in records:
        (served,) = service.classify([Path(record["path"]).read_bytes()], top_k=5)
        mine = ImageResult.from_dict(record)
        assert mine.error_code == served.error_code, record["path"]
        if served.ok:
            assert [p.class_id for p in mine.predictions] == [p.class_id for p in served.predictions]
            assert [p.label for p in mine.predictions] == [p.label for p in served.predictions]
            np.testing.assert_allclose([p.score for p in mine.predictions],
                                       [p.score for p in served.predictions], atol=1e-4)
            worst = max(worst, float(np.max(np.abs(np.subtract([p.score for p in mine.predictions],
                                                                [p.score for p in served.predictions])))))
            compared += 1
    assert compared == len(files) - 2
    print(f"rexnet-predict vs rexnet-serve: {compared} images, top-5 max score difference {worst:.2g}")
    codes = {Path(r["path"]).name: r["error"]["code"] for r in records if not r["ok"]}
    assert codes == {"truncated.jpg": "truncated", "text.png": "not_an_image"}
    assert f"{len(files)} processed" in run.stderr and "truncated=1" in run.stderr


def test_stdout_jsonl_csv_table_and_exit_codes(scored_model_dir, photos, tmp_path):
    good = sorted(photos.glob("china_*"))
    run = run_cli(*good, "-m", scored_model_dir, "--top-k", "3")  # stdout is a pipe: JSONL
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [Path(r["path"]) for r in lines] == good and all(len(r["predictions"]) == 3 for r in lines)

    table = run_cli(*good, photos / "text.png", "-m", scored_model_dir, "--top-k", "2", "--table")
    assert table.returncode == 1
    rows = table.stdout.splitlines()
    assert rows[0].split() == ["image", "class", "score", "label"]
    assert len(rows) == 1 + 2 * len(good) + 1 and "error not_an_image" in rows[-1]
    top1 = lines[0]["predictions"][0]
    assert f"{top1['score']:.4f}" in rows[1] and top1["label"] in rows[1]

    out = tmp_path / "out.csv"
    assert run_cli(photos, "-m", scored_model_dir, "-o", out).returncode == 1
    with out.open(newline="") as f:
        table_rows = list(csv.DictReader(f))
    assert len(table_rows) == len(list(photos.iterdir()))
    by_name = {Path(r["path"]).name: r for r in table_rows}
    assert by_name["text.png"]["error_code"] == "not_an_image" and by_name["text.png"]["ok"] == "false"
    first = by_name[Path(lines[0]["path"]).name]
    assert int(first["top1_class_id"]) == top1["class_id"]
    assert float(first["top1_score"]) == pytest.approx(top1["score"], abs=1e-6)


def test_usage_and_model_errors_exit_2_with_one_line(scored_model_dir, photos, tmp_path, capsys):
    cases = [
        (["--top-k", str(SCORED_CLASSES + 1)], "--top-k must be between 1 and 10"),
        (["-m", str(tmp_path / "no-model")], "cannot load the model"),
        (["-o", str(tmp_path / "out.txt")], "cannot tell the output format"),
        (["--runtime", "paddle", "--precision", "bf16"], "precision bf16 needs runtime openvino"),
    ]
    for args, message in cases:
        code = main([str(photos), "-m", str(scored_model_dir), "--no-progress", *args])
        err = capsys.readouterr().err
        assert code == 2, err
        assert message in err and "Traceback" not in err
        assert err.strip().count("\n") == 0, err
    assert main([str(photos), "-m", str(scored_model_dir), "--no-progress", "--runtime", "openvino"]) == 1
    assert "Traceback" not in capsys.readouterr().err  # runs on OpenVINO (exit 1: the set's 2 bad files)
    assert main([str(tmp_path / "nothing-here"), "-m", str(scored_model_dir)]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_resume_after_sigkill_does_each_image_once(scored_model_dir, photos, tmp_path):
    many = tmp_path / "many"
    many.mkdir()
    source = next(photos.glob("china_100x80*"))
    for i in range(60):
        shutil.copy(source, many / f"{i:03d}.png")
    out = tmp_path / "out.jsonl"
    argv = [str(BIN / "rexnet-predict"), str(many), "-m", str(scored_model_dir), "-o", str(out),
            "--batch-size", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_text().count("\n") >= 3):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()
    before = out.read_text().count("\n")
    assert before < 60, "the run finished before it could be killed"
    with out.open("a") as f:
        f.write('{"path": "' + str(many / "999.png"))  # a torn last line, as a kill mid-write leaves
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f"{60 - before} processed, {before} skipped" in run.stderr and "cut a torn last line" in run.stderr
    records = read_jsonl(out)
    assert sorted(r["path"] for r in records) == sorted(str(p) for p in many.iterdir())
    assert len({json.dumps(r["predictions"]) for r in records}) == 1  # the same image each time


def test_model_options_go_through_the_services_mapping():
    args = build_parser().parse_args(["x.jpg", "--threads", "3"])
    # the service's default runtime on the same device (rexnet_serving.runtimes.default_runtime)
    assert model_options(args, max_batch=16) == inference_model_options(thread_num=3, max_batch=16, runtime="openvino")
    args = build_parser().parse_args(["x.jpg", "--device", "gpu"])
    assert model_options(args, max_batch=16)["runtime"] == "paddle"
    assert "--runtime" in build_parser().format_help() and "--precision" in build_parser().format_help()


def test_help_and_in_process_main(scored_model_dir, photos, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "Exit codes" in capsys.readouterr().out
    out = tmp_path / "o.jsonl"
    assert main([str(next(photos.glob("flower_*"))), "-m", str(scored_model_dir), "-o", str(out),
                 "--no-progress"]) == 0
    assert len(read_jsonl(out)) == 1
