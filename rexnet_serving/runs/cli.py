"""Command-line pieces the run tools share: bounded numbers, the output flags, SIGTERM as Ctrl-C, and
the model flags of the in-process tools (device, runtime, precision, decode limits)."""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from typing import Any, Callable, Dict, Iterator, Optional

from ..runtimes import default_runtime
from ..runtimes.base import PRECISIONS, RUNTIMES
from .output import FORMATS
from .progress import DEFAULT_LOG_SECONDS
from .run import DEFAULT_COMMIT_SECONDS
from .shards import COUNT_ENV, INDEX_ENV, Shard, resolve_shard
from .summary import EXIT_COMMIT, EXIT_USAGE, CommitError, RunInterrupted, RunSummary, UsageError

# Runtime None: the device's default, as the service's (rexnet_serving.runtimes.default_runtime).
DEFAULT_RUNTIME, DEFAULT_PRECISION = None, "fp32"


def bounded(kind: type, low: float, inclusive: bool = True) -> Callable[[str], Any]:
    """argparse type: a number of ``kind`` at least (or, not inclusive, above) ``low``."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'at least' if inclusive else 'more than'} {low}, "
                                             f"got {text}")
        return value
    return parse


SOURCES_HELP = ("a folder (searched recursively for .jpg .jpeg .png .bmp .webp), a glob (quote it), an "
                "image, or a list file (one path per line, relative to the list file; PaddleClas "
                "'path label' lines carry the label into the output); each may be a URL: "
                "s3://bucket/prefix/, gs://, az://, file:// (the s3, gcs, azure extras)")


def add_output_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """-o/--output, --format, --overwrite, the shard and commit flags: the result file resume works on."""
    parser.add_argument("-o", "--output", required=required,
                        help="OUT.jsonl, OUT.csv or OUT.parquet, a path or a URL (s3://...); rerunning "
                             "with the same file resumes")
    parser.add_argument("--format", choices=FORMATS, help="output format (default: from the extension)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start the output over instead of skipping the images already in it")
    group = parser.add_argument_group("shards (one of N processes, e.g. a Kubernetes Indexed Job's pods)")
    group.add_argument("--shard", metavar="I/N",
                       help=f"classify only shard I of N (0-based) into OUT-0000I-of-0000N.EXT; default: "
                            f"${INDEX_ENV} with N from --shard-count or ${COUNT_ENV}, else everything")
    group.add_argument("--shard-count", type=bounded(int, 1), metavar="N",
                       help=f"N when the index comes from ${INDEX_ENV}")
    group.add_argument("--commit-every", type=bounded(float, 0), default=DEFAULT_COMMIT_SECONDS,
                       metavar="SECONDS", help="upload a URL output (and write the shard's .run.json) this "
                                               "often; a killed run redoes at most that much "
                                               "(default: %(default)s)")
    group.add_argument("--progress-every", type=bounded(float, 0, inclusive=False),
                       default=DEFAULT_LOG_SECONDS, metavar="SECONDS",
                       help="when stderr is not a terminal, a progress line this often "
                            "(default: %(default)s)")


def shard_from_args(args: argparse.Namespace) -> Optional[Shard]:
    """The shard the flags (or the Indexed Job's environment) select; UsageError if inconsistent."""
    shard = resolve_shard(args.shard, args.shard_count)
    if shard is not None and args.output is None:
        raise UsageError("a shard needs -o/--output: each shard writes its own result file")
    return shard


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[threading.Event]:
    """SIGTERM (a Kubernetes Job, a shell's kill) raises KeyboardInterrupt like Ctrl-C, so a run stops
    the same way and writes what it has; the event tells the two apart (exit 143 vs 130)."""
    terminated = threading.Event()

    def on_sigterm(signum: int, frame: Any) -> None:
        terminated.set()
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if main else None
    try:
        yield terminated
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run_and_report(tool: str, work: Callable[[], RunSummary]) -> int:
    """Run ``work`` with SIGTERM as Ctrl-C; print its summary (or the one error line) on stderr and
    return the exit code: the summary's, 2 for a UsageError, 3 for a CommitError, 130/143 when
    interrupted."""
    with sigterm_as_interrupt() as terminated:
        try:
            summary = work()
        except UsageError as e:
            print(f"{tool}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        except CommitError as e:
            print(f"{tool}: error: {e}", file=sys.stderr)
            return EXIT_COMMIT
        except RunInterrupted as e:
            print(e.summary.format(), file=sys.stderr)
            return 128 + (signal.SIGTERM if terminated.is_set() else signal.SIGINT)
    print(summary.format(), file=sys.stderr)
    return summary.exit_code()


# -------------------------------------------------------------------------- in-process model flags

def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --gpu-id, --threads, --runtime, --precision, --max-image-bytes, --max-image-pixels."""
    from ..imageio import DecodeLimits
    group = parser.add_argument_group("model")
    group.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                       help="where the model runs (default: %(default)s)")
    group.add_argument("--gpu-id", type=bounded(int, 0), default=0, help="GPU to use with --device gpu")
    group.add_argument("--threads", type=bounded(int, 1), default=2,
                       help="CPU math threads (default: %(default)s)")
    group.add_argument("--runtime", choices=RUNTIMES, default=DEFAULT_RUNTIME,
                       help="inference runtime, as the service's (default: openvino with --device cpu, "
                            "paddle with --device gpu)")
    group.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                       help="inference precision, as the service's (default: %(default)s)")
    limits = DecodeLimits()
    group.add_argument("--max-image-bytes", type=bounded(int, 1), default=limits.max_bytes,
                       help="refuse larger files (default: %(default)s, as the service)")
    group.add_argument("--max-image-pixels", type=bounded(int, 1), default=limits.max_pixels,
                       help="refuse images with more pixels (default: %(default)s, as the service)")


def decode_limits(args: argparse.Namespace) -> Any:
    from ..imageio import DecodeLimits
    return DecodeLimits(max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels)


def model_options(args: argparse.Namespace, max_batch: int) -> Dict[str, Any]:
    """Classifier keyword arguments (rexnet_serving.runtimes.load_model's) from the model flags, through
    the service's own ``inference_model_options`` (one mapping from settings to predictor options); a
    combination that cannot run is refused when the model loads, naming the flag's option."""
    from ..classifier import inference_model_options
    return inference_model_options(device_type=0 if args.device == "cpu" else 1,
                                   devices=str(args.gpu_id), thread_num=args.threads,
                                   max_batch=max_batch, runtime=args.runtime or default_runtime(args.device),
                                   precision=args.precision)
