"""Training configuration: YAML files with inheritance, ``-o Section.key=value`` overrides, and a schema.

The layout follows PaddleClas's ``ppcls/configs`` (sections such as ``Global``, ``Arch``, ``Optimizer``)
but every key is declared once below with its type, default and range, so a typo or an out-of-range value
is an error naming the file and the key instead of a silently ignored setting. A file may name another
with ``_base_: other.yaml`` (relative to itself); its sections are merged key by key over the base's, which
is how the five per-width files stay one line each.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from rexnet_serving.models import MODELS

BASE_KEY = "_base_"
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class ConfigError(ValueError):
    """A configuration file or override that is unreadable, unknown or out of range."""


@dataclass(frozen=True)
class Field:
    """One key: its type, default, and allowed values (inclusive range or a set of choices)."""

    type: type
    default: Any
    low: Optional[float] = None
    high: Optional[float] = None
    choices: Optional[Tuple[Any, ...]] = None
    nullable: bool = False
    pair: bool = False  # a [low, high] list of two numbers, each within low..high

    def describe(self) -> str:
        kind = f"[{self.type.__name__}, {self.type.__name__}]" if self.pair else self.type.__name__
        if self.choices:
            kind += " in {" + ", ".join(map(str, self.choices)) + "}"
        if self.low is not None or self.high is not None:
            kind += f" in [{'-inf' if self.low is None else self.low}, " \
                    f"{'inf' if self.high is None else self.high}]"
        return kind + (" or null" if self.nullable else "")


SCHEMA: Dict[str, Dict[str, Field]] = {
    "Global": {
        "output_dir": Field(str, "./output"),
        "epochs": Field(int, 410, low=1),  # cool-down included
        "seed": Field(int, 42, low=0, high=2**31 - 1),
        "device": Field(str, "auto", choices=("auto", "cpu", "gpu")),
        "use_amp": Field(bool, True),  # GPU only: a no-op on CPU
        "save_interval": Field(int, 1, low=1),  # epochs between numbered checkpoints
        "eval_interval": Field(int, 1, low=1),
        "log_interval": Field(int, 10, low=1),  # iterations between log lines
        "pretrained_model": Field(str, None, nullable=True),  # .pdparams to start from
        "drop_classifier": Field(bool, False),  # fine-tuning: skip the pretrained classifier
    },
    "Arch": {
        "name": Field(str, "ReXNet_1_0", choices=tuple(MODELS)),
        "class_num": Field(int, 1000, low=1),
        "dropout": Field(float, None, low=0.0, high=0.99, nullable=True),  # null: the variant's
        # Paddle's convention: running = m * running + (1 - m) * batch. 0.9 is Paddle's and PaddleClas's
        # default; short runs on small data need less history for usable eval-mode statistics.
        "bn_momentum": Field(float, 0.9, low=0.0, high=0.9999),
    },
    "Loss": {
        "label_smoothing": Field(float, 0.1, low=0.0, high=0.99),
    },
    "Optimizer": {
        "momentum": Field(float, 0.9, low=0.0, high=0.999),
        "use_nesterov": Field(bool, True),
        "weight_decay": Field(float, 1e-5, low=0.0, high=1.0),
        "one_dim_param_no_weight_decay": Field(bool, True),  # BN weights/biases and biases: no decay
        "lr": Field(float, 0.5, low=1e-8, high=100.0),  # for a global batch of lr_batch_size
        "lr_batch_size": Field(int, 512, low=1),  # the LR scales linearly with the real global batch
        "warmup_epochs": Field(int, 5, low=0),
        "warmup_lr": Field(float, 1e-4, low=0.0),  # the warm-up starts here
        "min_lr": Field(float, 1e-5, low=0.0),  # the cosine ends here; the cool-down stays here
        "cooldown_epochs": Field(int, 10, low=0),  # the last epochs of Global.epochs, at min_lr
    },
    "Data": {
        "train_root": Field(str, None, nullable=True),
        "train_list": Field(str, None, nullable=True),  # null: class-per-folder tree under train_root
        "val_root": Field(str, None, nullable=True),
        "val_list": Field(str, None, nullable=True),
        "class_names": Field(str, None, nullable=True),  # "id name" per line; null: folder names
        "batch_size": Field(int, 128, low=1),  # per rank
        "eval_batch_size": Field(int, 128, low=1),
        "num_workers": Field(int, 4, low=0),
    },
    "Augment": {
        "crop_size": Field(int, 224, low=8),
        "crop_scale": Field(float, [0.08, 1.0], low=0.0, high=1.0, pair=True),
        "crop_ratio": Field(float, [0.75, 4.0 / 3.0], low=0.01, high=100.0, pair=True),
        "hflip_prob": Field(float, 0.5, low=0.0, high=1.0),
        # crop resize and RandAugment's geometric ops; random: bilinear or bicubic each time
        "interpolation": Field(str, "random", choices=("random", "bilinear", "bicubic")),
        "randaugment_ops": Field(int, 2, low=0, high=15),
        "randaugment_magnitude": Field(float, 9.0, low=0.0, high=10.0),
        "randaugment_magnitude_std": Field(float, 0.5, low=0.0, high=10.0),
        "random_erasing_prob": Field(float, 0.2, low=0.0, high=1.0),
    },
    "Eval": {
        "resize_short": Field(int, None, low=8, nullable=True),  # null: the variant table's
        "crop_size": Field(int, None, low=8, nullable=True),
    },
}


def defaults() -> Dict[str, Dict[str, Any]]:
    return {s: {k: copy.deepcopy(f.default) for k, f in keys.items()} for s, keys in SCHEMA.items()}


def _check_value(field: Field, value: Any, where: str) -> Any:
    """Return ``value`` converted to the field's type, or raise naming ``where`` (file: Section.key)."""
    if value is None:
        if field.nullable:
            return None
        raise ConfigError(f"{where}: must not be null (expected {field.describe()})")
    if field.pair:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ConfigError(f"{where}: expected a list of two numbers, got {value!r}")
        items = [_check_scalar(field, v, where) for v in value]
        if items[0] > items[1]:
            raise ConfigError(f"{where}: expected [low, high] with low <= high, got {value!r}")
        return items
    return _check_scalar(field, value, where)


