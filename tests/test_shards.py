"""Sharded runs (rexnet_serving.runs: shards, storage, run, merge) end to end.

Real rexnet-predict processes on one export (the session's ReXNet_1_0, OpenVINO: the faster runtime
here) over one listing of real image files: four shards, one SIGKILLed half-way and rerun, and the merge
must find every image exactly once; the same with inputs and outputs on a real S3-protocol server
(moto's standalone server, started on 127.0.0.1 and stopped after) in Parquet; the partition's
stability; the CSV path escape; clear errors for a missing bucket and missing credentials.
"""
from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import pytest

from conftest import free_port
from images import encode, photo
from rexnet_serving.results import ImageResult, Prediction
from rexnet_serving.runs.inputs import InputItem, collect_inputs
from rexnet_serving.runs.output import ResultWriter
from rexnet_serving.runs.shards import Shard, parse_shard, resolve_shard, select, shard_of, shard_output
from rexnet_serving.runs.summary import UsageError

BIN = Path(sys.executable).parent
SHARDS = 4
FAST = ["--runtime", "openvino", "--threads", "1", "--decode-workers", "1", "--no-progress"]


def write_images(folder: Path, count: int) -> List[Path]:
    """``count`` small real images (PNG and JPEG, a few sizes), in nested folders like a dataset."""
    paths = []
    for i in range(count):
        image = photo(("china", "flower")[i % 2], (40 + i % 7, 32 + i % 5))
        fmt, suffix = (("png", ".png"), ("jpeg", ".jpg"))[i % 2]
        path = folder / f"class_{i % 3}" / f"img_{i:03d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(image, fmt))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shard_images")
    write_images(folder, 72)
    (folder / "class_0" / "broken.png").write_bytes(b"not an image at all")  # one error by code
    return folder


def predict(*args, env: Dict[str, str] = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "rexnet-predict"), *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


def kill_once_written(proc: subprocess.Popen, records: Callable[[], int], at_least: int = 3) -> int:
    """SIGKILL ``proc`` once ``records()`` reaches ``at_least``; the records there after the kill."""
    deadline = time.monotonic() + 240
    while records() < at_least:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no records in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()
    return records()


def merge(*args, env: Dict[str, str] = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "rexnet-batch"), "merge", *map(str, args)], capture_output=True,
                          text=True, timeout=120, env=env)


# ------------------------------------------------------------------------------------- partition

def test_partition_is_stable_however_the_input_is_listed(dataset: Path, tmp_path: Path) -> None:
    folder = collect_inputs([dataset])
    shuffled = list(folder)
    random.Random(1).shuffle(shuffled)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{os.path.relpath(i.path, tmp_path)} 7\n" for i in shuffled))
    by_list = collect_inputs([listing])
    by_glob = collect_inputs([str(dataset / "class_*" / "*.*")])
    for n in (1, 3, SHARDS):
        expected = [sorted(i.name for i in select(folder, Shard(k, n))) for k in range(n)]
        for other in (shuffled, by_list, by_glob):
            assert [sorted(i.name for i in select(other, Shard(k, n))) for k in range(n)] == expected
        assert sorted(sum(expected, [])) == sorted(i.name for i in folder)  # a partition
    sizes = [len(select(folder, Shard(k, SHARDS))) for k in range(SHARDS)]
    assert min(sizes) > 0 and sum(sizes) == len(folder)
    # the hash is of the name only (not the process: Python's hash() is salted per process)
    code = "from rexnet_serving.runs.shards import shard_of; print(shard_of('s3://b/k/x.jpg', 16))"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
            for _ in range(2)}
    assert runs == {f"{shard_of('s3://b/k/x.jpg', 16)}\n"}


