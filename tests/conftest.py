"""Shared test helpers: the ../shared fixtures (skipped where absent, failed in CI) and free ports."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def state_dict_contract() -> dict:
    import json
    return json.loads(shared_file("fixtures/paddleclas_rexnet_state_dicts.json").read_text())
