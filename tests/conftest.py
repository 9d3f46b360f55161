"""Shared test helpers: the ../shared fixtures (skipped where absent, failed in CI) and free ports."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import rexnet_serving.compat  # noqa: F401  (test modules import Paddle Serving directly: see that module)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"


def shared_file(relative: str) -> Path:
    """Path of a file under ../shared; skip (or, with REXNET_REQUIRE_SHARED=1 as in .ci/run, fail)."""
    path = SHARED / relative
    if not path.exists():
        reason = (f"needs {path} (the shared fixtures beside the repo root; absent in a user's clone)")
        if os.environ.get("REXNET_REQUIRE_SHARED") == "1":
            pytest.fail(reason + ", and REXNET_REQUIRE_SHARED=1 forbids skipping")
        pytest.skip(reason)
    return path


def tool_python() -> str:
    """The Python that runs the official tritonclient and kserve scripts: this venv's since the move to
    Python 3.11 (the test extra installs them: their grpcio/protobuf now agree with the service's). The
    scripts still run as child processes, as a user's client would, never inside the test process."""
    import importlib.util
    import sys
    # found, not imported: tritonclient.grpc and kserve each register the v2 protocol's messages under
    # their own file names, which one process's descriptor pool refuses; each script imports one of them
    missing = [m for m in ("tritonclient", "kserve") if importlib.util.find_spec(m) is None]
    assert not missing, f"{', '.join(missing)} missing from this venv (the test extra): run `make setup`"
    return sys.executable


def lite_tools_python() -> str:
    """The Python 3.10 venv with paddlelite that rexnet-export --lite's worker runs on, built on first use
    by scripts/lite_tools.sh; skip where no Python 3.10 exists (fail in CI: REXNET_REQUIRE_SHARED=1)."""
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "lite_tools.sh")], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode == 3 and os.environ.get("REXNET_REQUIRE_SHARED") != "1":
        pytest.skip(f"no Paddle Lite venv: {proc.stderr.strip()[-500:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def tritonclient_report(http_port: int, grpc_port: int, model: str, image: bytes, bad: bytes, size: int,
                        work: Path) -> dict:
    """tests/oip_tritonclient_calls.py run from the tool venv against 127.0.0.1: what each call answered."""
    import json
    (work / "good.img").write_bytes(image)
    (work / "bad.img").write_bytes(bad)
    proc = subprocess.run([tool_python(), str(Path(__file__).parent / "oip_tritonclient_calls.py"),
                           f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", model, str(work / "good.img"),
                           str(work / "bad.img"), str(size)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes ``sock`` within ``seconds`` (EOF or reset), False if it stays open."""
    sock.settimeout(seconds)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def state_dict_contract() -> dict:
    import json
    return json.loads(shared_file("fixtures/paddleclas_rexnet_state_dicts.json").read_text())


def wait_for_port(proc: subprocess.Popen, port: int, what: str, timeout: float = 120.0) -> None:
    """Wait until ``proc`` accepts connections on 127.0.0.1:port; fail with its output if it dies."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read().decode(errors="replace") if proc.stdout else what
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        assert time.monotonic() < deadline, f"{what} did not open port {port} within {timeout:.0f} s"
        time.sleep(0.3)


SCORED_CLASSES = 10


def export_scored_model(directory: Path) -> Path:
    """ReXNet_1_0 with 10 classes whose classifier weights are scaled so scores are well apart.

    A randomly initialised ReXNet's pooled features are ~1e-7 (zero-initialised BN scales), which
    makes every softmax score 1/C; scaling the 1x1 classifier conv gives distinct, stable top-k.
    """
    import paddle

    from rexnet_serving.export import export_model
    from rexnet_serving.models import build_model
    paddle.seed(0)
    model = build_model("ReXNet_1_0", class_num=SCORED_CLASSES)
    weight = model.state_dict()["output.1.weight"]
    weight.set_value(np.random.default_rng(0).normal(0, 3e5, weight.shape).astype("float32"))
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "scaled.pdparams"
    paddle.save(model.state_dict(), str(weights))
    labels = directory / "labels.txt"
    labels.write_text("".join(f"{i} class {i}\n" for i in range(SCORED_CLASSES)), encoding="utf-8")
    export_model("ReXNet_1_0", directory / "model", weights=str(weights), labels=str(labels))
    return directory / "model"


@pytest.fixture(scope="session")
def scored_model_dir(tmp_path_factory) -> Path:
    """The 10-class export with distinct scores, exported once per test session."""
    return export_scored_model(tmp_path_factory.mktemp("scored_model"))


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory) -> Path:
    """ReXNet_1_0 with ImageNet classes and random weights (what `make serve` exports), once per session."""
    from rexnet_serving.export import export_model
    target = tmp_path_factory.mktemp("random_model") / "ReXNet_1_0"
    export_model("ReXNet_1_0", target)
    return target


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the training runs the selected tests need (tests/digits_runs.py: each holds one core for up
    to two minutes), so they train beside the tests collected before them."""
    import digits_runs
    wanted = {name for item in session.items for name in getattr(item, "fixturenames", ())
              if name in digits_runs.RUNS}
    for name in sorted(wanted):
        digits_runs.start(name)


def pytest_sessionfinish(session: pytest.Session) -> None:
    import digits_runs
    digits_runs.stop_all()
