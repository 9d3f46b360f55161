"""The exported model's contract: ``manifest.json`` beside ``inference/`` and ``serving_server/``.

PaddleClas writes the pre/postprocessing contract next to an exported model; Triton's model repository
declares inputs, outputs and dtypes once. This is the same idea for one ReXNet export: the
architecture, the feed/fetch tensors, the preprocessing constants and the label file are written here
by ``rexnet-export`` and everything downstream (ops, clients, checks) reads them from here.

Loading is strict: an unknown or missing key is an error naming the file and the key.

Integrity: ``files`` records the size and sha256 of every file of the export (manifest.json aside) and
``content_sha256`` is the sha256 of the manifest's own canonical JSON without that key, so a damaged
weights file of the same size, a missing file, or a hand edit of the manifest (say, the normalisation
constants) is refused by ``verify_files`` before anything is loaded. Every loader calls it (Paddle
Inference, the Classifier, the bRPC endpoint, the C++ Serving launcher, the benchmark's baseline).
Exports written before the digests existed (format_version 1) are refused with how to re-export.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .preprocess import PreprocessConfig

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2  # 2: ``files`` and ``content_sha256`` (integrity); 1 had neither
CHUNK_BYTES = 1 << 20  # hashing reads; larger chunks measured no faster
PathLike = Union[str, Path]

# Keys of ``paths``: the directories/files of an export, relative to the model directory.
INFERENCE = "inference"
SERVING_SERVER = "serving_server"
SERVING_CLIENT = "serving_client"
ONNX = "onnx"
# Paddle Lite models (rexnet-export --lite): lite/<target>/model.nb, recorded as paths["lite_<target>"].
LITE = "lite"
LITE_FILE = "model.nb"
LITE_TARGETS = ("arm", "x86")


def lite_key(target: str) -> str:
    return f"{LITE}_{target}"


LITE_KEYS = tuple(lite_key(t) for t in LITE_TARGETS)
PATH_KEYS = (INFERENCE, SERVING_SERVER, SERVING_CLIENT, ONNX) + LITE_KEYS
REQUIRED_PATH_KEYS = (INFERENCE, SERVING_SERVER, SERVING_CLIENT)
# The program and weights file names inside inference/ (and serving_server/).
MODEL_FILE = "inference.pdmodel"
PARAMS_FILE = "inference.pdiparams"


def _check_keys(data: Any, required: Tuple[str, ...], optional: Tuple[str, ...], where: str,
                source: str) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: {where or 'the manifest'} must be a JSON object, "
                         f"not {type(data).__name__}")
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in required and key not in optional:
            raise ValueError(f"{source}: unknown key '{prefix}{key}'")
    for key in required:
        if key not in data:
            raise ValueError(f"{source}: missing key '{prefix}{key}'")


@dataclass(frozen=True)
class TensorSpec:
    """One feed or fetch tensor: its name in the Paddle program, its Serving alias, shape and dtype.

    ``shape`` includes the batch dimension as -1, e.g. (-1, 3, 224, 224).
    """

    name: str
    alias: str
    shape: Tuple[int, ...]
    dtype: str

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "alias": self.alias, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Any, where: str, source: str) -> "TensorSpec":
        keys = tuple(f.name for f in fields(cls))
        _check_keys(data, keys, (), where, source)
        shape = data["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise ValueError(f"{source}: {where}.shape must be a list of integers, got {shape!r}")
        for key in ("name", "alias", "dtype"):
            if not isinstance(data[key], str) or not data[key]:
                raise ValueError(f"{source}: {where}.{key} must be a non-empty string")
        return cls(name=data["name"], alias=data["alias"], shape=tuple(shape), dtype=data["dtype"])


@dataclass(frozen=True)
class FileRecord:
    """Size and sha256 of one file of the export, as ``rexnet-export`` wrote it."""

    size: int
    sha256: str

    def to_dict(self) -> Dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Any, where: str, source: str) -> "FileRecord":
        _check_keys(data, ("size", "sha256"), (), where, source)
        size, sha = data["size"], data["sha256"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"{source}: {where}.size must be a non-negative integer, got {size!r}")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise ValueError(f"{source}: {where}.sha256 must be a 64-digit lower-case hex string")
        return cls(size=size, sha256=sha)


def _check_relative(name: str, source: str) -> None:
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or ".." in parts or "\\" in name or name == MANIFEST_FILE:
        raise ValueError(f"{source}: files: {name!r} is not a file path inside the export")


@dataclass(frozen=True)
class Manifest:
    """The contents of ``manifest.json``; ``model_dir`` is where it was loaded from (not stored)."""

    arch: str
    class_num: int
    input_size: int
    preprocess: PreprocessConfig
    feed: TensorSpec
    fetch: TensorSpec
    softmax: bool
    labels_file: str
    weights_sha256: Optional[str]
    random_init: bool
    exported_at: str
    versions: Dict[str, str]
    paths: Dict[str, str]
    files: Dict[str, FileRecord] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    model_dir: Optional[Path] = field(default=None, compare=False)

    # -- where things are ------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        """Absolute path of ``paths[key]`` (``inference``, ``serving_server``, ``serving_client``,
        ``onnx``)."""
        if self.model_dir is None:
            raise ValueError("this manifest was not loaded from a model directory")
        if key not in self.paths:
            raise KeyError(f"the export in {self.model_dir} has no {key!r} "
                           f"(it has {', '.join(sorted(self.paths))})")
        return self.model_dir / self.paths[key]

    @property
    def inference_dir(self) -> Path:
        return self.path(INFERENCE)

    @property
    def serving_server_dir(self) -> Path:
        return self.path(SERVING_SERVER)

    @property
    def serving_client_dir(self) -> Path:
        return self.path(SERVING_CLIENT)

    @property
    def onnx_file(self) -> Optional[Path]:
        return self.path(ONNX) if ONNX in self.paths else None

    def lite_file(self, target: str) -> Optional[Path]:
        """The Paddle Lite model for ``target`` (arm, x86), if the export has one."""
        return self.path(lite_key(target)) if lite_key(target) in self.paths else None

    @property
    def labels_path(self) -> Path:
        if self.model_dir is None:
            raise ValueError("this manifest was not loaded from a model directory")
        return self.model_dir / self.labels_file

    def labels(self) -> List[str]:
        """Class names indexed by class id; their count is checked against ``class_num``."""
        names = read_labels(self.labels_path)
        if len(names) != self.class_num:
            raise ValueError(f"{self.labels_path} has {len(names)} labels, but the model has "
                             f"{self.class_num} classes")
        return names

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {
            "format_version": self.format_version,
            "arch": self.arch,
            "class_num": self.class_num,
            "input_size": self.input_size,
            "preprocess": self.preprocess.to_dict(),
            "feed": self.feed.to_dict(),
            "fetch": self.fetch.to_dict(),
            "softmax": self.softmax,
            "labels_file": self.labels_file,
            "weights_sha256": self.weights_sha256,
            "random_init": self.random_init,
            "exported_at": self.exported_at,
            "versions": dict(self.versions),
            "paths": dict(self.paths),
            "files": {name: record.to_dict() for name, record in sorted(self.files.items())},
        }

    def write(self, model_dir: PathLike) -> Path:
        """Write manifest.json with ``content_sha256``, the digest of everything else in it."""
        data = self.to_dict()
        data[CONTENT_KEY] = content_digest(data)
        target = Path(model_dir) / MANIFEST_FILE
        target.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        return target

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST_FILE,
                  model_dir: Optional[PathLike] = None) -> "Manifest":
        """Validate and build; ``source`` names the file in error messages."""
        stored = tuple(f.name for f in fields(cls) if f.name != "model_dir")
        if not isinstance(data, Mapping):
            _check_keys(data, stored, (), "", source)  # raises: not an object
        if data.get("format_version") == 1:
            raise ValueError(f"{source}: this export predates file digests (format_version 1), so it "
                             "cannot be checked and is not served: re-export it with rexnet-export "
                             f"--arch {data.get('arch', '<arch>')} --weights <its weights> "
                             f"-o {model_dir or '<model dir>'} --force (plus the flags used before)")
        _check_keys(data, stored, (), "", source)
        if data["format_version"] != FORMAT_VERSION:
            raise ValueError(f"{source}: format_version {data['format_version']!r} is not supported "
                             f"(this rexnet-serving reads {FORMAT_VERSION}); re-export the model")
        for key in ("class_num", "input_size"):
            value = data[key]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{source}: {key} must be a positive integer, got {value!r}")
        for key in ("softmax", "random_init"):
            if not isinstance(data[key], bool):
                raise ValueError(f"{source}: {key} must be true or false, got {data[key]!r}")
        for key in ("arch", "labels_file", "exported_at"):
            if not isinstance(data[key], str) or not data[key]:
                raise ValueError(f"{source}: {key} must be a non-empty string")
        sha = data["weights_sha256"]
        if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
            raise ValueError(f"{source}: weights_sha256 must be null or a 64-digit hex string")
        if (sha is None) != data["random_init"]:
            raise ValueError(f"{source}: weights_sha256 and random_init disagree "
                             "(random_init is true exactly when there is no weights hash)")
        _check_keys(data["paths"], REQUIRED_PATH_KEYS, (ONNX,) + LITE_KEYS, "paths", source)
        _check_keys(data["versions"], ("paddle", "rexnet_serving"), ("paddlelite",), "versions", source)
        if not isinstance(data["files"], Mapping) or not data["files"]:
            raise ValueError(f"{source}: files must be a non-empty object (path -> size, sha256)")
        files = {}
        for name, record in data["files"].items():
            _check_relative(name, source)
            files[name] = FileRecord.from_dict(record, f"files.{name}", source)
        try:
            preprocess = PreprocessConfig.from_dict(data["preprocess"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: preprocess: {exc}") from None
        preprocess_fields = {f.name for f in fields(PreprocessConfig)}
        for key in preprocess_fields:
            if key not in data["preprocess"]:
                raise ValueError(f"{source}: missing key 'preprocess.{key}'")
        if preprocess.crop_size != data["input_size"]:
            raise ValueError(f"{source}: preprocess.crop_size {preprocess.crop_size} differs from "
                             f"input_size {data['input_size']}")
        return cls(
            arch=data["arch"], class_num=data["class_num"], input_size=data["input_size"],
            preprocess=preprocess,
            feed=TensorSpec.from_dict(data["feed"], "feed", source),
            fetch=TensorSpec.from_dict(data["fetch"], "fetch", source),
            softmax=data["softmax"], labels_file=data["labels_file"],
            weights_sha256=sha, random_init=data["random_init"], exported_at=data["exported_at"],
            versions={str(k): str(v) for k, v in data["versions"].items()},
            paths={str(k): str(v) for k, v in data["paths"].items()},
            files=files, format_version=data["format_version"],
            model_dir=Path(model_dir).resolve() if model_dir is not None else None,
        )


def load_manifest(model_dir: PathLike) -> Manifest:
    """Read ``<model_dir>/manifest.json``; a clear error when ``model_dir`` is not an export."""
    directory = Path(model_dir)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"not an exported model directory: {directory} does not exist "
                                "(create one with rexnet-export)")
    if not path.is_file():
        raise FileNotFoundError(f"not an exported model directory: {directory} has no "
                                f"{MANIFEST_FILE} (create one with rexnet-export)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(data, dict):
        data.pop(CONTENT_KEY, None)  # checked by verify_files, which reads the file again
    return Manifest.from_dict(data, source=str(path), model_dir=directory)


# -- integrity ---------------------------------------------------------------------------------------
CONTENT_KEY = "content_sha256"


class IntegrityError(ValueError):
    """A file of the export is missing, damaged or not the one the manifest describes; the message
    names the file."""


def content_digest(data: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces) without ``content_sha256``."""
    rest = {key: value for key, value in data.items() if key != CONTENT_KEY}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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


