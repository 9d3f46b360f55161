"""rexnet-eval: top-1, top-5 and mean loss of ReXNet weights or of an exported model on a labelled set
(PaddleClas's ``tools/eval.py``).

The model: a ``.pdparams`` file or a rexnet-train checkpoint (``*.pdckpt``) run eagerly, or an export
directory run by Paddle Inference through ``Classifier`` (as the service runs it). The data: a PaddleClas
list file (``relative/path.jpg label`` lines, under ``--root``) or a class-per-folder tree (class ids from
``--labels``, else the sorted folder names, as rexnet-train numbers them).

The numbers are the training loop's own: decoding with the service's decoder, batches through
``rexnet_serving.preprocess`` with the checkpoint's Eval settings (or the export's manifest), and
``rexnet_train.metrics.EvalTotals``; so for a rexnet-train checkpoint it prints that run's validation
metric. Files are decoded by a small thread pool ahead of the model (``rexnet_serving.runs.prefetch``);
a file the decoder refuses is counted as refused with its error code, not scored.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import rexnet_serving.imageio as imageio  # before paddle: see that module
from tqdm import tqdm

from rexnet_serving.defaults import DEFAULT_ARCH
from rexnet_serving.runs.cli import (DEFAULT_PRECISION, DEFAULT_RUNTIME, add_model_arguments, bounded,
                                     decode_limits, model_options)
from rexnet_serving.runs.inputs import UsageError
from rexnet_serving.runs.prefetch import prefetched_batches
from rexnet_serving.runs.summary import EXIT_FAILED, EXIT_OK, EXIT_USAGE

from rexnet_train import checkpoint as ckpt
from rexnet_train.data import DataError, Sample, check_labels, load_class_names, read_list_file, \
    scan_folder_tree
from rexnet_train.metrics import TOP_K, EvalTotals, eval_metrics

TOOL = "rexnet-eval"
UNREADABLE = "unreadable"
PROGRESS_FROM = 64


@dataclasses.dataclass
class Evaluated:
    """A model ready to score batches of decoded images."""
    description: str
    class_num: int
    preprocess_note: str
    scores: Callable[[List[Any]], Any]  # decoded RGB images -> paddle.Tensor [N, class_num]
    probabilities: bool                 # scores are probabilities (else logits)


def _weights_model(path: Path, arch: Optional[str], resize_short: Optional[int],
                   crop_size: Optional[int]) -> Evaluated:
    """Eager ReXNet from a .pdparams or a rexnet-train checkpoint, with the training loop's eval
    preprocessing (the checkpoint's Eval section, else the variant's, then the flags)."""
    import paddle
    from rexnet_serving.models import WeightsError, build_model, load_weights, read_state_dict
    from rexnet_serving.models.weights import CLASSIFIER_PREFIX
    from rexnet_serving.preprocess import config_for, preprocess
    from rexnet_train.engine import eval_preprocess_config
    try:
        state = read_state_dict(str(path))
        # A checkpoint also holds the run's config: its architecture and Eval preprocessing.
        config = ckpt.load_checkpoint(str(path)).get("config") if path.suffix == ".pdckpt" else None
    except (WeightsError, ckpt.CheckpointError) as e:
        raise UsageError(str(e)) from None
    saved_arch = config["Arch"]["name"] if config else None
    if arch and saved_arch and arch != saved_arch:
        raise UsageError(f"{path} was trained as {saved_arch}, not --arch {arch}")
    arch = saved_arch or arch or DEFAULT_ARCH
    classifier = state.get(CLASSIFIER_PREFIX + "weight")
    if classifier is None:
        raise UsageError(f"{path} has no classifier ({CLASSIFIER_PREFIX}weight): not ReXNet weights")
    class_num = int(classifier.shape[0])
    model = build_model(arch, class_num=class_num)
    try:
        load_weights(model, str(path), strict=True)
    except WeightsError as e:
        raise UsageError(f"{path} does not fit {arch}: {e}") from None
    model.eval()
    cfg = eval_preprocess_config(config) if config else config_for(arch)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("resize_short", resize_short),
                                                        ("crop_size", crop_size)) if v is not None})

    def scores(images: List[Any]) -> Any:
        with paddle.no_grad():
            return model(preprocess(images, cfg))

    return Evaluated(f"{path} ({arch}, {class_num} classes, eager)", class_num,
                     f"resize {cfg.resize_short}, crop {cfg.crop_size}", scores, probabilities=False)


def _export_model(model_dir: Path, options: Dict[str, Any], limits: Any) -> Evaluated:
    """An export through Classifier: the service's preprocessing and Paddle Inference."""
    import paddle
    from rexnet_serving.classifier import Classifier
    try:
        classifier = Classifier(model_dir, limits=limits, **options)
    except (OSError, ValueError, RuntimeError, ImportError) as e:  # ImportError: a runtime not installed
        raise UsageError(f"cannot load the model from {model_dir}: {e}") from None
    softmax = classifier.manifest.softmax

    def scores(images: List[Any]) -> Any:
        # Raw outputs: logits stay logits (an exact loss), probabilities stay probabilities.
        return paddle.to_tensor(classifier.model.run(classifier.preprocess(images)))

    cfg = classifier.preprocess_config
    return Evaluated(f"{model_dir} ({classifier.manifest.arch}, {classifier.class_num} classes, "
                     "export)", classifier.class_num, f"resize {cfg.resize_short}, crop {cfg.crop_size}",
                     scores, probabilities=softmax)


