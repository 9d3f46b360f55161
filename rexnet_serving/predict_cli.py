"""rexnet-predict: classify image files in process with an exported model, no server (PaddleClas's
``deploy/python/predict_cls.py``).

The stages are the service's own (``Classifier``: decode with the same limits, the manifest's
preprocessing, Paddle Inference, top-k), so a record here equals the service's answer for the same file.
Files are read and decoded by a small thread pool a few batches ahead of the model
(``runs.prefetch``), so the math threads do not wait for JPEG decoding.

Inputs (local or object-store URLs), shards (``--shard I/N`` or a Kubernetes Indexed Job's index), the
result file (JSONL, CSV or Parquet, one record per image, resumable after any kill), the summary and the
exit codes are ``rexnet_serving.runs``, shared with rexnet-batch. Without ``-o`` the records go to
stdout: a table on a terminal, JSONL (or ``--format csv``) into a pipe.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple, Union

import numpy as np
from tqdm import tqdm  # the table's lines go above a running bar

from . import defaults
from .classifier import Classifier, decode_file
from .imageio import DecodeLimits, ImageError
from .results import ImageResult
from .manifest import CONTENT_KEY, MANIFEST_FILE
from .runs.cli import (SOURCES_HELP, add_model_arguments, add_output_arguments, bounded, decode_limits,
                       model_options, run_and_report, shard_from_args)
from .runs.inputs import InputItem, PathLike, collect_inputs
from .runs.output import csv_header, format_for, format_line
from .runs.prefetch import prefetched_batches
from .runs.progress import DEFAULT_LOG_SECONDS, Progress
from .runs.run import DEFAULT_COMMIT_SECONDS, open_run
from .runs.shards import Shard
from .runs.summary import RunInterrupted, RunSummary, UsageError

TOOL = "rexnet-predict"
UNREADABLE = "unreadable"  # the file could not be read (rexnet-batch's code for the same)
PROGRESS_FROM = 64  # images: shorter runs finish before a bar would tell anything

Prepared = Union[np.ndarray, ImageResult]  # a decoded image, or the error result of a refused one


def read_and_decode(item: InputItem, limits: DecodeLimits) -> Prepared:
    """One file as the service decodes it; a refused or unreadable file becomes its error result."""
    try:
        data = item.read_bytes()
    except OSError as e:
        return ImageResult.failure(UNREADABLE, f"cannot read {item.path}: {e.strerror or e}")
    try:
        return decode_file(data, limits)
    except ImageError as e:
        return ImageResult.failure(e.code, str(e))


def classify_prepared(classifier: Classifier, batch: Sequence[Tuple[InputItem, Prepared]],
                      top_k: int) -> List[Tuple[InputItem, ImageResult]]:
    """The decoded images of ``batch`` through preprocessing, the model and top-k in one forward pass;
    the refused ones keep their error, in input order."""
    images = [prepared for _, prepared in batch if not isinstance(prepared, ImageResult)]
    probs = classifier.probabilities(classifier.preprocess(images) if images else [])
    classified = iter(classifier.results(len(images), probs, {}, top_k))
    return [(item, prepared if isinstance(prepared, ImageResult) else next(classified))
            for item, prepared in batch]


# ---------------------------------------------------------------------------------------- sinks

class _StreamSink:
    """Records to a stream without resume: JSONL/CSV lines into a pipe, or a table on a terminal."""

    def __init__(self, stream: TextIO, fmt: str, top_k: int) -> None:
        self.stream, self.format, self.top_k = stream, fmt, top_k
        if fmt == "table":
            self._emit(f"{'image':40s} {'class':>5s} {'score':>8s}  label")
        elif fmt == "csv":
            self._emit(csv_header().rstrip("\n"))

    def _emit(self, text: str) -> None:
        tqdm.write(text, file=self.stream)  # above a running progress bar, if any

    def write(self, item: InputItem, result: ImageResult) -> None:
        if self.format != "table":
            self._emit(format_line(item, result, self.format).rstrip("\n"))
            return
        name = _display_name(item.path)
        if not result.ok:
            self._emit(f"{name:40s} error {result.error_code}: {result.error_message}")
            return
        for rank, p in enumerate(result.predictions):
            self._emit(f"{name if rank == 0 else '':40s} {p.class_id:>5d} {p.score:>8.4f}  {p.label}")

    def close(self) -> None:
        self.stream.flush()


def _display_name(path: Union[Path, str]) -> str:
    if not isinstance(path, Path):
        return path  # a URL
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)


# ----------------------------------------------------------------------------------------- run

def model_identity(classifier: Classifier) -> Dict[str, Any]:
    """What the result files record about the model: its arch, its version in a repository (the
    version folder's number, 1 for a bare export) and the manifest's ``content_sha256``."""
    model_dir = classifier.manifest.model_dir
    digest = None
    if model_dir is not None:
        digest = json.loads((model_dir / MANIFEST_FILE).read_text(encoding="utf-8")).get(CONTENT_KEY)
    version = model_dir.name if model_dir is not None and model_dir.name.isdecimal() else "1"
    return {"name": classifier.manifest.arch, "version": version, "manifest_sha256": digest}


def run_predict(inputs: Sequence[PathLike], classifier: Classifier, output: Optional[PathLike] = None,
                *, top_k: int = 5, batch_size: int = 8, output_format: Optional[str] = None,
                overwrite: bool = False, decode_workers: int = 2, progress: bool = True,
                stream: Optional[TextIO] = None, shard: Optional[Shard] = None,
                commit_seconds: float = DEFAULT_COMMIT_SECONDS,
                progress_seconds: float = DEFAULT_LOG_SECONDS) -> RunSummary:
    """Classify every image named by ``inputs`` (this ``shard`` of them) into ``output`` (resumable),
    or onto ``stream``.

    Without ``output`` the records go to ``stream`` (default stdout) in ``output_format``: ``table``,
    ``jsonl`` or ``csv``. Raises UsageError for unusable inputs or output, and RunInterrupted on
    Ctrl-C after writing everything classified so far.
    """
    if not 1 <= top_k <= classifier.class_num:
        raise UsageError(f"--top-k must be between 1 and {classifier.class_num} (the model's classes), "
                         f"got {top_k}")
    started = time.monotonic()
    run = None
    if output is not None:
        run = open_run(inputs, output, format_for(output, output_format), overwrite=overwrite, tool=TOOL,
                       shard=shard, model=model_identity(classifier), commit_seconds=commit_seconds)
        todo, sink, summary = run.todo, run, run.summary
    else:
        todo = collect_inputs(inputs)
        sink = _StreamSink(stream or sys.stdout, output_format or "jsonl", top_k)
        summary = RunSummary(output=None, total=len(todo), tool=TOOL)
    limits = classifier.limits
    bar = Progress(summary, len(todo), enabled=progress, every=progress_seconds, min_images=PROGRESS_FROM)
    interrupted = True  # until the loop ends
    try:
        for batch in prefetched_batches(todo, batch_size, lambda item: read_and_decode(item, limits),
                                        workers=decode_workers):
            for item, result in classify_prepared(classifier, batch, top_k):
                sink.write(item, result)
                if run is None:
                    summary.count(result)
            bar.update(len(batch))
            if run is not None:
                run.checkpoint()
        interrupted = False
    except KeyboardInterrupt:
        summary.interrupted = True
        summary.wall_seconds = time.monotonic() - started
        raise RunInterrupted(summary) from None
    finally:
        bar.close()
        if run is not None:
            run.close(interrupted=interrupted)
        else:
            sink.close()
    summary.wall_seconds = time.monotonic() - started
    return summary


# ----------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=TOOL,
        description="Classify images (files, folders, globs, list files) in process with an exported "
                    "model: no server. A table on a terminal, JSONL into a pipe, or a JSONL/CSV file "
                    "with -o that a rerun resumes.",
        epilog="Exit codes: 0 every image classified, 1 some images refused (each has its error code in "
               "the output), 2 usage, model or store error, 3 the output could not be committed to its "
               "object store (rerun to resume), 130 interrupted (143 on SIGTERM) after writing what was "
               "done.")
    parser.add_argument("sources", nargs="+", metavar="SRC", help=SOURCES_HELP)
    parser.add_argument("-m", "--model-dir", type=Path, default=None,
                        help="exported model directory (default: $%s, else %s, as rexnet-serve)"
                             % (defaults.MODEL_DIR_ENV, defaults.default_model_dir()))
    add_output_arguments(parser, required=False)
    parser.add_argument("--top-k", type=bounded(int, 1), default=5,
                        help="predictions per image (default: %(default)s)")
    parser.add_argument("--batch-size", type=bounded(int, 1), default=8,
                        help="images per forward pass (default: %(default)s)")
    parser.add_argument("--decode-workers", type=bounded(int, 1), default=2,
                        help="threads reading and decoding ahead of the model (default: %(default)s)")
    parser.add_argument("--table", action="store_true",
                        help="print a table even when stdout is not a terminal (without -o)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser)
    return parser


def _stdout_format(args: argparse.Namespace) -> str:
    if args.table:
        return "table"
    if args.format:
        return args.format
    return "table" if sys.stdout.isatty() else "jsonl"


def load_classifier(args: argparse.Namespace) -> Classifier:
    """The Classifier the flags describe; UsageError (exit 2) for a model that cannot be loaded."""
    import paddle
    model_dir = args.model_dir if args.model_dir is not None else defaults.default_model_dir()
    options = model_options(args, max_batch=args.batch_size)
    paddle.set_device("cpu" if args.device == "cpu" else f"gpu:{args.gpu_id}")  # where preprocessing runs
    try:
        return Classifier(model_dir, limits=decode_limits(args), **options)
    except (OSError, ValueError, RuntimeError, ImportError) as e:  # ImportError: a runtime not installed
        raise UsageError(f"cannot load the model from {model_dir}: {e}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> RunSummary:
        fmt = format_for(args.output, args.format) if args.output is not None else _stdout_format(args)
        if fmt == "parquet" and args.output is None:
            raise UsageError("--format parquet needs -o/--output (a Parquet file is not a stream)")
        shard = shard_from_args(args)
        # Listed before the model loads: a missing bucket or credential costs seconds, not a model load.
        inputs = collect_inputs(args.sources)
        return run_predict(inputs, load_classifier(args), args.output, top_k=args.top_k,
                           batch_size=args.batch_size, output_format=fmt, overwrite=args.overwrite,
                           decode_workers=args.decode_workers, progress=not args.no_progress,
                           shard=shard, commit_seconds=args.commit_every,
                           progress_seconds=args.progress_every)

    return run_and_report(TOOL, work)

if __name__ == "__main__":
    sys.exit(main())
