"""``rexnet-convert``: ClovaAI's official PyTorch ReXNet checkpoints to PaddleClas-layout ``.pdparams``.

The official implementation (github.com/clovaai/rexnet, ``rexnetv1.py``; paper arXiv:2007.00992) and
PaddleClas's ``rexnet.py`` number their modules identically, and both end in a 1x1-conv classifier, so
conversion renames BatchNorm statistics (``running_mean``/``running_var`` -> ``_mean``/``_variance``),
drops ``num_batches_tracked`` and transposes nothing. The width is read off the stem conv, the class
count off the classifier, and the result is checked strictly against the built model before writing.
Reading needs no torch: see ``rexnet_serving.torch_checkpoint``.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from rexnet_serving.models import MODELS, VARIANTS, build_model
from rexnet_serving.models.rexnet import STEM_CHANNELS, scaled_channels
from rexnet_serving.models.weights import CLASSIFIER_PREFIX, check_state_dict, save_atomically
from rexnet_serving.torch_checkpoint import CheckpointError, read_torch_checkpoint

STEM_KEY = "features.0.weight"
CLASSIFIER_WEIGHT = CLASSIFIER_PREFIX + "weight"
# torch BatchNorm buffer suffix -> Paddle BatchNorm2D state name; None drops the entry.
BN_RENAMES: Dict[str, Optional[str]] = {
    "running_mean": "_mean",
    "running_var": "_variance",
    "num_batches_tracked": None,
}


@dataclass(frozen=True)
class ConversionResult:
    arch: str
    class_num: int
    num_keys: int
    output: str


def stem_widths() -> Dict[int, str]:
    """Stem conv out-channels -> architecture, from the variant table (unique across the family)."""
    return {scaled_channels(STEM_CHANNELS, v.width_mult): name for name, v in VARIANTS.items()}


def infer_arch(state: Mapping[str, np.ndarray], path: str) -> str:
    if STEM_KEY not in state or np.ndim(state[STEM_KEY]) != 4:
        shown = ", ".join(list(state)[:5])
        raise CheckpointError(f"{path}: not a ReXNet checkpoint: no 4-D {STEM_KEY} (keys start "
                              f"with {shown})")
    channels = int(state[STEM_KEY].shape[0])
    widths = stem_widths()
    if channels not in widths:
        known = ", ".join(f"{c} ({name})" for c, name in sorted(widths.items()))
        raise CheckpointError(f"{path}: the stem conv has {channels} output channels, which is no "
                              f"ReXNet width (known: {known})")
    return widths[channels]


def rename_state_dict(state: Mapping[str, np.ndarray], path: str) -> Dict[str, np.ndarray]:
    """Official names to PaddleClas names, as float32 arrays."""
    converted: Dict[str, np.ndarray] = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if leaf in BN_RENAMES:
            if BN_RENAMES[leaf] is None:
                continue
            key = f"{module}.{BN_RENAMES[leaf]}"
        if not np.issubdtype(value.dtype, np.floating):
            raise CheckpointError(f"{path}: {key} is a {value.dtype} tensor; ReXNet weights are "
                                  f"floating point")
        converted[key] = np.ascontiguousarray(value, dtype=np.float32)
    return converted


def convert_state_dict(state: Mapping[str, np.ndarray], path: str,
                       arch: Optional[str] = None) -> Tuple[str, int, Dict[str, np.ndarray]]:
    """Rename, infer width and class count, and check strictly against the built model."""
    inferred = infer_arch(state, path)
    if arch is not None and arch != inferred:
        raise CheckpointError(f"{path}: the checkpoint is {inferred} (stem conv "
                              f"{state[STEM_KEY].shape[0]} channels), not the requested {arch}")
    converted = rename_state_dict(state, path)
    if CLASSIFIER_WEIGHT not in converted:
        raise CheckpointError(f"{path}: no classifier weight {CLASSIFIER_WEIGHT}")
    class_num = int(converted[CLASSIFIER_WEIGHT].shape[0])
    import paddle
    with paddle.LazyGuard():  # shapes only: skip initialising millions of weights
        model = build_model(inferred, class_num=class_num)
    problems = check_state_dict(model, converted)
    if problems:
        shown = "; ".join(problems[:5])
        more = f"; ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CheckpointError(f"{path}: does not fit {inferred} with {class_num} classes "
                              f"({len(problems)} problems): {shown}{more}")
    return inferred, class_num, converted


def default_output(src: str) -> str:
    root, _ = os.path.splitext(src)
    return root + ".pdparams"


def convert_checkpoint(src: str, dst: Optional[str] = None,
                       arch: Optional[str] = None) -> ConversionResult:
    """Convert an official ``rexnetv1_*.pth`` to PaddleClas ``.pdparams`` (default: beside ``src``)."""
    src = os.fspath(src)
    if arch is not None and arch not in MODELS:
        raise CheckpointError(f"{src}: unknown architecture {arch!r}; choose one of "
                              f"{', '.join(MODELS)}")
    dst = os.fspath(dst) if dst is not None else default_output(src)
    if os.path.abspath(dst) == os.path.abspath(src):
        raise CheckpointError(f"{src}: the output path is the input file; choose another with -o")
    state = read_torch_checkpoint(src)
    arch, class_num, converted = convert_state_dict(state, src, arch)
    try:
        save_atomically(converted, dst)
    except OSError as exc:
        raise CheckpointError(f"{dst}: cannot write the converted weights ({exc.strerror or exc})") \
            from None
    return ConversionResult(arch=arch, class_num=class_num, num_keys=len(converted), output=dst)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rexnet-convert",
        description="Convert an official ClovaAI ReXNet PyTorch checkpoint (rexnetv1_1.0.pth ... "
                    "rexnetv1_3.0.pth) to PaddleClas-layout .pdparams. torch is not needed.",
        epilog="PaddleClas names its released weights <arch>_pretrained.pdparams (e.g. "
               "ReXNet_1_0_pretrained.pdparams); pass -o with that name to use them where PaddleClas "
               "configs expect it.")
    parser.add_argument("src", metavar="SRC.pth", help="PyTorch checkpoint (zip or legacy format)")
    parser.add_argument("-o", "--output", metavar="OUT.pdparams",
                        help="output file (default: SRC with a .pdparams suffix)")
    parser.add_argument("--arch", choices=list(MODELS),
                        help="expected architecture; inferred from the stem width when omitted, "
                             "and an error if the checkpoint is another width")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = convert_checkpoint(args.src, args.output, args.arch)
    except CheckpointError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message held
        print(f"rexnet-convert: error: {message}", file=sys.stderr)
        return 1
    print(f"architecture: {result.arch}")
    print(f"classes:      {result.class_num}")
    print(f"keys:         {result.num_keys}")
    print(f"written:      {result.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