def test_shard_flags_and_the_indexed_job_environment() -> None:
    assert parse_shard("3/16") == Shard(3, 16) and str(Shard(3, 16)) == "3/16"
    for bad in ("16/16", "1", "a/b", "-1/4", "0/0"):
        with pytest.raises(UsageError, match="--shard"):
            parse_shard(bad)
    assert resolve_shard(None, None, {}) is None
    assert resolve_shard("1/2", None, {"JOB_COMPLETION_INDEX": "5"}) == Shard(1, 2)  # the flag wins
    assert resolve_shard(None, 8, {"JOB_COMPLETION_INDEX": "5"}) == Shard(5, 8)
    assert resolve_shard(None, None, {"JOB_COMPLETION_INDEX": "5", "REXNET_SHARD_COUNT": "8"}) == Shard(5, 8)
    with pytest.raises(UsageError, match="shard count"):
        resolve_shard(None, None, {"JOB_COMPLETION_INDEX": "5"})
    with pytest.raises(UsageError, match="index must be"):
        resolve_shard(None, 4, {"JOB_COMPLETION_INDEX": "5"})
    assert shard_output("s3://b/run/preds.jsonl", Shard(3, 16)) == "s3://b/run/preds-00003-of-00016.jsonl"
    assert shard_output("/r/preds.parquet", None) == "/r/preds.parquet"


def test_csv_path_with_a_newline_survives_a_torn_row(tmp_path: Path) -> None:
    """Issue 19 point 8: the path column on one physical line, reversibly, so resume matches it."""
    names = [tmp_path / "a\nb.jpg", tmp_path / '"quoted".jpg', tmp_path / "plain, comma.jpg"]
    out = tmp_path / "out.csv"
    ok = ImageResult(predictions=[Prediction(1, "one\ntwo", 0.5)])
    writer = ResultWriter(out, "csv")
    for name in names:
        writer.write(InputItem(name), ok)
    writer.close()
    assert out.read_text().count("\n") == 1 + len(names)  # header + one physical line per row
    with out.open("a") as f:
        f.write(str(tmp_path / "x.jpg") + ",tr")  # a torn last row, as a kill leaves
    again = ResultWriter(out, "csv")
    again.close()
    assert again.repaired and set(again.done) == {str(n) for n in names}
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [json.loads(r["path"]) if r["path"].startswith('"') else r["path"] for r in rows] == \
        [str(n) for n in names]


# ---------------------------------------------------------------------- local: four shards, a kill

def test_four_shards_one_killed_and_rerun_merge_exactly_once(scored_model_dir, dataset: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "results" / "preds.jsonl"
    common = [dataset, "-m", scored_model_dir, "-o", out, *FAST]
    victim = 2
    env = dict(os.environ, JOB_COMPLETION_INDEX=str(victim), REXNET_SHARD_COUNT=str(SHARDS))
    killed = predict(*common, "--batch-size", "1", "--commit-every", "0", env=env)  # the Job's way
    others = [predict(*common, "--shard", f"{i}/{SHARDS}", "--batch-size", "4")
              for i in range(SHARDS) if i != victim]
    target = Path(shard_output(str(out), Shard(victim, SHARDS)))
    before = kill_once_written(killed, lambda: target.read_text().count("\n") if target.exists() else 0)
    for proc in others:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode in (0, 1), err  # 1: the shard holding broken.png
        assert f"shard {proc.args[proc.args.index('--shard') + 1]}" in err
    expected = len(select(collect_inputs([dataset]), Shard(victim, SHARDS)))
    assert before < expected, "the shard finished before it could be killed"

    incomplete = merge(dataset, "-o", out)
    assert incomplete.returncode == 1 and "INCOMPLETE" in incomplete.stderr
    assert f"missing {expected - before}" in incomplete.stderr

    rerun = predict(*common, "--batch-size", "4", env=env)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode in (0, 1), err
    assert f"{expected - before} processed, {before} skipped" in err

    done = merge(dataset, "-o", out)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "results" / "preds-summary.json").read_text())
    names = {i.name for i in collect_inputs([dataset])}
    records = [json.loads(line) for i in range(SHARDS)
               for line in Path(shard_output(str(out), Shard(i, SHARDS))).read_text().splitlines()]
    assert sorted(r["path"] for r in records) == sorted(names)  # every image exactly once
    assert summary["complete"] and summary["inputs"] == summary["records"] == len(names)
    assert summary["errors"] == {"not_an_image": 1} and summary["ok"] == len(names) - 1
    assert summary["model"]["name"] == "ReXNet_1_0" and len(summary["model"]["manifest_sha256"]) == 64
    assert all(s["finished"] and s["images_per_second"] > 0 for s in summary["shards"])

    # records too many (a shard file edited, or two runs' files mixed) fail the merge: one twice in its
    # own shard's file, one in another shard's file
    first, second = (Path(shard_output(str(out), Shard(i, SHARDS))).read_text().splitlines()[0] for i in (0, 1))
    with open(shard_output(str(out), Shard(0, SHARDS)), "a") as f:
        f.write(first + "\n" + second + "\n")
    again = merge(dataset, "-o", out, "--summary", tmp_path / "s.json")
    assert again.returncode == 1
    bad = json.loads((tmp_path / "s.json").read_text())
    assert (bad["duplicates"], bad["misplaced"], bad["missing"], bad["complete"]) == (1, 1, 0, False)
    assert bad["examples"]["duplicates"] == [json.loads(first)["path"]]


