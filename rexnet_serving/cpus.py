"""The CPUs this process may really use, and the thread counts the service derives from them.

``os.cpu_count()`` is the host's count: a pod limited to 2 CPUs on a 64-core node would start 64-way
thread pools and spend its quota being throttled. What bounds a process is the smaller of

* its affinity mask (``os.sched_getaffinity``: ``taskset``, cpusets, Kubernetes' static CPU manager), and
* its cgroup CPU quota: cgroup v2 ``cpu.max`` ("max 100000" or "<quota> <period>"), cgroup v1
  ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: none), read at the process's own cgroup (from
  /proc/self/cgroup) and at every ancestor, since a parent's limit binds its children too
  (https://docs.kernel.org/admin-guide/cgroup-v2.html#cpu-interface-files).

A fractional quota is rounded down (at least 1), as Go's automaxprocs does: one busy thread more than
the quota lets the cgroup use its whole period early and then stalls every thread of it until the next.
Hand-written rather than a library: psutil has no cgroup quota, and the few lines below are all there
is to it. The roots are parameters so the tests can point them at a fake file tree.

Sizing (``size_service``), for an inference service whose images are decoded and preprocessed by
``prepare`` threads (OpenCV, about one core each under load) and run by an inference runtime's thread
pool (OpenVINO streams x threads, or Paddle Inference clones x threads): the math threads are kept at or
below the cores left after the prepare workers. Oversubscribing a multi-thread stream costs more than a
share of the cores: a runtime's parallel loop ends at a barrier, so a math thread the kernel preempts
for a decode or a front-door thread stalls its whole stream while the others spin-wait.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

PathLike = Union[str, Path]
AFFINITY, CGROUP, HOST = "affinity", "cgroup quota", "host"
MAX_THREADS_PER_STREAM = 6  # past this one small-image forward pass gains little per extra thread (measure)


@dataclass(frozen=True)
class CpuBudget:
    """``count`` whole CPUs the process may use, ``source`` what bounds it (affinity, cgroup quota, host)."""

    count: int
    source: str
    quota: Optional[float] = None  # the cgroup quota in CPUs (fractional), when there is one

    def __str__(self) -> str:
        return f"cpus {self.count} ({self.source})"


def _cgroup_paths(proc_self: Path) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """The process's cgroup v2 path (None when not listed) and its v1 (controllers, path) entries."""
    try:
        lines = (proc_self / "cgroup").read_text().splitlines()
    except OSError:
        return None, []
    v2, v1 = None, []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        else:
            v1.append((parts[1], parts[2]))
    return v2, v1


def _up(root: Path, path: str) -> Iterator[Path]:
    """``root/path`` and every ancestor directory up to ``root`` itself. In a container without its own
    cgroup namespace the host's path is listed but only the container's cgroup is mounted at ``root``:
    the missing levels are skipped and ``root`` is read."""
    parts = [p for p in path.strip("/").split("/") if p and p not in (".", "..")]
    for depth in range(len(parts), -1, -1):
        yield root.joinpath(*parts[:depth])


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_quota(root: Path, path: str) -> Optional[float]:
    quotas = []
    for directory in _up(root, path):
        text = _read(directory / "cpu.max")
        if text is None:
            continue
        fields = text.split()
        if len(fields) == 2 and fields[0] != "max" and fields[0].isdigit() and fields[1].isdigit() \
                and int(fields[1]) > 0:
            quotas.append(int(fields[0]) / int(fields[1]))
    return min(quotas) if quotas else None


def _v1_quota(root: Path, entries: List[Tuple[str, str]]) -> Optional[float]:
    quotas = []
    for controllers, path in entries:
        names = controllers.split(",")
        if "cpu" not in names:
            continue
        for mount in dict.fromkeys((root / controllers, root / "cpu,cpuacct", root / "cpu")):
            for directory in _up(mount, path):
                quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
                if quota is None or period is None:
                    continue
                try:
                    q, p = int(quota), int(period)
                except ValueError:
                    continue
                if q > 0 and p > 0:
                    quotas.append(q / p)
    return min(quotas) if quotas else None


def cgroup_quota(proc_self: PathLike = "/proc/self", cgroup_root: PathLike = "/sys/fs/cgroup") -> Optional[float]:
    """The tightest CPU quota (in CPUs, fractional) on the process's cgroup and its ancestors, v2 or v1;
    None when there is none (or no cgroup file system)."""
    v2, v1 = _cgroup_paths(Path(proc_self))
    quotas = [q for q in (_v2_quota(Path(cgroup_root), v2) if v2 is not None else None,
                          _v1_quota(Path(cgroup_root), v1)) if q is not None]
    return min(quotas) if quotas else None


