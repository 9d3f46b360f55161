"""The servers a benchmark starts, each as its own process group on free 127.0.0.1 ports, and the
senders (one client per load thread) that talk to them.

* ``pipeline``: ``rexnet-serve`` (HTTP + gRPC + /metrics), ready when /readyz says so and a request answers;
* ``brpc``: ``rexnet-brpc native``;
* ``documented``: rexnet_serving.bench.documented_way (PaddleClas's example service);
* ``fake-<protocol>``: rexnet_serving.bench.fake_server (instant answers, for calibration).

Every process is stopped in ``stop()`` (SIGTERM to its group, SIGKILL after a grace period), also when
the benchmark fails, so nothing is left listening.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import requests

from ..clients.base import make_client
from ..clients.http import HttpClient, check_response
from .keepalive import KeepAliveJsonPoster
from .loadgen import SenderFactory

STOP_GRACE_S = 20.0
IMAGES_PER_REQUEST = {"http-x8": 8}  # targets whose requests carry several images (default 1)


class ServerError(RuntimeError):
    """A server that did not start (its log tail is in the message)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ImageFailed(RuntimeError):
    """The request went through but the image was answered with an error."""


class ProjectSender:
    """A loadgen Sender over the project's own clients: one image per request, top-5, result checked."""

    def __init__(self, protocol: str, address: str, timeout: float, **options: object) -> None:
        self._client = make_client(protocol, address, timeout=timeout, **options)

    def send(self, data: bytes) -> None:
        result = self._client.classify([data], 5)[0]
        if not result.ok:
            raise ImageFailed(f"{result.error_code}: {result.error_message}")

    def close(self) -> None:
        self._client.close()


class HttpSender:
    """The service's HTTP API as HttpClient speaks it (same body, same answer checks), on a lean transport.

    ``images``: images per request (the payload repeated), for the several-images-per-request target.
    """

    def __init__(self, address: str, timeout: float, payloads: Sequence[bytes], images: int = 1) -> None:
        client = HttpClient(address, timeout=timeout)  # builds bodies only; its session stays unused
        path = "/" + client.url.split("/", 3)[3]
        self._images = images
        self._poster = KeepAliveJsonPoster(address, path, timeout,
                                           lambda d: client.request_body([d] * images, 5), payloads)
        client.close()

    def send(self, data: bytes) -> None:
        answer = self._poster.post(data)
        for result in check_response(int(answer.get("err_no", 0)), answer.get("err_msg", ""),
                                     answer.get("key", []), answer.get("value", []), self._images):
            if not result.ok:
                raise ImageFailed(f"{result.error_code}: {result.error_message}")

    def close(self) -> None:
        self._poster.close()


def sender_for(target: str, address: str, timeout: float, payloads: Sequence[bytes],
               model: str = "") -> SenderFactory:
    """The sender factory of a target: http, grpc, brpc (the project's clients), documented, the floor's
    (``floor-http``, ``floor-grpc``: the same clients), ``http-x8`` (HTTP, 8 images per request) or
    ``v2-http`` / ``v2-grpc`` (the Open Inference Protocol, for ``model``)."""
    target = target[len("floor-"):] if target.startswith("floor-") else target
    if target == "http":
        return lambda: HttpSender(address, timeout, payloads)
    if target == "http-x8":
        return lambda: HttpSender(address, timeout, payloads, images=IMAGES_PER_REQUEST[target])
    if target.startswith("v2-"):  # the Open Inference Protocol, raw image bytes (binary tensor data)
        return lambda: ProjectSender(target, address, timeout, model=model)
    if target == "documented":
        from .documented_way import DocumentedClient
        return lambda: DocumentedClient(address, timeout, payloads)
    return lambda: ProjectSender(target, address, timeout)


