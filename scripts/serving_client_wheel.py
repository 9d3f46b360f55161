#!/usr/bin/env python3
"""Installs Paddle Serving's client (paddle-serving-client 0.9.0) into the running interpreter's environment.

Why this script: 0.9.0 is Paddle Serving's last release and its client is one wheel tagged
``cp39-none-any`` (pure Python plus a prebuilt 176 MB ``serving_client.so``), which pip refuses on any
other Python because of the tag alone. This project uses only its Python parts (the generated ``_pb2``
modules, and ``Client``/``HttpClient`` as names paddle_serving_server imports); ``serving_client.so`` is
the C++ bRPC client that ``Client.load_client_config`` imports lazily, which nothing here calls (the
project has its own bRPC client, rexnet_serving/brpc/). So: download the pinned wheel, check its sha256,
repack it without that library under the ``py3-none-any`` tag (``wheel unpack``/``wheel pack``, which
rewrite RECORD), and install it with ``--no-deps`` (its metadata pins grpcio<=1.33.2, which has no
wheels for current Pythons; the pins it needs are in setup.py and scripts/no-deps-requirements.txt).

Run by scripts/bootstrap.sh and the Dockerfiles. Exit codes: 0 installed, 1 digest mismatch or failure.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "paddle-serving-client==0.9.0"
WHEEL = "paddle_serving_client-0.9.0-cp39-none-any.whl"
# sha256 of WHEEL as PyPI serves it (https://pypi.org/project/paddle-serving-client/0.9.0/#files).
SHA256 = "acc2d8af6e678553617ad502be6e83dba18c508db4505585ff7e4a68716084db"
LEFT_OUT = ("paddle_serving_client/serving_client.so",)


def run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], check=True)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run("pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.9",
            "--implementation", "cp", PACKAGE, "-d", str(work / "dl"))
        wheel = work / "dl" / WHEEL
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != SHA256:
            print(f"serving_client_wheel: {WHEEL} has sha256 {digest}, expected {SHA256}", file=sys.stderr)
            return 1
        run("wheel", "unpack", "-d", str(work / "src"), str(wheel))
        (tree,) = (work / "src").iterdir()
        for member in LEFT_OUT:
            (tree / member).unlink()
        wheel_file = next(tree.glob("*.dist-info")) / "WHEEL"
        wheel_file.write_text(wheel_file.read_text().replace("Tag: cp39-none-any", "Tag: py3-none-any"))
        (work / "out").mkdir()
        run("wheel", "pack", "-d", str(work / "out"), str(tree))
        (repacked,) = (work / "out").glob("paddle_serving_client-0.9.0-py3-none-any.whl")
        run("pip", "install", "-q", "--no-deps", "--force-reinstall", str(repacked))
    print(f"serving_client_wheel: installed {PACKAGE} (py3, without {', '.join(LEFT_OUT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
