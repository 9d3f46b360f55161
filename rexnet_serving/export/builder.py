"""``export_model``: weights + architecture name -> one self-describing model directory.

Layout (all paths recorded in ``manifest.json``):
    inference/       Paddle Inference program + weights (paddle.jit.save)
    serving_server/  Paddle Serving 0.9.0 server model: the same files + serving_server_conf*
    serving_client/  Paddle Serving 0.9.0 client config: serving_client_conf*
    onnx/model.onnx  optional, Paddle2ONNX
    lite/<target>/model.nb  optional, Paddle Lite (arm, x86)
    labels.txt       "<id> <name>" per class
    manifest.json    the contract (rexnet_serving.manifest), with the size and sha256 of every file above

The directory is built beside ``out_dir`` under a temporary name and renamed into place only when
complete and checked (Paddle Inference reproduces the eager model on a random batch), so a reader
never sees a half-written model.
"""
from __future__ import annotations

import datetime
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np
import paddle

from .. import __version__
from ..defaults import LABELS_FILE
from ..integrity import file_sha256, record_files, verify_files
from ..manifest import (INFERENCE, MANIFEST_FILE, ONNX, SERVING_CLIENT, SERVING_SERVER, Manifest, TensorSpec,
                        read_labels, write_labels)
from ..models import MODELS, VARIANTS, build_model, load_weights, read_state_dict
from ..models.rexnet import PENULTIMATE_CHANNELS
from ..models.weights import CLASSIFIER_PREFIX, WeightsError
from ..preprocess import config_for
from . import lite_format, onnx_format
from .inference_format import FEED_NAME, save_inference_model
from .serving_format import write_serving_model

LABELS_NAME = "labels.txt"
ONNX_PATH = f"{ONNX}/{onnx_format.ONNX_FILE}"
CLASSIFIER_WEIGHT = CLASSIFIER_PREFIX + "weight"
IMAGENET_CLASSES = 1000
PADDLE_TOLERANCE = 1e-4  # Paddle Inference vs eager on a random batch (measured < 1e-6)
MIN_INPUT_SIZE = 32  # ReXNet downsamples by 32

Progress = Callable[[str], None]


class ExportError(RuntimeError):
    """Bad export input (weights, labels, output directory) or an export that failed its check."""


def _arch_of(state: Dict[str, np.ndarray]) -> Optional[str]:
    """The variant whose classifier input width matches the state dict's (unique per width)."""
    weight = state.get(CLASSIFIER_WEIGHT)
    if weight is None or weight.ndim != 4:
        return None
    for name, variant in VARIANTS.items():
        if int(PENULTIMATE_CHANNELS * variant.width_mult) == weight.shape[1]:
            return name
    return None


def _loud_random_init_warning(arch: str) -> None:
    bar = "!" * 78
    print(f"{bar}\n!! WARNING: no weights given: exporting {arch} with RANDOM initialisation.\n"
          f"!! Its predictions are MEANINGLESS. Pass --weights (or set REXNET_WEIGHTS) to a\n"
          f"!! PaddleClas {arch}_pretrained.pdparams or a rexnet-train checkpoint.\n{bar}",
          file=sys.stderr, flush=True)


def _load_model(arch: str, weights: Optional[str], class_num: Optional[int]):
    """(eval model, class_num, weights sha256 or None)."""
    if weights is None:
        class_num = IMAGENET_CLASSES if class_num is None else class_num
        _loud_random_init_warning(arch)
        return build_model(arch, class_num=class_num), class_num, None
    path = Path(weights)
    state = read_state_dict(str(path))  # WeightsError for a missing or unreadable file
    if CLASSIFIER_WEIGHT not in state:
        raise ExportError(f"{path} has no classifier ({CLASSIFIER_WEIGHT}): not a ReXNet "
                          "state dict")
    found_arch = _arch_of(state)
    if found_arch is not None and found_arch != arch:
        raise ExportError(f"{path} holds {found_arch} weights, not {arch} (classifier input "
                          f"{state[CLASSIFIER_WEIGHT].shape[1]} channels): use --arch {found_arch}")
    file_classes = int(state[CLASSIFIER_WEIGHT].shape[0])
    if class_num is not None and class_num != file_classes:
        raise ExportError(f"{path} has a {file_classes}-class classifier, but class_num is "
                          f"{class_num}")
    model = build_model(arch, class_num=file_classes)
    try:
        load_weights(model, str(path), strict=True)
    except WeightsError as exc:
        raise ExportError(f"{path} does not fit {arch}: {exc}") from None
    return model, file_classes, file_sha256(path)


def _write_labels(target: Path, class_num: int, labels: Optional[str]) -> None:
    if labels is not None:
        try:
            names = read_labels(labels)
        except (OSError, ValueError) as exc:
            raise ExportError(str(exc)) from None
        if len(names) != class_num:
            raise ExportError(f"labels file {labels} has {len(names)} labels, but the model has "
                              f"{class_num} classes")
    elif class_num == IMAGENET_CLASSES:
        names = read_labels(LABELS_FILE)
    else:
        print(f"note: no labels file for {class_num} classes: writing placeholder names "
              f"class_0 .. class_{class_num - 1} to {LABELS_NAME} (pass --labels FILE)",
              file=sys.stderr)
        names = [f"class_{i}" for i in range(class_num)]
    write_labels(target, names)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not overwrite:
        raise ExportError(f"{out_dir} already exists: pass --force (overwrite=True) to replace it")
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file()):
        raise ExportError(f"{out_dir} exists and is not an exported model directory: "
                          "refusing to replace it")