def verify_files(model_dir: PathLike) -> Manifest:
    """The export's manifest, after checking that manifest.json is as written and every file it lists
    has its recorded size and sha256. Call before loading anything from ``model_dir``.

    Raises FileNotFoundError / ValueError from load_manifest (not an export, or an export that predates
    the digests) and IntegrityError naming the first file that differs.
    """
    manifest = load_manifest(model_dir)
    root = Path(model_dir).resolve()
    manifest_path = root / MANIFEST_FILE
    listed = [(name, root / name) for name in sorted(manifest.files)]
    for name, path in listed:
        if not path.is_file():
            raise IntegrityError(f"{path}: missing (listed in {manifest_path}); the export is incomplete: "
                                 "re-export or re-fetch it")
    try:
        signature = _signature([manifest_path] + [path for _, path in listed])
    except OSError as exc:
        raise IntegrityError(f"{exc.filename}: cannot read it ({exc.strerror})") from None
    with _verified_lock:
        if _verified.get(manifest_path) == signature:
            return manifest
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
            raise IntegrityError(f"{path}: {size} bytes, but the manifest records {expected.size} "
                                 "(truncated or replaced): re-export or re-fetch the model")
        if file_sha256(path) != expected.sha256:
            raise IntegrityError(f"{path}: sha256 differs from the manifest's (the file is damaged or "
                                 "was replaced; same size): re-export or re-fetch the model")
    with _verified_lock:
        _verified[manifest_path] = signature
    return manifest


def read_labels(path: PathLike) -> List[str]:
    """Read a PaddleClas label list (``<id> <name>`` per line, ids 0..N-1 in order) as names by id."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    names: List[str] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            head, _, name = line.partition(" ")
            if not head.isdigit() or not name.strip():
                raise ValueError(f"{path}:{number}: expected '<id> <name>', got {line!r}")
            if int(head) != len(names):
                raise ValueError(f"{path}:{number}: expected class id {len(names)}, got {head} "
                                 "(ids must run 0, 1, 2, ... in order)")
            names.append(name.strip())
    if not names:
        raise ValueError(f"{path}: no labels")
    return names


def write_labels(path: PathLike, names: Sequence[str]) -> None:
    """Write class names as the label list read_labels reads: ``<id> <name>`` per line."""
    Path(path).write_text("".join(f"{i} {name}\n" for i, name in enumerate(names)), encoding="utf-8")
