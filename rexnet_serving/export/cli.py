"""``rexnet-export``: write a servable model directory from PaddleClas-style ReXNet weights.

Examples:
    rexnet-export --weights ReXNet_1_0_pretrained.pdparams          # -> models/ReXNet_1_0
    rexnet-export --arch ReXNet_1_3 --weights ckpt.pdparams --labels flowers.txt -o models/flowers
Exit codes: 0 written, 1 failed (one line on stderr), 2 usage error.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from tqdm import tqdm

from ..defaults import DEFAULT_ARCH, MODEL_DIR_ENV, WEIGHTS_ENV, default_model_dir
from ..models import MODELS, WeightsError
from ..manifest import LITE_TARGETS
from .builder import ExportError, export_model
from .lite_format import LiteError, parse_targets

STEPS = 4  # progress messages export_model emits without ONNX and Lite (one more with each)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rexnet-export",
        description="Export a ReXNet model to Paddle Inference + Paddle Serving (+ ONNX) with a "
                    "manifest.json describing feed/fetch tensors, preprocessing and labels.")
    parser.add_argument("--arch", default=DEFAULT_ARCH, choices=list(MODELS),
                        help="architecture (PaddleClas name; default %(default)s)")
    parser.add_argument("--weights", default=os.environ.get(WEIGHTS_ENV) or None,
                        help=".pdparams or rexnet-train checkpoint (default $%s; without it the "
                             "model is exported with random weights, loudly)" % WEIGHTS_ENV)
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="output model directory (default $%s, else models/<arch>)"
                             % MODEL_DIR_ENV)
    parser.add_argument("--class-num", type=int, default=None,
                        help="number of classes (default: from the weights' classifier; 1000 "
                             "without weights)")
    parser.add_argument("--labels", default=None,
                        help="'<id> <name>' per line, one per class (default: ImageNet's for "
                             "1000 classes)")
    parser.add_argument("--no-softmax", action="store_true",
                        help="serve logits instead of probabilities")
    parser.add_argument("--onnx", action="store_true",
                        help="also write onnx/model.onnx (needs rexnet-serving[onnx])")
    parser.add_argument("--lite", action="store_true",
                        help="also write lite/<target>/model.nb with Paddle Lite's opt (needs "
                             "rexnet-serving[lite]); the x86 model is checked against Paddle Inference")
    parser.add_argument("--lite-targets", default=",".join(LITE_TARGETS), metavar="T[,T]",
                        help="Paddle Lite targets, of %s (default: %%(default)s)" % ", ".join(LITE_TARGETS))
    parser.add_argument("--input-size", type=int, default=None,
                        help="square input size (default: the variant's, 224)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing export in the output directory")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    lite_targets = ()
    if args.lite:
        try:
            lite_targets = parse_targets(args.lite_targets)
        except LiteError as exc:
            parser.error(str(exc))
    out = args.out if args.out is not None else default_model_dir(args.arch)
    started = time.perf_counter()
    bar = tqdm(total=STEPS + int(args.onnx) + int(args.lite), desc="rexnet-export", unit="step", leave=False,
               disable=None, file=sys.stderr)  # disable=None: no bar when stderr is not a TTY

    def progress(message: str) -> None:
        bar.set_postfix_str(message)
        bar.update(1)

    try:
        manifest = export_model(args.arch, out, weights=args.weights, class_num=args.class_num,
                                labels=args.labels, softmax=not args.no_softmax, onnx=args.onnx,
                                input_size=args.input_size, overwrite=args.force,
                                progress=progress, lite_targets=lite_targets)
    except (ExportError, WeightsError, OSError, ValueError) as exc:
        bar.close()
        print(f"rexnet-export: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    bar.close()
    elapsed = time.perf_counter() - started
    weights = (f"weights sha256 {manifest.weights_sha256[:12]}..." if manifest.weights_sha256
               else "RANDOM weights (predictions are meaningless)")
    print(f"wrote {manifest.model_dir} in {elapsed:.1f}s: {manifest.arch}, "
          f"{manifest.class_num} classes, input {manifest.input_size}, {weights}")
    for key in sorted(manifest.paths):
        print(f"  {key:15s} {manifest.path(key)}")
    print(f"  {'labels':15s} {manifest.labels_path}")
    print(f"  feed {manifest.feed.name} {list(manifest.feed.shape)} -> fetch "
          f"{manifest.fetch.name} {list(manifest.fetch.shape)}")
    return 0


def _one_line(exc: BaseException) -> str:
    """The first line of an error, with a count of the lines it hides (e.g. weights mismatches)."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    more = f" (+{len(lines) - 1} more lines)" if len(lines) > 1 else ""
    return lines[0] + more


if __name__ == "__main__":
    sys.exit(main())