@dataclass
class ServerProcess:
    name: str
    argv: List[str]
    log_path: Path
    ready: Callable[[], bool]
    cwd: Optional[Path] = None
    env: Dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 300.0
    _proc: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._proc.pid

    def start(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        env = dict(os.environ, **self.env)
        self._proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      cwd=self.cwd, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServerError(f"{self.name} exited with code {self._proc.returncode} while starting: "
                                  f"{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"{self.name} was not ready within {self.startup_timeout:.0f}s: {self.log_tail()}")

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) + f" (log: {self.log_path})"

    def stop(self) -> None:
        """SIGTERM the process group (the server, its op processes, its gateway), SIGKILL what stays."""
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self._proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)  # stragglers of the group (op processes)
        except ProcessLookupError:
            pass
        self._proc.wait()
        self._proc = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def answers(factory: SenderFactory, probe: bytes) -> Callable[[], bool]:
    """A readiness check: one real request succeeds."""
    def check() -> bool:
        try:
            sender = factory()
        except Exception:  # noqa: BLE001 - not listening yet
            return False
        try:
            sender.send(probe)
            return True
        except Exception:  # noqa: BLE001
            return False
        finally:
            sender.close()
    return check


def _python(module: str, *args: str) -> List[str]:
    return [sys.executable, "-m", module, *args]


@dataclass
class PipelinePorts:
    http: int
    grpc: int
    metrics: int
    v2_http: int = 0  # 0: the Open Inference Protocol ports stay off
    v2_grpc: int = 0

    @classmethod
    def free(cls, v2: bool = False) -> "PipelinePorts":
        return cls(free_port(), free_port(), free_port(), *((free_port(), free_port()) if v2 else (0, 0)))

    def of(self, target: str) -> int:
        """The port a load target talks to (http, http-x8, grpc, v2-http, v2-grpc, floor-*)."""
        target = target[len("floor-"):] if target.startswith("floor-") else target
        return {"http": self.http, "http-x8": self.http, "grpc": self.grpc, "v2-http": self.v2_http,
                "v2-grpc": self.v2_grpc}[target]


def pipeline_server(model_dir: Path, ports: PipelinePorts, workdir: Path, probe: bytes, timeout: float,
                    extra_args: Sequence[str] = (), name: str = "pipeline") -> ServerProcess:
    def ready() -> bool:
        try:
            if requests.get(f"http://127.0.0.1:{ports.metrics}/readyz", timeout=2).status_code != 200:
                return False
        except requests.RequestException:
            return False
        return all(answers(sender_for(p, f"127.0.0.1:{port}", timeout, [probe]), probe)()
                   for p, port in (("http", ports.http), ("grpc", ports.grpc)))
    argv = _python("rexnet_pipelines.cli", "--model-dir", str(model_dir), "--http-port", str(ports.http),
                   "--grpc-port", str(ports.grpc), "--metrics-port", str(ports.metrics),
                   "--oip-http-port", str(ports.v2_http), "--oip-grpc-port", str(ports.v2_grpc),
                   "--workdir", str(workdir / name), *extra_args)
    return ServerProcess(f"rexnet-serve ({name})", argv, workdir / f"{name}.log", ready)


def brpc_server(model_dir: Path, port: int, workdir: Path, probe: bytes, timeout: float,
                extra_args: Sequence[str] = ()) -> ServerProcess:
    argv = _python("rexnet_serving.brpc.cli", "native", "--model-dir", str(model_dir), "--port", str(port),
                   *extra_args)
    return ServerProcess("rexnet-brpc native", argv, workdir / "brpc.log",
                         answers(sender_for("brpc", f"127.0.0.1:{port}", timeout, [probe]), probe))


def documented_server(model_dir: Path, http_port: int, workdir: Path, probe: bytes,
                      timeout: float) -> ServerProcess:
    argv = _python("rexnet_serving.bench.documented_way", "--model-dir", str(model_dir.resolve()),
                   "--http-port", str(http_port), "--grpc-port", str(free_port()),
                   "--workdir", str(workdir / "documented"))
    return ServerProcess("documented-way Pipeline", argv, workdir / "documented.log",
                         answers(sender_for("documented", f"127.0.0.1:{http_port}", timeout, [probe]), probe))


def fake_server(protocol: str, port: int, workdir: Path, probe: bytes) -> ServerProcess:
    argv = _python("rexnet_serving.bench.fake_server", "--protocol", protocol, "--port", str(port))
    return ServerProcess(f"fake {protocol} server", argv, workdir / f"fake_{protocol}.log",
                         answers(sender_for(protocol, f"127.0.0.1:{port}", 5.0, [probe]), probe),
                         startup_timeout=60.0)