def _move_into_place(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        trash.rmdir()
        out_dir.rename(trash)  # the two renames keep out_dir either old-complete or new-complete
        staging.rename(out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        staging.rename(out_dir)


def export_model(arch: str, out_dir: Union[str, Path], weights: Optional[str] = None,
                 class_num: Optional[int] = None, labels: Optional[str] = None,
                 softmax: bool = True, onnx: bool = False, input_size: Optional[int] = None,
                 overwrite: bool = False, progress: Optional[Progress] = None,
                 lite_targets: Sequence[str] = ()) -> Manifest:
    """Export ``arch`` (with ``weights``, else random initialisation) to ``out_dir``.

    ``class_num`` defaults to the weights' classifier size (1000 without weights); ``labels`` is a
    ``<id> <name>`` file with one line per class (ImageNet's by default for 1000 classes);
    ``softmax=False`` serves logits; ``onnx=True`` adds ``onnx/model.onnx``; ``input_size``
    defaults to the variant's; ``lite_targets`` (arm, x86) adds ``lite/<target>/model.nb``. An existing
    ``out_dir`` is replaced only with ``overwrite=True``.
    """
    say = progress or (lambda message: None)
    if arch not in MODELS:
        raise ExportError(f"unknown architecture {arch!r}; choose one of {', '.join(MODELS)}")
    if class_num is not None and class_num < 1:
        raise ExportError(f"class_num must be >= 1, got {class_num}")
    size = VARIANTS[arch].input_size if input_size is None else int(input_size)
    if size < MIN_INPUT_SIZE:
        raise ExportError(f"input_size must be >= {MIN_INPUT_SIZE}, got {size}")
    if labels is not None and not Path(labels).is_file():
        raise ExportError(f"labels file not found: {labels}")
    if lite_targets:
        try:
            lite_targets = lite_format.parse_targets(",".join(lite_targets))
        except lite_format.LiteError as exc:
            raise ExportError(str(exc)) from None
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)

    say("loading weights" if weights else "building a randomly initialised model")
    model, class_num, sha = _load_model(arch, weights, class_num)
    model.eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_labels(staging / LABELS_NAME, class_num, labels)
        say("saving the Paddle Inference model")
        feed_name, fetch_name = save_inference_model(model, staging / INFERENCE, size, softmax)
        if feed_name != FEED_NAME:
            raise ExportError(f"the saved program's input is {feed_name!r}, expected {FEED_NAME!r}")
        feed = TensorSpec(name=feed_name, alias=feed_name, shape=(-1, 3, size, size),
                          dtype="float32")
        fetch = TensorSpec(name=fetch_name, alias=fetch_name, shape=(-1, class_num),
                           dtype="float32")
        say("writing the Paddle Serving model")
        write_serving_model(staging / INFERENCE, staging / SERVING_SERVER, staging / SERVING_CLIENT,
                            feed, fetch)
        paths = {INFERENCE: INFERENCE, SERVING_SERVER: SERVING_SERVER,
                 SERVING_CLIENT: SERVING_CLIENT}
        if onnx:
            say("converting to ONNX")
            try:
                onnx_format.convert(staging / INFERENCE, staging / ONNX_PATH)
            except onnx_format.OnnxUnavailable as exc:
                raise ExportError(str(exc)) from None
            paths[ONNX] = ONNX_PATH
        versions = {"paddle": paddle.__version__, "rexnet_serving": __version__}
        if lite_targets:
            say("converting to Paddle Lite")
            try:
                paths.update(lite_format.convert(staging / INFERENCE, staging, lite_targets))
                versions["paddlelite"] = lite_format.paddlelite_version()
            except lite_format.LiteError as exc:
                raise ExportError(str(exc)) from None
        manifest = Manifest(
            arch=arch, class_num=class_num, input_size=size,
            preprocess=replace(config_for(arch), crop_size=size), feed=feed, fetch=fetch, softmax=softmax,
            labels_file=LABELS_NAME, weights_sha256=sha, random_init=sha is None,
            exported_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            versions=versions, paths=paths, files=record_files(staging))
        manifest.write(staging)
        say("checking the export against the eager model")
        _verify(staging, model, softmax, size)
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return verify_files(out_dir)


def _verify(staging: Path, model: paddle.nn.Layer, softmax: bool, size: int) -> None:
    """Paddle Inference (and ONNX Runtime, when exported) must reproduce the eager model."""
    from ..runtimes.paddle import InferenceModel
    batch = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype("float32")
    with paddle.no_grad():
        expected = model(paddle.to_tensor(batch))
        if softmax:
            expected = paddle.nn.functional.softmax(expected, axis=-1)
    expected = expected.numpy()
    exported = InferenceModel(staging, mkldnn=False)
    got = exported.run(batch)
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= PADDLE_TOLERANCE:
        raise ExportError(f"the exported program differs from the eager model by {diff:.3g} "
                          f"(> {PADDLE_TOLERANCE:g})")
    manifest = exported.manifest  # verified: the files below are the listed ones
    if manifest.onnx_file is not None:
        try:
            onnx_format.check_against(manifest.onnx_file, batch, got)
        except RuntimeError as exc:  # OnnxUnavailable, or outputs that differ
            raise ExportError(str(exc)) from None
    for target in lite_format.CHECKABLE_HERE:
        lite_file = manifest.lite_file(target)
        if lite_file is not None:
            try:
                lite_format.check_against(lite_file, batch, got)
            except lite_format.LiteError as exc:
                raise ExportError(str(exc)) from None
