"""What a load point costs: CPU of the service, of the load generator and of everything else on the box,
the service's memory (RSS summed over its process tree: the Pipeline server, its op processes and the
HTTP gateway), and the service's own per-stage timings (Prometheus /metrics deltas).

Measured between ``begin()`` and ``end()`` (the loadgen's measured window). RSS is sampled every
``interval`` seconds from load start to end, so the peak includes warm-up allocations. Summing RSS over
processes counts shared pages (the Paddle library mapped in two processes) twice: an upper bound, the
number a container memory limit must accommodate at worst.
"""
from __future__ import annotations

import os
import resource
import threading
import time
from typing import Any, Dict, List, Optional

import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families


def process_tree(pid: int) -> List[psutil.Process]:
    """The process and all its descendants that still exist."""
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def tree_rss_bytes(pid: int) -> int:
    total = 0
    for proc in process_tree(pid):
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for proc in process_tree(pid):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this (load generator) process
    return usage.ru_utime + usage.ru_stime


def machine_busy_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def scrape_stages(metrics_url: str) -> Optional[Dict[str, float]]:
    """Sums and counts of the service's stage/batch histograms, or None without a /metrics endpoint."""
    try:
        text = requests.get(metrics_url, timeout=5).text
    except requests.RequestException:
        return None
    values: Dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.endswith(("_sum", "_count")):
                continue
            if sample.name.startswith("rexnet_stage_seconds"):
                values[f"{sample.labels.get('stage')}{sample.name[len('rexnet_stage_seconds'):]}"] = sample.value
            elif sample.name.startswith(("rexnet_batch_images", "rexnet_batch_requests",
                                         "rexnet_request_seconds")):
                values[sample.name[len("rexnet_"):]] = sample.value
    return values


def scrape_runtime(metrics_url: str) -> Optional[Dict[str, str]]:
    """The service's ``rexnet_runtime_info`` labels (runtime, precision, device), or None without them."""
    try:
        text = requests.get(metrics_url, timeout=5).text
    except requests.RequestException:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "rexnet_runtime_info":
                return dict(sample.labels)
    return None


def stage_deltas(before: Dict[str, float], after: Dict[str, float]) -> Dict[str, float]:
    """Mean ms per stage call and mean batch sizes between two scrapes."""
    out: Dict[str, float] = {}
    for key in after:
        if not key.endswith("_count"):
            continue
        base = key[:-len("_count")]
        count = after[key] - before.get(key, 0.0)
        if count <= 0 or f"{base}_sum" not in after:
            continue
        mean = (after[f"{base}_sum"] - before.get(f"{base}_sum", 0.0)) / count
        if base in ("batch_images", "batch_requests"):
            out[f"mean_{base}"] = round(mean, 2)
        elif base == "request_seconds":
            out["server_request_ms"] = round(mean * 1000, 2)
        else:
            out[f"{base}_ms"] = round(mean * 1000, 2)
    return out


class Monitor:
    """A Window for loadgen: CPU split, RSS peak and service stage timings of one load point."""

    def __init__(self, server_pid: Optional[int], metrics_url: Optional[str] = None,
                 interval: float = 0.5) -> None:
        self.server_pid = server_pid
        self.metrics_url = metrics_url
        self.interval = interval
        self._stop = threading.Event()
        self._peak_rss = 0
        self._start: Dict[str, Any] = {}
        self.result: Dict[str, Any] = {}
        self._sampler = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def __enter__(self) -> "Monitor":
        self._sampler.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._sampler.join()
        if self.server_pid is not None:
            self.result["server_rss_peak_mb"] = round(self._peak_rss / 2**20, 1)

    def _sample(self) -> None:
        while self.server_pid is not None and not self._stop.is_set():
            self._peak_rss = max(self._peak_rss, tree_rss_bytes(self.server_pid))
            self._stop.wait(self.interval)

    def _snapshot(self) -> Dict[str, Any]:
        return {"t": time.perf_counter(), "own": own_cpu_seconds(), "machine": machine_busy_seconds(),
                "server": tree_cpu_seconds(self.server_pid) if self.server_pid is not None else 0.0,
                "stages": scrape_stages(self.metrics_url) if self.metrics_url else None}

    def begin(self) -> None:
        self._start = self._snapshot()

    def end(self) -> None:
        end = self._snapshot()
        seconds = end["t"] - self._start["t"]
        own = end["own"] - self._start["own"]
        server = end["server"] - self._start["server"]
        machine = end["machine"] - self._start["machine"]
        # In cores: 1.0 = one core busy for the whole window.
        self.result.update({"loadgen_cores": round(own / seconds, 3),
                            "server_cores": round(server / seconds, 3) if self.server_pid else None,
                            "other_cores": round(max(0.0, machine - own - server) / seconds, 3),
                            "loadgen_cpu_s": own})
        if self.server_pid is not None:
            self.result["server_rss_mb"] = round(tree_rss_bytes(self.server_pid) / 2**20, 1)
        if self._start.get("stages") is not None and end["stages"] is not None:
            self.result["stages"] = stage_deltas(self._start["stages"], end["stages"])


def machine_description() -> Dict[str, Any]:
    """CPU model, cores, memory and load, for the report."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "logical_cpus": psutil.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "load_average": [round(x, 2) for x in os.getloadavg()]}
