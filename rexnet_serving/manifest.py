"""The exported model's contract: ``manifest.json`` beside ``inference/`` and ``serving_server/``.

PaddleClas writes the pre/postprocessing contract next to an exported model; Triton's model repository
declares inputs, outputs and dtypes once. This is the same idea for one ReXNet export: the
architecture, the feed/fetch tensors, the preprocessing constants and the label file are written here
by ``rexnet-export`` and everything downstream (ops, clients, checks) reads them from here.

Loading is strict: an unknown or missing key is an error naming the file and the key.

Integrity: ``files`` records the size and sha256 of every file of the export (manifest.json aside) and
``content_sha256`` is the sha256 of the manifest's own canonical JSON without that key, so a damaged
weights file of the same size, a missing file, or a hand edit of the manifest (say, the normalisation
constants) is refused by ``rexnet_serving.integrity.verify_files`` before anything is loaded. Every
loader calls it (Paddle Inference, OpenVINO, the Classifier and its labels, the bRPC endpoint, the C++
Serving launcher, the remote predictor's client config, the benchmark's baseline). Exports written
before the digests existed (format_version 1) are refused with how to re-export.

The digest is no signature (anyone who edits the manifest can recompute it), so what is loaded is
pinned by structure too: every path the manifest names (``files``, ``paths``, ``labels_file``) is
relative and free of ``..``, resolves (symlinks followed) inside the export, and is listed in
``files``; a directory a runtime loads as a whole (``inference``, ``serving_server``,
``serving_client``: Paddle Serving's LocalPredictor globs ``*.pdmodel``, the C++ engine takes the first
model file it finds) holds only listed files. ``verify_files`` resolves every path once and returns a
manifest whose ``path``/``file``/``labels_path`` give those resolved, verified paths, so the runtimes
open exactly the files that were checked, never a second lookup by name.
"""
from __future__ import annotations

import hashlib
import json
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
# Paddle Serving's model configs (rexnet_serving.export.serving_format writes them).
SERVER_CONF = "serving_server_conf.prototxt"
CLIENT_CONF = "serving_client_conf.prototxt"
# The directories of ``paths`` and the files a runtime opens in each, which must be listed in ``files``;
# any other file found in such a directory must be listed too (verify_files).
RUNTIME_FILES: Dict[str, Tuple[str, ...]] = {
    INFERENCE: (MODEL_FILE, PARAMS_FILE),
    SERVING_SERVER: (MODEL_FILE, PARAMS_FILE, SERVER_CONF),
    SERVING_CLIENT: (CLIENT_CONF,),
}


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


def _check_relative(name: Any, where: str, source: str) -> None:
    """ValueError naming ``where`` (the key) unless ``name`` is a normalised relative POSIX path inside
    the export (no '..', no '.', no backslash, not manifest.json)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{source}: {where} must be a non-empty path string, got {name!r}")
    parts = PurePosixPath(name).parts
    if (name.startswith("/") or ".." in parts or "\\" in name or "\0" in name or not parts
            or PurePosixPath(name).as_posix() != name or name == MANIFEST_FILE):
        raise ValueError(f"{source}: {where}: {name!r} is not a relative path inside the export "
                         "(absolute paths, '..', '.', backslashes and manifest.json are refused)")


def _check_listed(paths: Mapping[str, str], labels_file: str, files: Mapping[str, Any], source: str) -> None:
    """Every file a runtime opens through ``paths`` or ``labels_file`` is in ``files`` (so it is verified)."""
    if labels_file not in files:
        raise ValueError(f"{source}: labels_file {labels_file!r} is not listed in files (only listed, "
                         "verified files are loaded)")
    for key, value in paths.items():
        needed = [f"{value}/{name}" for name in RUNTIME_FILES[key]] if key in RUNTIME_FILES else [value]
        for name in needed:
            if name not in files:
                raise ValueError(f"{source}: paths.{key}: {name!r} is not listed in files (only listed, "
                                 "verified files are loaded)")


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
    # Set by verify_files: every name of files/paths/labels_file -> its resolved path (not stored).
    located: Optional[Mapping[str, Path]] = field(default=None, compare=False, repr=False)

    # -- where things are ------------------------------------------------------------------------
    @property
    def verified(self) -> bool:
        """True for the manifest verify_files returned: its paths are the resolved, checked ones."""
        return self.located is not None

    def _locate(self, name: str) -> Path:
        if self.model_dir is None:
            raise ValueError("this manifest was not loaded from a model directory")
        if self.located is not None:
            return self.located[name]
        return self.model_dir / name  # load_manifest's: for reading metadata, not for loading

    def path(self, key: str) -> Path:
        """Absolute path of ``paths[key]`` (``inference``, ``serving_server``, ``serving_client``,
        ``onnx``, ``lite_<target>``); resolved and verified when the manifest came from verify_files."""
        if key not in self.paths:
            raise KeyError(f"the export in {self.model_dir} has no {key!r} "
                           f"(it has {', '.join(sorted(self.paths))})")
        return self._locate(self.paths[key])

    def file(self, name: str) -> Path:
        """Absolute path of the listed file ``name`` (e.g. ``inference/inference.pdiparams``);
        IntegrityError if the manifest does not list it (so it was never verified)."""
        if name not in self.files:
            raise IntegrityError(f"{self.model_dir}: {name} is not listed in {MANIFEST_FILE}'s files, "
                                 "so it is not verified and not loaded: re-export the model")
        return self._locate(name)

    def file_in(self, key: str, name: str) -> Path:
        """The listed file ``name`` inside the directory ``paths[key]``, e.g. (inference, MODEL_FILE)."""
        if key not in self.paths:
            raise KeyError(f"the export in {self.model_dir} has no {key!r} "
                           f"(it has {', '.join(sorted(self.paths))})")
        return self.file(f"{self.paths[key]}/{name}")

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
        return self._locate(self.labels_file)

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
        stored = tuple(f.name for f in fields(cls) if f.name not in ("model_dir", "located"))
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
            _check_relative(name, "files", source)
            files[name] = FileRecord.from_dict(record, f"files.{name}", source)
        for key, value in data["paths"].items():
            _check_relative(value, f"paths.{key}", source)
        _check_relative(data["labels_file"], "labels_file", source)
        _check_listed(data["paths"], data["labels_file"], files, source)
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