# ------------------------------------------------------------------------------ S3 (moto server)

@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's standalone S3 server on a free loopback port; the AWS variables that point at it."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        import requests
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                requests.get(env["AWS_ENDPOINT_URL"], timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


@pytest.mark.server
def test_shards_on_s3_in_parquet_and_clear_store_errors(scored_model_dir, s3_server, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    import fsspec
    import pyarrow.parquet as pq
    fs = fsspec.filesystem("s3")
    fs.mkdir("rexnet-batch")
    local = write_images(tmp_path / "images", 24)
    for path in local:
        fs.put_file(str(path), f"rexnet-batch/images/{path.parent.name}/{path.name}")
    fs.invalidate_cache()
    source, out = "s3://rexnet-batch/images/", "s3://rexnet-batch/results/preds.parquet"
    env = dict(os.environ, REXNET_STAGING_DIR=str(tmp_path / "staging"))
    shard = ["-m", scored_model_dir, "-o", out, "--shard", "0/2", "--commit-every", "0", *FAST]
    # shard 0's pod is killed once its object holds a few records; its retry runs on another "node"
    # (an empty staging folder), so it resumes from what was committed to the store
    killed = predict(source, *shard, "--batch-size", "1", env=env)
    journal = "rexnet-batch/results/preds-00000-of-00002.parquet.journal.jsonl"

    def committed_records() -> int:
        fs.invalidate_cache()
        return fs.cat_file(journal).count(b"\n") if fs.exists(journal) else 0

    committed = kill_once_written(killed, committed_records, at_least=2)
    expected = len(select([InputItem(f"s3://rexnet-batch/images/{p.parent.name}/{p.name}") for p in local],
                          Shard(0, 2)))
    assert committed < expected, "the shard finished before it could be killed"
    elsewhere = dict(env, REXNET_STAGING_DIR=str(tmp_path / "staging-2"))
    resumed = predict(source, *shard, env=elsewhere)
    other = predict(source, "-m", scored_model_dir, "-o", out, "--shard", "1/2", "--commit-every", "0", *FAST,
                    env=env)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert f"{expected - committed} processed, {committed} skipped" in err
    _, err = other.communicate(timeout=300)
    assert other.returncode == 0, err
    assert not [p for p in (tmp_path / "staging-2").rglob("*") if p.is_file()]  # committed, then removed

    done = merge(source, "-o", out, env=env)
    assert done.returncode == 0, done.stderr
    fs.invalidate_cache()
    summary = json.loads(fs.cat_file("rexnet-batch/results/preds-summary.json"))
    names = sorted(f"s3://rexnet-batch/images/{p.parent.name}/{p.name}" for p in local)
    assert summary["complete"] and summary["inputs"] == summary["records"] == len(names)
    assert summary["shard_count"] == 2 and summary["errors"] == {}
    paths = []
    for i in range(2):
        with fs.open(f"rexnet-batch/results/preds-0000{i}-of-00002.parquet", "rb") as f:
            table = pq.read_table(f)
        assert table.schema.names == ["path", "label", "ok", "class_ids", "labels", "scores", "error_code",
                                      "error_message", "model_name", "model_version", "manifest_sha256"]
        rows = table.to_pylist()
        assert all(r["ok"] and len(r["class_ids"]) == 5 and r["model_name"] == "ReXNet_1_0"
                   and r["manifest_sha256"] == summary["model"]["manifest_sha256"] for r in rows)
        paths += [r["path"] for r in rows]
    assert sorted(paths) == names

    # a bucket that does not exist, and no credentials: one clear line, exit 2, before any image
    missing = predict("s3://no-such-bucket/images/", "-m", scored_model_dir, "-o", out, *FAST, env=env)
    _, err = missing.communicate(timeout=120)
    assert missing.returncode == 2 and "no such bucket" in err and "Traceback" not in err, err
    bare = {k: v for k, v in env.items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
    bare.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"))
    nocreds = predict(source, "-m", scored_model_dir, "-o", out, *FAST, env=bare)
    _, err = nocreds.communicate(timeout=120)
    assert nocreds.returncode == 2 and "credentials" in err and "Traceback" not in err, err
    closed = dict(env, AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_MAX_ATTEMPTS="1")
    unreachable = predict(source, "-m", scored_model_dir, "-o", out, *FAST, env=closed)
    _, err = unreachable.communicate(timeout=120)
    assert unreachable.returncode == 2 and "unreachable" in err and "Traceback" not in err, err

    # a list file on the store (relative lines, any order, PaddleClas labels) names the same objects
    lines = [f"../images/{p.parent.name}/{p.name} {i % 3}" for i, p in enumerate(reversed(local))]
    fs.pipe_file("rexnet-batch/lists/val.txt", ("\n".join(lines) + "\n").encode())
    listed = collect_inputs(["s3://rexnet-batch/lists/val.txt"])
    assert sorted(i.name for i in listed) == names and {i.label for i in listed} == {"0", "1", "2"}
    for k in range(2):
        assert {i.name for i in select(listed, Shard(k, 2))} == \
            {i.name for i in select(collect_inputs([source]), Shard(k, 2))}


@pytest.mark.server
def test_a_failed_commit_warns_then_exits_3(s3_server, tmp_path: Path, capsys,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The store going away mid-run: a checkpoint warns and goes on, the final commit is an error with
    its own exit code (retried by the Job, unlike exit 2)."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("REXNET_STAGING_DIR", str(tmp_path / "staging"))
    import fsspec
    from rexnet_serving.runs.cli import run_and_report
    from rexnet_serving.runs.run import open_run
    from rexnet_serving.runs.summary import EXIT_COMMIT, CommitError
    fs = fsspec.filesystem("s3")
    fs.mkdir("vanishing")
    write_images(tmp_path / "images", 4)
    ok = ImageResult(predictions=[Prediction(1, "one", 0.9)])
    run = open_run([tmp_path / "images"], "s3://vanishing/out.jsonl", "jsonl", commit_seconds=0)
    run.write(run.todo[0], ok)
    run.checkpoint()
    fs.invalidate_cache()
    assert fs.cat_file("vanishing/out.jsonl").count(b"\n") == 1
    fs.rm("vanishing", recursive=True)  # the objects, then the bucket
    run.write(run.todo[1], ok)
    run.checkpoint()
    assert "warning: commit to s3://vanishing/out.jsonl failed" in capsys.readouterr().err
    with pytest.raises(CommitError, match="a rerun resumes from the last commit"):
        run.close(interrupted=False)

    def work():
        raise CommitError("s3://vanishing/out.jsonl: the results could not be committed")
    assert run_and_report("rexnet-predict", work) == EXIT_COMMIT == 3


@pytest.mark.server
def test_object_reads_are_retried_then_recorded_unreadable(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Transient read failures (injected in front of the real S3 filesystem) are retried with backoff;
    a read that keeps failing becomes that image's ``unreadable`` record; a missing object is not retried."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    from rexnet_serving.imageio import DecodeLimits
    from rexnet_serving.predict_cli import UNREADABLE, read_and_decode
    from rexnet_serving.runs import storage
    data = encode(photo("flower", (40, 30)), "png")
    real, _ = storage.filesystem("s3://flaky/a.png")
    real.mkdir("flaky")
    real.pipe_file("flaky/a.png", data)
    calls: List[str] = []

    class Flaky:
        def __init__(self, failures: int) -> None:
            self.failures = failures

        def cat_file(self, path: str) -> bytes:
            calls.append(path)
            if len(calls) <= self.failures:
                raise ConnectionResetError("connection reset by peer")
            return real.cat_file(path)

    monkeypatch.setattr(storage, "filesystem", lambda url: (Flaky(2), url[len("s3://"):]))
    assert storage.read_bytes("s3://flaky/a.png", backoff=0.01) == data and len(calls) == 3
    calls.clear()
    monkeypatch.setattr(storage, "filesystem", lambda url: (Flaky(99), url[len("s3://"):]))
    with pytest.raises(OSError, match="after 3 attempts"):
        storage.read_bytes("s3://flaky/a.png", backoff=0.01)
    calls.clear()
    monkeypatch.setattr(storage.time, "sleep", lambda seconds: None)
    result = read_and_decode(InputItem("s3://flaky/a.png"), DecodeLimits())
    assert result.error_code == UNREADABLE and "connection reset" in result.error_message and len(calls) == 3
    calls.clear()
    monkeypatch.setattr(storage, "filesystem", lambda url: (real, url[len("s3://"):]))
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("s3://flaky/missing.png")


def test_local_parquet_resumes_from_its_journal_and_refuses_another_model(tmp_path: Path) -> None:
    import pyarrow.parquet as pq
    from rexnet_serving.runs.run import open_run
    paths = write_images(tmp_path / "images", 5)
    model = {"name": "ReXNet_1_0", "version": "1", "manifest_sha256": "a" * 64}
    out = tmp_path / "out" / "preds.parquet"
    run = open_run([tmp_path / "images"], out, "parquet", model=model)
    for item in run.todo[:3]:
        run.write(item, ImageResult(predictions=[Prediction(2, "two", 0.75), Prediction(1, "one", 0.25)]))
    run.close(interrupted=True)  # stopped early: the Parquet file holds what was done
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 3 and rows[0]["class_ids"] == [2, 1] and rows[0]["scores"] == [0.75, 0.25]
    assert rows[0]["manifest_sha256"] == "a" * 64 and rows[0]["error_code"] is None
    assert not json.loads(Path(str(out) + ".run.json").read_text())["finished"]

    with pytest.raises(UsageError, match="written by another model"):
        open_run([tmp_path / "images"], out, "parquet", model=dict(model, manifest_sha256="b" * 64))
    run = open_run([tmp_path / "images"], out, "parquet", model=model)
    assert run.summary.skipped == 3 and len(run.todo) == 2
    for item in run.todo:
        run.write(item, ImageResult.failure("truncated", "cut short"))
    run.close(interrupted=False)
    rows = pq.read_table(out).to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in paths)
    assert [r["error_code"] for r in rows].count("truncated") == 2
    assert json.loads(Path(str(out) + ".run.json").read_text())["finished"]


def test_parquet_and_shards_need_an_output_file(tmp_path: Path, capsys) -> None:
    from rexnet_serving.predict_cli import main
    write_images(tmp_path / "images", 1)
    for flags, message in ((["--format", "parquet"], "--format parquet needs -o"),
                           (["--shard", "0/2"], "a shard needs -o")):
        assert main([str(tmp_path / "images"), "-m", str(tmp_path / "no-model"), *flags]) == 2
        assert message in capsys.readouterr().err