def available_cpus(proc_self: PathLike = "/proc/self", cgroup_root: PathLike = "/sys/fs/cgroup",
                   affinity: Optional[int] = None, host: Optional[int] = None) -> CpuBudget:
    """The CPUs this process may use: the smaller of its affinity mask and its cgroup quota (rounded down,
    at least 1), else the host's count. ``affinity`` / ``host`` stand in for the real ones in tests."""
    host = host if host is not None else (os.cpu_count() or 1)
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else host
    quota = cgroup_quota(proc_self, cgroup_root)
    best = CpuBudget(host, HOST, quota)
    if affinity < best.count:
        best = CpuBudget(affinity, AFFINITY, quota)
    if quota is not None and max(1, math.floor(quota)) < best.count:
        best = CpuBudget(max(1, math.floor(quota)), CGROUP, quota)
    return best


@dataclass(frozen=True)
class Sizing:
    """The service's thread counts and where they came from (``derived``: the settings set from ``cpus``)."""

    cpus: CpuBudget
    prepare_workers: int   # op.prepare.concurrency
    infer_streams: int     # op.infer.concurrency: infer threads, each with its predictor (OpenVINO: streams)
    infer_threads: int     # op.infer.local_service_conf.thread_num: math threads per stream / predictor
    derived: Tuple[str, ...] = field(default=())
    lone_image_threads: int = 0  # OpenVINO: a lone one-image pass on this many threads (0: on its stream)

    def describe(self) -> str:
        """For the ready line: ``cpus 2 (host): prepare 1, infer 2 x 1 thread, a lone image 2 threads
        (derived)``."""
        how = "derived" if len(self.derived) == 3 else "from the config" if not self.derived else \
            f"derived: {', '.join(self.derived)}"
        lone = f", a lone image {self.lone_image_threads} threads" if self.lone_image_threads else ""
        return (f"{self.cpus}: prepare {self.prepare_workers}, infer {self.infer_streams} x "
                f"{self.infer_threads} thread{'s' if self.infer_threads > 1 else ''}{lone} ({how})")


def lone_image_threads(streams: int, threads: int) -> int:
    """The threads a one-image forward pass gets when no other pass is running (rexnet_serving.runtimes.
    openvino's lone-image model), or 0 when its own stream already has as many as help one image.

    One-thread streams give the most throughput on few cores (size_service), but a request that arrives
    alone would then run on one thread while the others idle: on 2 CPUs its p50 went from 15.6 to 22.3 ms
    (README, Performance). All the streams' threads, at most MAX_THREADS_PER_STREAM, run it instead (a
    lone pass of several images is split across the streams instead).
    """
    lone = min(streams * threads, MAX_THREADS_PER_STREAM)
    return lone if streams > 1 and lone > threads else 0


def size_service(cpus: CpuBudget, local_cpu_inference: bool, prepare: Optional[int] = None,
                 streams: Optional[int] = None, threads: Optional[int] = None, lone_image: bool = False) -> Sizing:
    """Thread counts for ``cpus``; an explicit (not None) setting wins over the derived one. ``lone_image``:
    the runtime runs a lone image on a model of its own (OpenVINO; see lone_image_threads).

    Inference on the CPU. The README's profile of one image (2 cores, ReXNet_1_0, OpenVINO): about 11 ms
    of CPU in inference, 2.3 in decode + preprocessing, 1 in the front door: prepare is about a quarter
    of the work. So a quarter of the cores (at least one thread) prepare, the other cores run the model,
    in streams of at most MAX_THREADS_PER_STREAM threads. With fewer than 4 CPUs the prepare thread has
    no core of its own: it and the front doors preempt the math threads, so those run as one-thread
    streams (each infer thread its own batch), where a preempted thread delays only its own batch
    instead of stalling a multi-thread stream at its barriers. 2 CPUs: prepare 1, infer 2 x 1;
    4: 1, 1 x 3; 8: 2, 1 x 6; 16: 4, 2 x 6.

    Inference elsewhere (GPU, a bRPC backend): one core for the front doors, the others (up to 8)
    decode; one infer thread with one math thread feeds the device.
    """
    n = cpus.count
    if local_cpu_inference:
        want_prepare = max(1, n // 4)
        math_cores = max(1, n - n // 4)
        if math_cores + want_prepare > n:  # no core left for prepare: one-thread streams
            want_streams = math_cores
        else:
            want_streams = math.ceil(math_cores / MAX_THREADS_PER_STREAM)
        want_threads = max(1, math_cores // (streams if streams is not None else want_streams))
    else:
        want_prepare, want_streams, want_threads = max(1, min(n - 1, 8)), 1, 1
    chosen = {"op.prepare.concurrency": (prepare, want_prepare), "op.infer.concurrency": (streams, want_streams),
              "op.infer.local_service_conf.thread_num": (threads, want_threads)}
    derived = tuple(key for key, (given, _) in chosen.items() if given is None)
    values = [given if given is not None else wanted for given, wanted in chosen.values()]
    lone = lone_image_threads(values[1], values[2]) if lone_image and local_cpu_inference else 0
    return Sizing(cpus, values[0], values[1], values[2], derived, lone)


def main() -> int:
    """``python -m rexnet_serving.cpus``: what this process may use and what the service would derive."""
    cpus = available_cpus()
    sizing = size_service(cpus, local_cpu_inference=True, lone_image=True)  # the CPU's default, OpenVINO
    print(sizing.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
