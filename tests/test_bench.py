"""rexnet-bench end to end, briefly: a real rexnet-serve on free ports (its config's OpenVINO, then once
more on Paddle Inference), one protocol, one closed-loop and one open-loop point, the in-process baseline
and the runtime comparison; checks the JSON, Markdown and PNG it writes. Speed is reported by the tool,
never asserted here."""
from __future__ import annotations

import json
import os

import pytest

import digits_runs


@pytest.mark.server
@pytest.mark.slow
def test_bench_runs_end_to_end_and_writes_its_reports(random_model_dir, tmp_path):
    from rexnet_serving.bench.cli import main
    from rexnet_serving.bench.monitor import process_tree

    out = tmp_path / "out"
    code = main(["--model-dir", str(random_model_dir), "--protocols", "http", "--concurrency", "1", "--rate", "4",
                 "--duration", "1.5", "--warmup", "0.5", "--baselines", "inprocess,floor", "--batches", "1",
                 "--runtime-batches", "1", "--compare-serve-runtime", "paddle",
                 "--no-calibration", "--quick", "--out", str(out)])
    assert code == 0, (out / "bench.md").read_text()

    result = json.loads((out / "bench.json").read_text())
    assert result["failures"] == []
    points = {(p["target"], p["mode"], p["level"]): p for p in result["points"]}
    assert set(points) == {(t, m, level) for t in ("http", "http-x8", "floor-http", "http@paddle")
                           for m, level in (("closed", 1), ("open", 4.0))}
    assert points[("http-x8", "closed", 1)]["images_per_request"] == 8
    for point in points.values():
        assert point["errors"] == 0 and point["requests"] > 0
        assert point["images_per_s"] > 0
        assert 0 < point["p50_ms"] <= point["p90_ms"] <= point["p99_ms"] <= point["max_ms"]
        assert point["server_rss_peak_mb"] > 50
        assert point["stages"]["infer_ms"] >= 0  # scraped from the service's /metrics (the floor infers nothing)
    server = result["servers"]["pipeline"]
    assert 0 < server["rss_idle_mb"] <= server["rss_peak_mb"]
    assert server["runtime"] == {"runtime": "openvino", "precision": "fp32", "device": "cpu"}
    assert result["servers"]["pipeline@paddle"]["runtime"]["runtime"] == "paddle"
    inproc = result["inprocess"]
    assert (inproc["runtime"], inproc["precision"]) == ("openvino", "fp32")
    rows = {row["name"]: row for row in result["runtimes"]["rows"]}
    assert set(rows) == {"Paddle Inference + oneDNN", "OpenVINO FP32", "OpenVINO BF16"}
    for row in rows.values():
        if "skipped" in row:  # BF16 on a CPU without it
            assert "BF16" in row["skipped"]
            continue
        assert [r["batch"] for r in row["infer"]] == [1] == [r["batch"] for r in row["pipeline"]]
        assert row["infer"][0]["images_per_s"] > 0 and row["agreement"]["images"] == 14
    assert rows["Paddle Inference + oneDNN"]["agreement"]["max_abs_output_diff"] == 0.0
    assert rows["OpenVINO FP32"]["agreement"]["max_abs_output_diff"] <= 1e-5
    assert any(t["target"].startswith("in-process OpenVINO FP32 / Paddle") for t in result["targets"])
    assert any(t["target"].startswith("HTTP service best img/s on OpenVINO FP32 / on paddle")
               for t in result["targets"])
    assert [row["batch"] for row in inproc["project"]] == [1] == [row["batch"] for row in inproc["paddle_ops"]]
    assert inproc["project_single_p50_ms"] > 0 and inproc["stages_batch1"]["infer_ms"] > 0
    assert any(t["target"].startswith("pipeline service RSS") for t in result["targets"])

    markdown = (out / "bench.md").read_text()
    assert "| HTTP (rexnet-serve) | 1 |" in markdown and "## In-process limit" in markdown
    assert "| HTTP (rexnet-serve) on paddle | 1 |" in markdown and "## CPU runtimes side by side" in markdown
    assert "## Where a lone request's time goes" in markdown and "| http |" in markdown
    assert result["servers"]["floor"]["rss_idle_mb"] < server["rss_idle_mb"]  # no model loaded
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "images").glob("*.jpg"))) == 14
    # Every server the tool started is gone (the training runs conftest started are not the tool's).
    background = digits_runs.pids()
    assert not [p for p in process_tree(os.getpid())[1:] if p.pid not in background and "rexnet" in _cmdline(p)]


def _cmdline(process) -> str:
    """The command line, or "" for a process that ended (or is a zombie) since it was listed."""
    import psutil
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""
