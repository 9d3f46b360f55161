"""The exported model's contract: ``manifest.json`` beside ``inference/`` and ``serving_server/``.

PaddleClas writes the pre/postprocessing contract next to an exported model; Triton's model repository
declares inputs, outputs and dtypes once. This is the same idea for one ReXNet export: the
architecture, the feed/fetch tensors, the preprocessing constants and the label file are written here
by ``rexnet-export`` and everything downstream (ops, clients, checks) reads them from here.

Loading is strict: an unknown or missing key is an error naming the file and the key.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .preprocess import PreprocessConfig

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
PathLike = Union[str, Path]

# Keys of ``paths``: the directories/files of an export, relative to the model directory.
INFERENCE = "inference"
SERVING_SERVER = "serving_server"
SERVING_CLIENT = "serving_client"
ONNX = "onnx"
PATH_KEYS = (INFERENCE, SERVING_SERVER, SERVING_CLIENT, ONNX)
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
        }

    def write(self, model_dir: PathLike) -> Path:
        target = Path(model_dir) / MANIFEST_FILE
        target.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return target

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST_FILE,
                  model_dir: Optional[PathLike] = None) -> "Manifest":
        """Validate and build; ``source`` names the file in error messages."""
        stored = tuple(f.name for f in fields(cls) if f.name != "model_dir")
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
        _check_keys(data["paths"], REQUIRED_PATH_KEYS, (ONNX,), "paths", source)
        _check_keys(data["versions"], ("paddle", "rexnet_serving"), (), "versions", source)
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
            format_version=data["format_version"],
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
    return Manifest.from_dict(data, source=str(path), model_dir=directory)


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
