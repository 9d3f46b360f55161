"""The initContainer's model fetcher (docker/fetch_archive.py) against a real HTTP server on 127.0.0.1
that misbehaves: a gzip Content-Encoding on the .tar.gz (the digest is of the bytes as sent), a body or
archive past the size cap, a server that trickles bytes (the total time cap), and a Content-Length that
is not a number. Each is a clear error and exit code 1, never a traceback or a hang; nothing is left
behind. (The ordinary file:// and HTTP round trips are in test_k8s.py.)"""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

from conftest import free_port

FETCH = Path(__file__).resolve().parents[1] / "docker" / "fetch_archive.py"


def run_fetch(*args: str, env: Dict[str, str] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FETCH), *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})))


def make_archive(files: Dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


ARCHIVE = make_archive({"manifest.json": b"{}", "serving_server/inference.pdiparams": os.urandom(50_000)})
DIGEST = hashlib.sha256(ARCHIVE).hexdigest()


class Misbehaving(http.server.BaseHTTPRequestHandler):
    """Answers by path; records the Accept-Encoding each request asked for."""

    protocol_version = "HTTP/1.1"
    seen: Dict[str, str] = {}

    def log_message(self, *args: Any) -> None:
        pass

    def _head(self, length: str, **headers: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/gzip")
        self.send_header("Content-Length", length)
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        Misbehaving.seen[self.path] = self.headers.get("Accept-Encoding", "")
        try:
            if self.path == "/gzip.tar.gz":  # a .tar.gz served as "gzip-encoded": decoding it breaks the digest
                self._head(str(len(ARCHIVE)), Content_Encoding="gzip")
                self.wfile.write(ARCHIVE)
            elif self.path == "/announced-huge.tar.gz":
                self._head(str(10 ** 12))
                self.wfile.write(ARCHIVE)
            elif self.path == "/unannounced-huge.tar.gz":  # no Content-Length: the cap applies while reading
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            elif self.path in ("/bad-length.tar.gz", "/unicode-length.tar.gz"):
                self._head("abc" if self.path.startswith("/bad") else "²")
                self.wfile.write(ARCHIVE)
            elif self.path == "/slow.tar.gz":  # an honest length, one byte every 0.2 s
                self._head(str(len(ARCHIVE)))
                for i in range(len(ARCHIVE)):
                    self.wfile.write(ARCHIVE[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.2)
            else:
                self.send_error(404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the fetcher gave up, as it should


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Misbehaving)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def fetch(url: str, dest: Path, *extra: str, digest: str = DIGEST, env: Dict[str, str] = None
          ) -> subprocess.CompletedProcess:
    return run_fetch("fetch", url, "--sha256", digest, "--dest", str(dest), "--retries", "1", *extra, env=env)


def assert_refused(proc: subprocess.CompletedProcess, message: str, dest: Path) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not dest.exists()
    assert [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}-")] == [], "staging left"


def test_gzip_content_encoding_is_hashed_as_sent(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "current"
    proc = fetch(f"{server}/gzip.tar.gz", dest, "--require", "manifest.json")
    assert proc.returncode == 0, proc.stderr
    assert Misbehaving.seen["/gzip.tar.gz"] == "identity"
    assert (dest / "serving_server" / "inference.pdiparams").stat().st_size == 50_000


def test_content_length_over_the_cap_is_refused_before_the_body(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "current"
    proc = fetch(f"{server}/announced-huge.tar.gz", dest)
    assert_refused(proc, f"Content-Length announces {10 ** 12} bytes, over the {4 << 30}-byte cap", dest)


def test_body_over_the_cap_is_refused_while_reading(server: str, tmp_path: Path) -> None:
    dest = tmp_path / "current"
    proc = fetch(f"{server}/unannounced-huge.tar.gz", dest, "--max-bytes", "1000000")
    assert_refused(proc, "the download exceeds", dest)
    assert "over the 1000000-byte cap (--max-bytes, REXNET_FETCH_MAX_BYTES)" in proc.stderr
    # The environment sets the default (how the initContainer is configured without new args).
    proc = fetch(f"{server}/gzip.tar.gz", dest, env={"REXNET_FETCH_MAX_BYTES": "1000"})
    assert_refused(proc, "over the 1000-byte cap", dest)
    bad = fetch(f"{server}/gzip.tar.gz", dest, env={"REXNET_FETCH_MAX_BYTES": "lots"})
    assert bad.returncode == 2 and "REXNET_FETCH_MAX_BYTES" in bad.stderr


def test_archive_that_unpacks_past_the_cap_is_refused(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(make_archive({"manifest.json": b"{}", "zeros": b"\0" * 3_000_000}))
    assert bomb.stat().st_size < 100_000
    dest = tmp_path / "current"
    proc = fetch(bomb.as_uri(), dest, "--max-bytes", "1000000",
                 digest=hashlib.sha256(bomb.read_bytes()).hexdigest())
    assert_refused(proc, "unpacks to 3000002 bytes, over the 1000000-byte cap", dest)


@pytest.mark.parametrize("path, shown", [("/bad-length.tar.gz", "'abc'"), ("/unicode-length.tar.gz", "'²'")])
def test_non_numeric_content_length_is_a_clear_error(server: str, tmp_path: Path, path: str, shown: str) -> None:
    dest = tmp_path / "current"
    proc = fetch(f"{server}{path}", dest)
    assert_refused(proc, f"Content-Length that is not a decimal number: {shown}", dest)


def test_a_trickling_server_cannot_hold_the_fetch_past_its_time_cap(server: str, tmp_path: Path) -> None:
    """Each byte arrives well within --timeout, so only the total cap ends it (the whole body would
    take about 10 s per 50 bytes, i.e. hours)."""
    dest = tmp_path / "current"
    proc = fetch(f"{server}/slow.tar.gz", dest, "--timeout", "30", "--max-seconds", "2")
    assert_refused(proc, "not done within 2 s (--max-seconds, REXNET_FETCH_MAX_SECONDS)", dest)
    bad = fetch(f"{server}/slow.tar.gz", dest, "--max-seconds", "0")
    assert bad.returncode == 2 and "not a positive float" in bad.stderr
