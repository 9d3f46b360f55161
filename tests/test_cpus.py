"""The CPUs the process may use (affinity mask, cgroup v2 / v1 quota, host) and the service's sizing from
them: fake cgroup file trees, a real narrowed affinity mask, and the config keys that stay explicit."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rexnet_pipelines.config import CONFIG_DIR, ConfigError, load_config
from rexnet_serving.cpus import (AFFINITY, CGROUP, HOST, CpuBudget, available_cpus, cgroup_quota,
                                 lone_image_threads, size_service)


def tree(root: Path, files: dict) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def fake(tmp_path: Path, cgroup: str, files: dict):
    proc = tree(tmp_path / "proc", {"cgroup": cgroup})
    return proc, tree(tmp_path / "sys", files)


def test_cgroup_v2_quota_at_the_process_path(tmp_path):
    proc, root = fake(tmp_path, "0::/kubepods/pod1/c1\n", {"kubepods/pod1/c1/cpu.max": "250000 100000\n",
                                                           "kubepods/pod1/cpu.max": "max 100000\n"})
    assert cgroup_quota(proc, root) == 2.5
    budget = available_cpus(proc, root, affinity=16, host=64)
    assert (budget.count, budget.source, str(budget)) == (2, CGROUP, "cpus 2 (cgroup quota)")  # rounded down


def test_a_parents_quota_binds_its_children(tmp_path):
    proc, root = fake(tmp_path, "0::/slice/job\n", {"slice/job/cpu.max": "max 100000\n",
                                                    "slice/cpu.max": "300000 100000\n"})
    assert available_cpus(proc, root, affinity=8, host=8) == CpuBudget(3, CGROUP, 3.0)


def test_a_container_sees_its_own_cgroup_at_the_root(tmp_path):
    # no cgroup namespace: the host's path is listed, only the container's cgroup is mounted
    proc, root = fake(tmp_path, "0::/kubepods/burstable/pod9/abc\n", {"cpu.max": "400000 100000\n"})
    assert available_cpus(proc, root, affinity=32, host=32).count == 4


def test_cgroup_v1_quota(tmp_path):
    proc, root = fake(tmp_path, "12:memory:/docker/x\n4:cpu,cpuacct:/docker/x\n1:name=systemd:/docker/x\n",
                      {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "150000\n",
                       "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n"})
    assert cgroup_quota(proc, root) == 1.5
    assert available_cpus(proc, root, affinity=4, host=4) == CpuBudget(1, CGROUP, 1.5)


def test_no_quota_leaves_affinity_or_host(tmp_path):
    proc, root = fake(tmp_path, "4:cpu,cpuacct:/\n0::/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                                                             "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
                                                             "cpu.max": "max 100000\n"})
    assert available_cpus(proc, root, affinity=4, host=4) == CpuBudget(4, HOST)
    assert available_cpus(proc, root, affinity=3, host=4) == CpuBudget(3, AFFINITY)
    assert available_cpus(tmp_path / "none", tmp_path / "none", affinity=2, host=2) == CpuBudget(2, HOST)


def test_smaller_of_affinity_and_quota_wins(tmp_path):
    proc, root = fake(tmp_path, "0::/\n", {"cpu.max": "600000 100000\n"})
    assert available_cpus(proc, root, affinity=2, host=8).source == AFFINITY
    assert available_cpus(proc, root, affinity=8, host=8) == CpuBudget(6, CGROUP, 6.0)
    proc, root = fake(tmp_path / "small", "0::/\n", {"cpu.max": "50000 100000\n"})  # half a CPU
    assert available_cpus(proc, root, affinity=8, host=8).count == 1


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs at least 2 CPUs in this process's affinity mask")
def test_a_narrowed_affinity_mask_is_what_the_process_gets():
    cpu = min(os.sched_getaffinity(0))
    code = (f"import os; os.sched_setaffinity(0, {{{cpu}}}); "
            "from rexnet_serving.cpus import main; main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.startswith("cpus 1 (affinity): prepare 1, infer 1 x 1 thread"), out.stdout


@pytest.mark.server
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs at least 2 CPUs in this process's affinity mask")
def test_rexnet_serve_on_one_cpu_of_its_affinity_mask_sizes_for_one(scored_model_dir, tmp_path):
    """A real rexnet-serve started with its affinity narrowed to one CPU (as taskset -c 0 does) says so on
    its ready line and on /metrics, and runs one prepare thread and one math thread."""
    import signal
    import time

    import requests

    from conftest import free_port
    from servers import BIN
    cpu = min(os.sched_getaffinity(0))
    metrics_port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "rexnet-serve"), "--model-dir", str(scored_model_dir), "--host", "127.0.0.1", "--http-port",
             str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(metrics_port),
             "--oip-http-port", "0", "--oip-grpc-port", "0", "--workdir", str(tmp_path / "wd")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    try:
        deadline = time.monotonic() + 240
        while "ready:" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        text = log.read_text()
        assert "with cpus 1 (affinity): prepare 1, infer 1 x 1 thread (derived); from " in text, text[-3000:]
        metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert 'rexnet_cpus{source="affinity"} 1.0' in metrics
        assert 'rexnet_sizing{origin="derived",setting="op.infer.local_service_conf.thread_num"} 1.0' in metrics
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


@pytest.mark.parametrize("cpus, prepare, streams, threads", [
    (1, 1, 1, 1), (2, 1, 2, 1), (4, 1, 1, 3), (8, 2, 1, 6), (16, 4, 2, 6), (64, 16, 8, 6)])
def test_cpu_inference_keeps_math_threads_within_the_cores_left(cpus, prepare, streams, threads):
    sizing = size_service(CpuBudget(cpus, HOST), local_cpu_inference=True)
    assert (sizing.prepare_workers, sizing.infer_streams, sizing.infer_threads) == (prepare, streams, threads)
    assert streams * threads <= max(1, cpus - cpus // 4)
    assert len(sizing.derived) == 3 and sizing.describe().endswith("(derived)")


@pytest.mark.parametrize("streams, threads, lone", [(1, 2, 0), (2, 1, 2), (3, 1, 3), (4, 2, 6), (2, 6, 0), (8, 1, 6)])
def test_a_lone_image_gets_the_streams_threads_up_to_the_cap(streams, threads, lone):
    assert lone_image_threads(streams, threads) == lone


def test_explicit_settings_win_and_the_rest_fits_around_them():
    sizing = size_service(CpuBudget(8, CGROUP), True, streams=3)
    assert (sizing.prepare_workers, sizing.infer_streams, sizing.infer_threads) == (2, 3, 2)
    assert sizing.derived == ("op.prepare.concurrency", "op.infer.local_service_conf.thread_num")
    gpu = size_service(CpuBudget(6, CGROUP), False)
    assert (gpu.prepare_workers, gpu.infer_streams, gpu.infer_threads) == (5, 1, 1)


def test_config_auto_keys_are_derived_and_numbers_kept(tmp_path):
    cpu = load_config(CONFIG_DIR / "cpu.yml", cpus=CpuBudget(4, CGROUP, 4.0))
    assert cpu.data["op"]["prepare"]["concurrency"] == 1 and cpu.infer["concurrency"] == 1
    assert cpu.infer_service["thread_num"] == 3
    assert cpu.sizing.describe() == "cpus 4 (cgroup quota): prepare 1, infer 1 x 3 threads (derived)"
    paddle = cpu.paddle()  # what Paddle Serving gets: numbers only
    assert paddle["op"]["prepare"]["concurrency"] == 1 and paddle["op"]["infer"]["local_service_conf"]["thread_num"] == 3
    explicit = tmp_path / "explicit.yml"
    explicit.write_text(f"extends: {CONFIG_DIR / 'cpu.yml'}\nop:\n  prepare:\n    concurrency: 2\n  infer:\n"
                        "    local_service_conf:\n      thread_num: auto\n")
    config = load_config(explicit, cpus=CpuBudget(2, HOST))
    assert (config.sizing.prepare_workers, config.sizing.infer_streams, config.sizing.infer_threads) == (2, 2, 1)
    assert "op.prepare.concurrency" not in config.sizing.derived
    # OpenVINO's one-image model gets the two streams' threads; the ready line says so.
    assert config.sizing.lone_image_threads == 2
    assert config.sizing.describe() == ("cpus 2 (host): prepare 2, infer 2 x 1 thread, a lone image 2 threads "
                                        "(derived: op.infer.concurrency, op.infer.local_service_conf.thread_num)")
    gpu = load_config(CONFIG_DIR / "gpu.yml", cpus=CpuBudget(6, CGROUP))
    assert (gpu.data["op"]["prepare"]["concurrency"], gpu.infer["concurrency"], gpu.infer_service["thread_num"]) \
        == (5, 1, 1)  # gpu.yml sets infer's two; prepare is derived


def test_a_bad_sizing_value_names_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(f"extends: {CONFIG_DIR / 'cpu.yml'}\nop:\n  infer:\n    concurrency: many\n")
    with pytest.raises(ConfigError, match=f"{bad}: op.infer.concurrency must be 1..64 threads, or auto, got 'many'"):
        load_config(bad)


def test_metrics_export_the_sizing_and_the_lone_image_threads():
    from prometheus_client import generate_latest
    from rexnet_pipelines import metrics
    metrics.set_sizing(size_service(CpuBudget(2, CGROUP, 2.0), True, prepare=1, lone_image=True))
    text = generate_latest().decode()
    assert 'rexnet_cpus{source="cgroup quota"} 2.0' in text
    assert 'rexnet_sizing{origin="config",setting="op.prepare.concurrency"} 1.0' in text
    assert 'rexnet_sizing{origin="derived",setting="op.infer.concurrency"} 2.0' in text
    assert 'rexnet_sizing{origin="derived",setting="lone_image_threads"} 2.0' in text