def _check_scalar(field: Field, value: Any, where: str) -> Any:
    # bool is an int subclass in Python: do not let `true` pass as 1 or `1` as true.
    if field.type is bool:
        ok = isinstance(value, bool)
    elif field.type is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif field.type is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, field.type)
    if not ok:
        raise ConfigError(f"{where}: expected {field.describe()}, got {value!r}")
    value = field.type(value)
    if field.choices is not None and value not in field.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, field.choices))}")
    if (field.low is not None and value < field.low) or (field.high is not None and value > field.high):
        raise ConfigError(f"{where}: {value!r} is out of range (expected {field.describe()})")
    return value


def _read_yaml(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _load_layers(path: str, seen: Sequence[str] = ()) -> List[Tuple[str, Dict[str, Any]]]:
    """The chain of files from the root base to ``path``, each with its own (unmerged) content."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: {BASE_KEY} cycle through {' -> '.join(seen)}")
    data = _read_yaml(path)
    base = data.pop(BASE_KEY, None)
    layers: List[Tuple[str, Dict[str, Any]]] = []
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: {BASE_KEY} must be a file name, got {base!r}")
        layers = _load_layers(os.path.join(os.path.dirname(path), base), [*seen, path])
    return layers + [(path, data)]


def _merge(config: Dict[str, Dict[str, Any]], data: Dict[str, Any], source: str) -> None:
    for section, values in data.items():
        if section not in SCHEMA:
            raise ConfigError(f"{source}: unknown section {section!r} "
                              f"(known: {', '.join(SCHEMA)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section} must be a mapping")
        for key, value in values.items():
            if key not in SCHEMA[section]:
                raise ConfigError(f"{source}: unknown key {section}.{key} "
                                  f"(known in {section}: {', '.join(SCHEMA[section])})")
            config[section][key] = _check_value(SCHEMA[section][key], value,
                                                f"{source}: {section}.{key}")


def parse_override(text: str) -> Tuple[str, str, Any]:
    """``"Optimizer.lr=0.1"`` -> ("Optimizer", "lr", 0.1); the value is parsed as a YAML scalar/list."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected Section.key=value")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected Section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return parts[0], parts[1], value


def load_config(path: str, overrides: Sequence[str] = ()) -> Dict[str, Dict[str, Any]]:
    """Read ``path`` (following ``_base_``), apply ``-o`` overrides, validate, fill in defaults."""
    config = defaults()
    for source, data in _load_layers(path):
        _merge(config, data, source)
    for text in overrides:
        section, key, value = parse_override(text)
        _merge(config, {section: {key: value}}, f"override -o {text}")
    _check_schedule(config, path if not overrides else f"{path} with the -o overrides")
    return config


def _check_schedule(config: Dict[str, Dict[str, Any]], source: str) -> None:
    """Relations between keys: warm-up and cool-down must fit into the run."""
    epochs = config["Global"]["epochs"]
    optim = config["Optimizer"]
    if optim["cooldown_epochs"] >= epochs:
        raise ConfigError(f"{source}: Optimizer.cooldown_epochs={optim['cooldown_epochs']} leaves no "
                          f"epoch for the cosine in Global.epochs={epochs}")
    if optim["warmup_epochs"] > epochs - optim["cooldown_epochs"]:
        raise ConfigError(f"{source}: Optimizer.warmup_epochs={optim['warmup_epochs']} is longer than "
                          f"the cosine (Global.epochs={epochs} - "
                          f"Optimizer.cooldown_epochs={optim['cooldown_epochs']})")


def config_path(name_or_path: str) -> str:
    """A path as given, or the name of a bundled config (``ReXNet_1_0``, ``finetune``)."""
    if os.path.exists(name_or_path) or os.sep in name_or_path or name_or_path.endswith(".yaml"):
        return name_or_path
    return os.path.join(CONFIG_DIR, name_or_path + ".yaml")
