"""rexnet-serve as a subprocess for the tests: started on 127.0.0.1 free ports with a config that extends
cpu.yml, waited for until /readyz says ready, and always stopped (the whole process group)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import REPO_ROOT, free_port

BIN = Path(sys.executable).parent


class ServiceProcess:
    def __init__(self, model_dir: Path, work: Path, config_text: str = "", start_timeout: float = 240,
                 model_flag: str = "--model-dir") -> None:
        self.work = work
        config = work / "test.yml"
        config.write_text(f"extends: {REPO_ROOT / 'serving_configs' / 'cpu.yml'}\n{config_text}", encoding="utf-8")
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        self.oip_http, self.oip_grpc = free_port(), free_port()
        self.log = work / "serve.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "rexnet-serve"), "--config", str(config), model_flag, str(model_dir), "--host",
                 "127.0.0.1", "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--oip-http-port",
                 str(self.oip_http), "--oip-grpc-port", str(self.oip_grpc), "--metrics-port",
                 str(self.metrics), "--workdir", str(work / "wd")],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"rexnet-serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if self.get("readyz").status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"rexnet-serve not ready after {start_timeout}s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}/rexnet/prediction"

    def get(self, path: str) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{self.metrics}/{path}", timeout=10)

    def metric(self, name: str, **labels: str) -> float:
        label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = re.escape(name + (f"{{{label_text}}}" if labels else "")) + r" ([0-9.e+-]+)"
        found = re.search(pattern, self.get("metrics").text)
        return float(found.group(1)) if found else 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
