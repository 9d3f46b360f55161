"""Integrity of an export: the files the manifest lists are the files on disk, and the only ones loaded.

``verify_files`` is what every loader calls first (the rules are in rexnet_serving.manifest's docstring);
``record_files`` is what rexnet-export writes into the manifest. Kept apart from the manifest's schema
(rexnet_serving.manifest, which this module reads) so each is one idea: what an export declares, and
whether the disk agrees.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Tuple

from .manifest import (CHUNK_BYTES, CONTENT_KEY, MANIFEST_FILE, RUNTIME_FILES, FileRecord, IntegrityError, Manifest,
                       PathLike, content_digest, load_manifest)


def file_sha256(path: PathLike) -> str:
    """sha256 of a file read in 1 MiB chunks into one reused buffer (hashlib.file_digest is 3.11+)."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            count = f.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
    return digest.hexdigest()


def record_files(model_dir: PathLike) -> Dict[str, FileRecord]:
    """Size and sha256 of every file under ``model_dir`` but manifest.json (what rexnet-export stores)."""
    root = Path(model_dir)
    records = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if name != MANIFEST_FILE:
            records[name] = FileRecord(size=path.stat().st_size, sha256=file_sha256(path))
    return records


# (manifest path) -> stat signature of the manifest and its files when they last verified in this
# process: Classifier and InferenceModel both verify the same export, and hashing ReXNet_3_0's 280 MB
# twice at start-up buys nothing. Any write to a file changes its ctime/mtime, so a file changed since
# is hashed again.
_verified: Dict[Path, Tuple[Any, ...]] = {}
_verified_lock = threading.Lock()


def _signature(paths: Sequence[Path]) -> Tuple[Any, ...]:
    signature = []
    for path in paths:
        st = path.stat()
        signature.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(signature)


def _inside(root: Path, name: str, what: str) -> Path:
    """``root/name`` with every symlink resolved; IntegrityError naming ``what`` unless it stays in ``root``."""
    try:
        target = (root / name).resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
        raise IntegrityError(f"{root / name}: {what}: cannot resolve it ({exc})") from None
    if target != root and root not in target.parents:
        raise IntegrityError(f"{root / name}: {what} resolves to {target}, outside the export {root} "
                             "(a symlink out of it): only files inside the export are verified and loaded")
    return target


def _check_directory(manifest: Manifest, root: Path, key: str, located: Mapping[str, Path]) -> None:
    """Every file in the directory ``paths[key]`` (which a runtime loads as a whole) is listed, and no
    symlinked subdirectory leaves the export."""
    name = manifest.paths[key]
    directory = located[name]
    if not directory.is_dir():
        raise IntegrityError(f"{root / name}: paths.{key} is not a directory (missing or replaced): "
                             "re-export or re-fetch the model")
    seen = set()
    for current, subdirs, filenames in os.walk(directory, followlinks=True):
        real = _inside(root, os.path.relpath(current, root), f"a directory under paths.{key}")
        if real in seen:  # a symlink back to a directory already walked
            subdirs.clear()
            continue
        seen.add(real)
        for filename in filenames:
            relative = Path(current, filename).relative_to(directory).as_posix()
            listed = f"{name}/{relative}"
            if listed not in manifest.files:
                raise IntegrityError(f"{root / listed}: not listed in {root / MANIFEST_FILE}, but it is in "
                                     f"paths.{key} ({name}/), which a runtime loads as a whole: remove it "
                                     "or re-export the model")


def locate_files(manifest: Manifest, root: Path) -> Dict[str, Path]:
    """Every path the manifest names, resolved once inside ``root`` (the resolved export directory);
    IntegrityError naming the key or file that leaves the export or is not listed."""
    located = {name: _inside(root, name, f"files entry {name!r}") for name in manifest.files}
    for key, name in manifest.paths.items():
        located[name] = _inside(root, name, f"paths.{key}")
    located[manifest.labels_file] = _inside(root, manifest.labels_file, "labels_file")
    _inside(root, MANIFEST_FILE, MANIFEST_FILE)
    for key in manifest.paths:
        if key in RUNTIME_FILES:
            _check_directory(manifest, root, key, located)
    return located


def verify_files(model_dir: PathLike) -> Manifest:
    """The export's manifest, after checking that manifest.json is as written, that every path it names
    stays inside the export and is listed, and that every listed file has its recorded size and sha256.
    Call before loading anything from ``model_dir``, and load through the returned manifest (its
    ``path``, ``file``, ``file_in`` and ``labels_path`` are the resolved paths that were checked).

    Raises FileNotFoundError / ValueError from load_manifest (not an export, a path outside it or not
    listed, or an export that predates the digests) and IntegrityError naming the first file that
    differs or leaves the export.
    """
    manifest = load_manifest(model_dir)
    root = Path(model_dir).resolve()
    manifest_path = root / MANIFEST_FILE
    located = locate_files(manifest, root)
    listed = [(name, located[name]) for name in sorted(manifest.files)]
    for name, path in listed:
        if not path.is_file():
            raise IntegrityError(f"{root / name}: missing (listed in {manifest_path}); the export is "
                                 "incomplete: re-export or re-fetch it")
    try:
        signature = _signature([manifest_path] + [path for _, path in listed])
    except OSError as exc:
        raise IntegrityError(f"{exc.filename}: cannot read it ({exc.strerror})") from None
    verified = replace(manifest, located=located)
    with _verified_lock:
        if _verified.get(manifest_path) == signature:
            return verified
    raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    stored = raw.get(CONTENT_KEY)
    if stored != content_digest(raw):
        raise IntegrityError(f"{manifest_path}: edited after export ({CONTENT_KEY} "
                             f"{'is missing' if stored is None else 'does not match its content'}): "
                             "re-export the model instead of editing its manifest")
    for name, path in listed:
        expected = manifest.files[name]
        size = path.stat().st_size
        if size != expected.size:
            raise IntegrityError(f"{root / name}: {size} bytes, but the manifest records {expected.size} "
                                 "(truncated or replaced): re-export or re-fetch the model")
        if file_sha256(path) != expected.sha256:
            raise IntegrityError(f"{root / name}: sha256 differs from the manifest's (the file is damaged "
                                 "or was replaced; same size): re-export or re-fetch the model")
    with _verified_lock:
        _verified[manifest_path] = signature
    return verified
