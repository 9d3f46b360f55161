"""Per-model settings: an optional ``settings.yaml`` beside a model's versions in a model repository.

The service config's ``op.infer`` settings apply to every model; a repository serving ReXNet_1_0 and
ReXNet_3_0 may need a different runtime or batch size for each. As Triton's ``config.pbtxt`` beside the
version folders and MLServer's ``model-settings.json`` do, a model directory may hold

    DIR/ReXNet_3_0/settings.yaml     runtime: paddle
                                     max_batch_images: 16
    DIR/ReXNet_3_0/1/ ...            (the exports; the file stays outside them, so it is not part of any
                                     version's hashed files and applies to every version)

(for a model directory that is an export itself, the file sits in it). Every key is optional and
overrides the service config for that model only: ``runtime`` (paddle, openvino), ``precision`` (fp32,
fp16, bf16), ``max_batch_images`` (images per forward pass: the batch size the predictor is built for)
and ``thread_num`` (math threads per predictor). Checked on load like the service config: an unknown
key, a wrong type or an out-of-range value is an error naming the file and the key.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Optional, Union

import yaml

from .runtimes.base import PRECISIONS, RUNTIMES

SETTINGS_FILE = "settings.yaml"
PathLike = Union[str, Path]


class ModelSettingsError(ValueError):
    """A settings file that cannot be used; the message names the file and the key."""


_RULES = {  # key: (type, check, rule as said in the error)
    "runtime": (str, lambda v: v in RUNTIMES, " or ".join(RUNTIMES)),
    "precision": (str, lambda v: v in PRECISIONS, " or ".join(PRECISIONS)),
    "max_batch_images": (int, lambda v: 1 <= v <= 1024, "1..1024 images per forward pass"),
    "thread_num": (int, lambda v: 1 <= v <= 256, "1..256 threads"),
}


@dataclass(frozen=True)
class ModelSettings:
    """What one model overrides (None: the service config's value); ``source`` the file, if any."""

    runtime: Optional[str] = None
    precision: Optional[str] = None
    max_batch_images: Optional[int] = None
    thread_num: Optional[int] = None
    source: Optional[Path] = None

    def overrides(self) -> Dict[str, Any]:
        """The keys this model sets, in the file's key order of the schema."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "source" and getattr(self, f.name) is not None}

    def describe(self) -> str:
        """``runtime paddle, max_batch_images 4 from DIR/m/settings.yaml`` (empty without a file)."""
        if self.source is None:
            return ""
        set_here = ", ".join(f"{k} {v}" for k, v in self.overrides().items()) or "nothing set"
        return f"{set_here} from {self.source}"


def read_model_settings(model_dir: PathLike) -> ModelSettings:
    """The settings in ``model_dir/settings.yaml`` (all None when there is no such file)."""
    path = Path(model_dir) / SETTINGS_FILE
    if not path.is_file():
        return ModelSettings()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ModelSettingsError(f"{path}: cannot read it as YAML ({exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ModelSettingsError(f"{path}: the file must be a mapping of settings, got {type(data).__name__}")
    for key, value in data.items():
        if key not in _RULES:
            raise ModelSettingsError(f"{path}: unknown key {key!r} (known: {', '.join(_RULES)})")
        kind, check, rule = _RULES[key]
        if isinstance(value, bool) or not isinstance(value, kind) or not check(value):
            raise ModelSettingsError(f"{path}: {key} must be {rule}, got {value!r}")
    return ModelSettings(source=path, **data)