def load_samples(data: Path, root: Optional[Path], labels: Optional[Path], limit: Optional[int]
                 ) -> List[Sample]:
    """A list file (under ``root``, default its folder) or a class-per-folder tree; ``limit`` keeps
    that many samples spread evenly over the set, so a quick look at a sorted tree sees every class."""
    try:
        if data.is_dir():
            samples, folders = scan_folder_tree(str(data))
            if labels is not None:
                ids = {name: i for i, name in enumerate(load_class_names(str(labels)))}
                unknown = sorted(set(folders) - set(ids))
                if unknown:
                    raise DataError(f"{data}: folders not in {labels}: {', '.join(unknown[:5])}")
                samples = [Sample(s.path, ids[folders[s.label]]) for s in samples]
        elif data.is_file():
            samples = read_list_file(str(data), str(root if root is not None else data.parent))
        else:
            raise DataError(f"{data}: no such list file or folder")
    except DataError as e:
        raise UsageError(str(e)) from None
    if limit is not None and limit < len(samples):
        samples = [samples[i * len(samples) // limit] for i in range(limit)]
    return samples


def _read(sample: Sample, limits: Any) -> Tuple[Optional[Any], Optional[str]]:
    """(decoded image, None) or (None, error code)."""
    try:
        with open(sample.path, "rb") as f:
            data = f.read()
    except OSError:
        return None, UNREADABLE
    try:
        return imageio.decode_image(data, limits), None
    except imageio.ImageError as e:
        return None, e.code


def evaluate(model: Evaluated, samples: Sequence[Sample], batch_size: int = 32, limits: Any = None,
             decode_workers: int = 2, progress: bool = True) -> Dict[str, Any]:
    """Score ``samples``; the result has loss, top1, top<k>, samples (scored), refused, refused_by_code,
    images, k, seconds."""
    import paddle
    limits = limits or imageio.DecodeLimits()
    k = min(TOP_K, model.class_num)
    totals, refused = EvalTotals(), Counter()
    started = time.monotonic()
    bar = tqdm(total=len(samples), unit="img", desc=TOOL, file=sys.stderr,
               disable=None if progress and len(samples) >= PROGRESS_FROM else True)
    try:
        for batch in prefetched_batches(samples, batch_size, lambda s: _read(s, limits),
                                        workers=decode_workers):
            good = [(sample, image) for sample, (image, _) in batch if image is not None]
            refused.update(code for _, (_, code) in batch if code is not None)
            if good:
                labels = paddle.to_tensor([sample.label for sample, _ in good], dtype="int64")
                totals.add(model.scores([image for _, image in good]), labels, k, model.probabilities)
            bar.update(len(batch))
    finally:
        bar.close()
    return {**eval_metrics(totals.sums(), k, prefix=""), "k": k, "images": len(samples),
            "refused": sum(refused.values()), "refused_by_code": dict(sorted(refused.items())),
            "seconds": round(time.monotonic() - started, 3)}


def format_table(result: Dict[str, Any], model: Evaluated, data: Path) -> str:
    k = result["k"]
    refused = result["refused"]
    codes = ", ".join(f"{c}={n}" for c, n in result["refused_by_code"].items())
    rows = [f"{TOOL}: {model.description} on {data}",
            f"  preprocessing  {model.preprocess_note}",
            f"  images         {result['images']} ({result['samples']} scored, {refused} refused"
            + (f": {codes}" if codes else "") + ")",
            f"  top-1          {result['top1']:.4f}",
            f"  top-{k:<10d} {result[f'top{k}']:.4f}",
            f"  loss           {result['loss']:.4f} (mean cross-entropy, from "
            + ("probabilities" if model.probabilities else "logits") + ")",
            f"  wall           {result['seconds']:.1f} s"]
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=TOOL,
        description="Top-1, top-5 and mean loss of ReXNet weights (.pdparams, rexnet-train .pdckpt) or of "
                    "an exported model directory on a labelled image set.",
        epilog="Exit codes: 0 every image scored, 1 some images refused by the decoder (the metrics "
               "cover the others), 2 usage, model or data error.")
    parser.add_argument("model", type=Path,
                        help="a .pdparams file, a rexnet-train checkpoint (.pdckpt: its architecture and "
                             "Eval preprocessing are used), or an exported model directory")
    parser.add_argument("data", type=Path,
                        help="a PaddleClas list file ('relative/path.jpg label' per line) or a "
                             "class-per-folder tree (DATA/<class>/<image>)")
    parser.add_argument("--root", type=Path,
                        help="the folder list-file paths are relative to (default: the list file's)")
    parser.add_argument("--labels", type=Path,
                        help="label list ('id name' per line) giving a class-per-folder tree's folder "
                             "names their ids (default: sorted folder names are ids 0, 1, ...)")
    parser.add_argument("--arch", help=f"architecture of a .pdparams file (default {DEFAULT_ARCH}; a "
                                       "checkpoint knows its own)")
    parser.add_argument("--resize-short", type=bounded(int, 1),
                        help="weights only: resize the short side to this (default: the checkpoint's "
                             "Eval setting, else the variant's)")
    parser.add_argument("--crop-size", type=bounded(int, 32), help="weights only: centre crop size")
    parser.add_argument("--batch-size", type=bounded(int, 1), default=32,
                        help="images per forward pass (default: %(default)s)")
    parser.add_argument("--limit", type=bounded(int, 1),
                        help="evaluate only N images, spread evenly over the set (a quick look)")
    parser.add_argument("--decode-workers", type=bounded(int, 1), default=2,
                        help="threads decoding ahead of the model (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser)
    return parser


def load_model(args: argparse.Namespace) -> Evaluated:
    import paddle
    paddle.set_device("cpu" if args.device == "cpu" else f"gpu:{args.gpu_id}")
    if args.model.is_dir():
        if args.arch or args.resize_short or args.crop_size:
            raise UsageError("--arch, --resize-short and --crop-size are for weights; an export's "
                             "manifest fixes them")
        return _export_model(args.model, model_options(args, max_batch=args.batch_size),
                             decode_limits(args))
    if (args.runtime, args.precision) != (DEFAULT_RUNTIME, DEFAULT_PRECISION):
        raise UsageError("--runtime and --precision choose how an export runs; weights run eagerly in "
                         "Paddle (export them to use another runtime)")
    if not args.model.is_file():
        raise UsageError(f"{args.model}: no such weights file or model directory")
    return _weights_model(args.model, args.arch, args.resize_short, args.crop_size)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = load_model(args)
        samples = load_samples(args.data, args.root, args.labels, args.limit)
        check_labels(samples, model.class_num, str(args.data))
        result = evaluate(model, samples, args.batch_size, decode_limits(args), args.decode_workers,
                          progress=not args.no_progress)
    except (UsageError, DataError) as e:
        print(f"{TOOL}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{TOOL}: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({"model": os.fspath(args.model), "data": os.fspath(args.data), **result}))
    else:
        print(format_table(result, model, args.data))
    return EXIT_OK if result["refused"] == 0 else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
