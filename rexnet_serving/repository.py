"""A model repository: several exports served side by side, found by scanning one directory.

The layout is Triton's and KServe's (https://github.com/triton-inference-server/server/blob/main/docs/
user_guide/model_repository.md), with a rexnet-export directory where Triton has a model's files:

    DIR/
      ReXNet_1_0/            a model named after its directory: either an export itself (version 1) ...
        manifest.json ...
      ReXNet_3_0/            ... or numbered versions, each an export; the highest is served unless
        1/  manifest.json    the config lists versions
        2/  manifest.json

``DIR`` that is itself an export is one model named after it (``--model-dir`` and a plain
``--model-repository models/ReXNet_1_0`` mean the same). Hidden entries (``.name``: rexnet-export's
staging directories, Kubernetes' ``..data`` links) and ``lost+found`` are skipped; anything else that
is neither an export nor a directory of versions is an error naming it, so a typo never silently
serves one model less. A model directory may hold a ``settings.yaml`` (rexnet_serving.model_settings:
runtime, precision, batch size, threads for that model), read and checked here. Scanning reads each manifest (a malformed one is reported here); the files
are verified by the loaders (rexnet_serving.integrity.verify_files).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .manifest import MANIFEST_FILE, Manifest, load_manifest
from .model_settings import ModelSettings, ModelSettingsError, read_model_settings

PathLike = Union[str, Path]
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # usable in a v2 URL path as is
SKIPPED = ("lost+found",)
UNVERSIONED = 1  # the version of a model directory that is an export itself


class RepositoryError(ValueError):
    """The repository (or the versions asked of it) cannot be served; the message names the path."""


@dataclass(frozen=True)
class ModelVersion:
    version: int
    path: Path
    manifest: Manifest


@dataclass(frozen=True)
class RepositoryModel:
    """One model: every version found, and the ones to serve (highest first); ``settings`` from its
    optional settings.yaml (rexnet_serving.model_settings)."""

    name: str
    versions: Dict[int, ModelVersion]
    served: Tuple[int, ...]
    settings: ModelSettings = ModelSettings()

    @property
    def latest(self) -> ModelVersion:
        return self.versions[self.served[0]]

    def served_versions(self) -> List[ModelVersion]:
        return [self.versions[v] for v in self.served]


@dataclass(frozen=True)
class Repository:
    root: Path
    models: Dict[str, RepositoryModel]
    default_model: str

    def model(self, name: Optional[str] = None) -> RepositoryModel:
        """The named model (the default one for None); KeyError with the names served otherwise."""
        key = self.default_model if name is None else name
        if key not in self.models:
            raise KeyError(f"unknown model {key!r}: this repository serves {', '.join(sorted(self.models))}")
        return self.models[key]


def _is_export(path: Path) -> bool:
    return (path / MANIFEST_FILE).is_file()


def _skipped(path: Path) -> bool:
    return path.name.startswith(".") or path.name in SKIPPED


def _manifest(path: Path) -> Manifest:
    try:
        return load_manifest(path)
    except (OSError, ValueError) as exc:
        raise RepositoryError(str(exc)) from None


def _check_name(name: str, path: Path) -> None:
    if not NAME_PATTERN.match(name):
        raise RepositoryError(f"{path}: {name!r} is not a usable model name (letters, digits, '_', '.', '-'; "
                              "it appears in the v2 URLs)")


def _versions_of(path: Path) -> Dict[int, ModelVersion]:
    if _is_export(path):
        numbered = [p.name for p in path.iterdir() if p.is_dir() and p.name.isdigit()]
        if numbered:
            raise RepositoryError(f"{path} is an export and also has version directories "
                                  f"({', '.join(sorted(numbered))}): keep one layout")
        return {UNVERSIONED: ModelVersion(UNVERSIONED, path, _manifest(path))}
    versions: Dict[int, ModelVersion] = {}
    for child in sorted(path.iterdir()):
        if _skipped(child) or not child.is_dir():
            continue
        if not child.name.isdigit() or child.name.startswith("0"):
            raise RepositoryError(f"{child}: inside the model directory {path}, expected version "
                                  "directories named 1, 2, 3, ... (or an export directly in it)")
        if not _is_export(child):
            raise RepositoryError(f"{child}: version {child.name} of {path.name} has no {MANIFEST_FILE} "
                                  "(not an export; create it with rexnet-export)")
        versions[int(child.name)] = ModelVersion(int(child.name), child, _manifest(child))
    if not versions:
        raise RepositoryError(f"{path}: neither an export ({MANIFEST_FILE}) nor a directory of numbered "
                              "versions")
    return versions


def _served(name: str, found: Mapping[int, ModelVersion], wanted: Optional[Sequence[int]]) -> Tuple[int, ...]:
    if not wanted:
        return (max(found),)
    missing = [v for v in wanted if v not in found]
    if missing:
        raise RepositoryError(f"model {name}: version(s) {', '.join(map(str, missing))} configured but not "
                              f"found (it has {', '.join(map(str, sorted(found)))})")
    return tuple(sorted(set(int(v) for v in wanted), reverse=True))


def scan_repository(root: PathLike, versions: Optional[Mapping[str, Sequence[int]]] = None,
                    default_model: Optional[str] = None, export_name: Optional[str] = None) -> Repository:
    """Find the models under ``root``.

    ``versions`` maps a model name to the versions to serve (default: its highest); ``default_model``
    is the one requests get when they name none (default: the only model, else the first by name);
    ``export_name`` names the model when ``root`` is itself an export (default: its directory's name;
    under KServe that is ``models``, from /mnt/models, so pass the InferenceService's name).
    """
    root = Path(root)
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} does not exist or is not a directory")
    directories: Dict[str, Path] = {}
    if _is_export(root):
        name = export_name or Path(os.path.abspath(root)).name  # the directory's own name, not a link target's
        _check_name(name, root)
        found = {name: _versions_of(root)}
        directories[name] = root
    else:
        found = {}
        for child in sorted(root.iterdir()):
            if _skipped(child):
                continue
            if not child.is_dir():
                continue  # a README or an archive beside the models
            _check_name(child.name, child)
            found[child.name] = _versions_of(child)
            directories[child.name] = child
    if not found:
        raise RepositoryError(f"model repository {root} holds no models: expected exports "
                              f"({root}/<name>/{MANIFEST_FILE}) or numbered versions "
                              f"({root}/<name>/1/{MANIFEST_FILE})")
    wanted = dict(versions or {})
    unknown = sorted(set(wanted) - set(found))
    if unknown:
        raise RepositoryError(f"versions configured for unknown model(s) {', '.join(unknown)} "
                              f"(the repository {root} has {', '.join(sorted(found))})")
    try:
        settings = {name: read_model_settings(directory) for name, directory in directories.items()}
    except ModelSettingsError as exc:
        raise RepositoryError(str(exc)) from None
    models = {name: RepositoryModel(name, vers, _served(name, vers, wanted.get(name)), settings[name])
              for name, vers in found.items()}
    default = default_model if default_model is not None else sorted(models)[0]
    if default not in models:
        raise RepositoryError(f"default model {default!r} is not in the repository {root} "
                              f"(it has {', '.join(sorted(models))})")
    return Repository(root=root.resolve(), models=models, default_model=default)
