#!/usr/bin/env python3
"""Fetch a .tar.gz by URL, check its sha256, unpack it atomically: how a pod gets its model.

Used in two places with the same code path:
  * the Deployment's initContainer (k8s/base/deployment.yaml) puts an exported model
    (rexnet-export's layout: manifest.json, inference/, serving_server/, serving_client/, labels.txt)
    into the pod's model emptyDir, from an http(s):// URL or a file:// URL (a baked-in archive or a
    PersistentVolumeClaim mounted read-only);
  * docker/Dockerfile.* fetch the C++ Serving binary with it at build time (bRPC backend variant).
`pack` makes such an archive from a directory and prints the sha256 to put in the manifests.

Integrity is the sha256 (FIPS 180-4) of the archive bytes, always required: a URL alone says nothing
about what arrives. The bytes hashed are the bytes as sent: identity encoding is asked for, and a server
that answers with ``Content-Encoding: gzip`` anyway (common for .tar.gz files) is not decoded, since
its body is then the archive itself.
Bounds: the download and the unpacked total are capped at --max-bytes (env REXNET_FETCH_MAX_BYTES,
default 4 GiB: ReXNet_3_0's export packs to about 0.6 GB, the C++ Serving binary package to less), and
the whole fetch, retries included, at --max-seconds (env REXNET_FETCH_MAX_SECONDS, default 1800: a
4 GiB archive at 3 MB/s); a server that trickles bytes cannot hold the initContainer past it.
--timeout still bounds each network read. A Content-Length that is not a decimal number, or that
exceeds the cap, is refused before the body is read. Unpacking refuses members that would land outside the destination (absolute
paths, "..", devices, links escaping it): the tarfile "data" filter's rules (PEP 706); on a Python
that predates the filter, links are refused outright.
Exit codes: 0 done, 1 fetch/checksum/layout failure, 2 usage error.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import IO, Callable, Iterable, Optional, Sequence
from urllib.parse import unquote, urlparse

CHUNK = 1 << 20
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
LENGTH_RE = re.compile(r"^[0-9]{1,20}$")  # ASCII digits only: str.isdigit() accepts "²", int() does not
MAX_BYTES_ENV = "REXNET_FETCH_MAX_BYTES"
MAX_SECONDS_ENV = "REXNET_FETCH_MAX_SECONDS"
DEFAULT_MAX_BYTES = 4 << 30
DEFAULT_MAX_SECONDS = 1800.0
STAMP = ".fetched-sha256"  # written beside the unpacked files: an initContainer restart skips the work


class FetchError(Exception):
    """The archive could not be fetched, failed its checksum, or has the wrong contents."""


def _progress(total: Optional[int], desc: str):
    # tqdm is in the serving image; a bare Python (a build stage) still works without a bar.
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None)


class Limits:
    """The caps of one fetch: bytes (download and unpacked total) and a deadline for all of it."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_seconds: float = DEFAULT_MAX_SECONDS) -> None:
        self.max_bytes = max_bytes
        self.max_seconds = max_seconds
        self.deadline = time.monotonic() + max_seconds

    def remaining(self, url: str) -> float:
        """Seconds left; FetchError once the deadline has passed."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise FetchError(f"{url}: not done within {self.max_seconds:g} s (--max-seconds, "
                             f"{MAX_SECONDS_ENV}): the server is too slow or stalls")
        return left

    def check_size(self, url: str, size: int, what: str) -> None:
        if size > self.max_bytes:
            raise FetchError(f"{url}: {what} {size} bytes, over the {self.max_bytes}-byte cap (--max-bytes, "
                             f"{MAX_BYTES_ENV})")


def _copy_hashing(read: Callable[[int], bytes], dst: IO[bytes], total: Optional[int], desc: str,
                  url: str, limits: Limits) -> str:
    """Copy ``read``'s chunks into ``dst`` until it returns b""; the deadline is checked between reads
    (each returns after at most one network read, so a trickling server cannot hold it)."""
    digest = hashlib.sha256()
    bar = _progress(total, desc)
    count = 0
    try:
        while True:
            limits.remaining(url)
            chunk = read(CHUNK)
            if not chunk:
                break
            count += len(chunk)
            limits.check_size(url, count, "the download exceeds")
            digest.update(chunk)
            dst.write(chunk)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return digest.hexdigest()


def _content_length(url: str, value: Optional[str], limits: Limits) -> Optional[int]:
    if value is None:
        return None
    if not LENGTH_RE.match(value.strip()):
        raise FetchError(f"{url}: the server sent a Content-Length that is not a decimal number: {value[:40]!r}")
    length = int(value.strip())
    limits.check_size(url, length, "Content-Length announces")
    return length


def download(url: str, dst: IO[bytes], timeout: float = 60.0, retries: int = 4,
             limits: Optional[Limits] = None) -> str:
    """Write the bytes at ``url`` (http, https or file) into ``dst``, as sent; return their sha256."""
    limits = limits or Limits()
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
        if not path.is_file():
            raise FetchError(f"{url}: no such file")
        size = path.stat().st_size
        limits.check_size(url, size, "the file has")
        with path.open("rb") as src:
            return _copy_hashing(src.read, dst, size, path.name, url, limits)
    if parsed.scheme not in ("http", "https"):
        raise FetchError(f"{url}: unsupported URL scheme {parsed.scheme!r} (use https://, http:// or file://)")
    import requests
    import urllib3
    last: Exception = FetchError("no attempt made")
    for attempt in range(1, retries + 1):
        dst.seek(0)
        dst.truncate()
        try:
            wait = min(timeout, limits.remaining(url))
            # Identity encoding: the digest is of the archive as published, not of a re-encoding.
            with requests.get(url, stream=True, timeout=(wait, wait),
                              headers={"Accept-Encoding": "identity"}) as resp:
                if resp.status_code >= 500 or resp.status_code == 429:
                    raise requests.HTTPError(f"HTTP {resp.status_code}", response=resp)
                if resp.status_code != 200:
                    # 4xx will not change on retry: wrong URL or missing credentials.
                    raise FetchError(f"{url}: HTTP {resp.status_code}")
                length = _content_length(url, resp.headers.get("Content-Length"), limits)
                return _copy_hashing(_one_read(resp.raw), dst, length,
                                     Path(parsed.path).name, url, limits)
        except (requests.ConnectionError, requests.Timeout, requests.HTTPError, urllib3.exceptions.HTTPError) as exc:
            last = exc
            if attempt < retries:
                pause = min(2 ** attempt, limits.remaining(url))
                print(f"fetch: {url}: {exc}; retry {attempt}/{retries - 1} in {pause:.0f}s", file=sys.stderr)
                time.sleep(pause)
    raise FetchError(f"{url}: {last}")


def _one_read(raw: "urllib3.response.HTTPResponse") -> Callable[[int], bytes]:
    """A reader that does at most one network read per call and returns the bytes as sent (no
    Content-Encoding decoding), so the time cap is checked between reads even against a trickling server.

    urllib3 2 has ``read1(n, decode_content=False)``. urllib3 1.26, which botocore still pins on Python
    < 3.10 (the s3 extra), has no read1: there the standard library's http.client response underneath
    (``_fp``, urllib3 1.26's only handle on it) gives the same one-read, undecoded semantics.
    """
    if hasattr(raw, "read1"):
        return lambda n: raw.read1(n, decode_content=False)
    return raw._fp.read1


def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    if name.startswith("/") or ".." in Path(name).parts:
        raise FetchError(f"archive member {name!r} points outside the destination")
    if member.isfile() or member.isdir():
        return
    # Links are fine where the "data" filter checks where they point (shared libraries ship as links).
    if member.issym() or member.islnk():
        if hasattr(tarfile, "data_filter"):
            return
        raise FetchError(f"archive member {name!r} is a link, refused by this Python (no tarfile data filter)")
    raise FetchError(f"archive member {name!r} is a device or FIFO; only files, directories and links are allowed")


def unpack(archive: Path, dest: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Unpack a .tar.gz into ``dest`` (which must not exist), refusing unsafe members and a total
    unpacked size over ``max_bytes`` (a small archive can expand to fill the volume)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member)
            total = sum(member.size for member in members if member.isfile())
            if total > max_bytes:
                raise FetchError(f"{archive.name}: unpacks to {total} bytes, over the {max_bytes}-byte cap "
                                 f"(--max-bytes, {MAX_BYTES_ENV})")
            dest.mkdir(parents=True)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:
                tar.extractall(dest, members=members)
    except tarfile.TarError as exc:
        raise FetchError(f"{archive.name}: not a readable tar archive ({exc})") from exc


def _content_root(unpacked: Path) -> Path:
    # `tar -C model .` and `tar model/` are both common: accept one top-level directory as the root.
    entries = [p for p in unpacked.iterdir()]
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return unpacked


def fetch(url: str, sha256: str, dest: Path, require: Sequence[str] = (), timeout: float = 60.0,
          retries: int = 4, max_bytes: int = DEFAULT_MAX_BYTES, max_seconds: float = DEFAULT_MAX_SECONDS) -> bool:
    """Put the archive at ``url`` unpacked at ``dest``; False when ``dest`` already holds that archive.

    ``dest`` appears complete or not at all: the archive is unpacked beside it and renamed into place.
    ``require`` names paths (relative to the archive's root) that must exist, checked before the rename.
    ``max_bytes`` caps the download and the unpacked total; ``max_seconds`` the whole download.
    """
    sha256 = sha256.strip().lower()
    if not SHA256_RE.match(sha256):
        raise FetchError(f"sha256 {sha256!r} is not 64 hex digits (the archive's digest, as `pack` prints it)")
    stamp = dest / STAMP
    if stamp.is_file() and stamp.read_text().strip() == sha256:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        archive = staging / "archive"
        with archive.open("wb") as out:
            got = download(url, out, timeout=timeout, retries=retries, limits=Limits(max_bytes, max_seconds))
        if got != sha256:
            raise FetchError(f"{url}: sha256 mismatch: expected {sha256}, got {got}")
        unpacked = staging / "unpacked"
        unpack(archive, unpacked, max_bytes)
        archive.unlink()
        root = _content_root(unpacked)
        missing = [name for name in require if not (root / name).exists()]
        if missing:
            raise FetchError(f"{url}: archive lacks {', '.join(missing)} (is it an exported model directory?)")
        (root / STAMP).write_text(sha256 + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(root, dest)
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def pack(src: Path, out: Path) -> str:
    """Write ``src``'s contents as a .tar.gz at ``out`` (entries relative to ``src``); return its sha256."""
    if not src.is_dir():
        raise FetchError(f"{src}: not a directory")
    manifest = src / "manifest.json"
    if manifest.is_file():
        json.loads(manifest.read_text())  # a broken manifest should fail here, not in the pod
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:gz") as tar:
        for path in sorted(src.rglob("*")):
            if path.name == STAMP:
                continue
            if path.is_symlink():
                raise FetchError(f"{path}: a symlink; pack real files (the pod may not have its target)")
            tar.add(path, arcname=str(path.relative_to(src)), recursive=False)
    digest = hashlib.sha256()
    with out.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_arg(value: str) -> str:
    value = value.strip().lower()
    if not SHA256_RE.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not 64 hex digits (the archive's sha256, as `pack` prints it)")
    return value


def _positive(kind: type, env: str) -> Callable[[str], float]:
    """argparse type; it also converts a default taken from ``env`` (argparse parses string defaults)."""
    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            number = 0
        if not number > 0:
            raise argparse.ArgumentTypeError(f"{value!r} is not a positive {kind.__name__} (the flag or ${env})")
        return number
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rexnet-fetch-archive", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download URL, check sha256, unpack into DEST")
    f.add_argument("url", help="https://, http:// or file:// URL of a .tar.gz")
    f.add_argument("--sha256", required=True, type=_sha256_arg, help="expected sha256 of the archive (64 hex digits)")
    f.add_argument("--dest", required=True, type=Path, help="directory to create with the archive's contents")
    f.add_argument("--require", action="append", default=[], metavar="PATH",
                   help="path that must exist in the archive (repeatable)")
    f.add_argument("--timeout", type=float, default=60.0, help="seconds per network read (default 60)")
    f.add_argument("--retries", type=int, default=4, help="attempts for http(s) (default 4)")
    f.add_argument("--max-bytes", type=_positive(int, MAX_BYTES_ENV),
                   default=os.environ.get(MAX_BYTES_ENV) or DEFAULT_MAX_BYTES,
                   help=f"cap on the download and on the unpacked total (default ${MAX_BYTES_ENV}, else 4 GiB)")
    f.add_argument("--max-seconds", type=_positive(float, MAX_SECONDS_ENV),
                   default=os.environ.get(MAX_SECONDS_ENV) or DEFAULT_MAX_SECONDS,
                   help=f"cap on the whole download, retries included (default ${MAX_SECONDS_ENV}, else 1800)")
    k = sub.add_parser("pack", help="make a .tar.gz of a directory and print its sha256")
    k.add_argument("src", type=Path, help="directory to pack (e.g. an exported model)")
    k.add_argument("-o", "--output", required=True, type=Path, help="archive to write")
    return p


def main(argv: Optional[Iterable[str]] = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    try:
        if args.cmd == "fetch":
            if fetch(args.url, args.sha256, args.dest, args.require, args.timeout, args.retries,
                     args.max_bytes, args.max_seconds):
                print(f"fetch: {args.url} -> {args.dest} (sha256 {args.sha256.strip().lower()})")
            else:
                print(f"fetch: {args.dest} already holds sha256 {args.sha256.strip().lower()}")
        else:
            print(pack(args.src, args.output))
    except FetchError as exc:
        print(f"fetch: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fetch: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
