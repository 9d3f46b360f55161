"""rexnet-batch: classify a folder, glob or list file of images through the rexnet service, resumably.

Any protocol registered in ``clients.base.PROTOCOLS`` (HTTP, gRPC, bRPC) carries the requests; this
module only reads files, groups them into requests, runs N of them at once, retries the transient
failures and writes one line per image.

Inputs (local or object-store URLs), shards (``--shard I/N``), the output file (one record per image,
JSONL, CSV or Parquet), resume and the summary are ``rexnet_serving.runs``, shared with rexnet-predict.
``rexnet-batch merge`` (``runs.merge``) checks that the shards together hold every input exactly once.

Error codes the batch client records itself (the service's own per-image codes pass through):
``unreadable`` (the local file could not be read), ``unavailable`` (a request still failed with a
transient error after the retries), ``bad_request`` (the service rejected the request: not retried),
``request_failed`` (any other whole-request failure the client reported). Resume skips every image
already in the output, errors included; ``--redo unavailable`` (any codes) does those again, rewriting the
output without their old records so each image still appears once.

Retries follow "full jitter" exponential backoff (M. Brooker, "Exponential Backoff And Jitter", AWS
Architecture Blog, 2015): attempt n waits uniform(0, min(max_backoff, backoff * 2**n)) seconds.

Only the main thread writes (``runs.run.Run``), so a kill loses at most the requests in flight.
"""
from __future__ import annotations

import argparse
import queue
import random
import sys
import threading
import time
from typing import Callable, Collection, List, Optional, Sequence, Tuple, Union

from ..results import ImageResult
from ..runs.cli import SOURCES_HELP, add_output_arguments, bounded, run_and_report, shard_from_args
from ..runs.inputs import InputItem, PathLike, UsageError, collect_inputs  # noqa: F401 (re-exported)
from ..runs.output import CSV_FIELDS, format_for  # noqa: F401 (re-exported)
from ..runs.progress import DEFAULT_LOG_SECONDS, Progress
from ..runs.run import DEFAULT_COMMIT_SECONDS, open_run
from ..runs.shards import Shard
from ..runs.summary import EXIT_USAGE, RunInterrupted, RunSummary
from .base import DEFAULT_PORTS, PROTOCOLS, BadRequestError, ClassifierClient, ClientError, TransientError, make_client


UNREADABLE = "unreadable"
UNAVAILABLE = "unavailable"
BAD_REQUEST = "bad_request"
REQUEST_FAILED = "request_failed"

BatchSummary = RunSummary  # the name this module's callers know


class BatchInterrupted(RunInterrupted):
    """Raised by run_batch on Ctrl-C after everything received so far was written and synced."""


# ------------------------------------------------------------------------------------------------ work

_Batch = List[InputItem]
_Done = List[Tuple[InputItem, ImageResult]]


class _Stopped(Exception):
    pass


class _Workers:
    """N threads, each with its own client (so connections are reused), taking batches off a queue.

    Daemon threads, not a ThreadPoolExecutor: on Ctrl-C the process must not wait for requests in flight.
    """

    def __init__(self, client_factory: Callable[[], ClassifierClient], top_k: int, retries: int,
                 backoff: float, max_backoff: float) -> None:
        self.client_factory = client_factory
        self.top_k = top_k
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.tasks: "queue.Queue[_Batch]" = queue.Queue()
        self.results: "queue.Queue[Union[_Done, BaseException]]" = queue.Queue()
        self.stop = threading.Event()

    def run(self) -> None:
        client: List[ClassifierClient] = []  # created on first use, inside the retry loop
        try:
            while not self.stop.is_set():
                try:
                    batch = self.tasks.get_nowait()
                except queue.Empty:
                    return
                self.results.put(self._classify(client, batch))
        except _Stopped:
            return
        except BaseException as e:  # a bug in a client: surface it in the main thread
            self.results.put(e)
        finally:
            for c in client:
                try:
                    c.close()
                except Exception:
                    pass  # closing is best effort; the results are already out

    def _classify(self, client: List[ClassifierClient], batch: _Batch) -> _Done:
        results: List[Optional[ImageResult]] = [None] * len(batch)
        sent, payloads = [], []
        for i, item in enumerate(batch):
            try:
                payloads.append(item.read_bytes())
                sent.append(i)
            except OSError as e:
                results[i] = ImageResult.failure(UNREADABLE, f"cannot read {item.path}: {e.strerror or e}")
        if payloads:
            for i, result in zip(sent, self._request(client, payloads)):
                results[i] = result
        return [(item, result) for item, result in zip(batch, results) if result is not None]

    def _request(self, client: List[ClassifierClient], payloads: List[bytes]) -> List[ImageResult]:
        n = len(payloads)
        error: Optional[TransientError] = None
        for attempt in range(self.retries + 1):
            if self.stop.is_set():
                raise _Stopped
            try:
                if not client:
                    client.append(self.client_factory())
                results = client[0].classify(payloads, top_k=self.top_k)
            except TransientError as e:
                error = e
                if attempt < self.retries:
                    self.stop.wait(random.uniform(0, min(self.max_backoff, self.backoff * 2 ** attempt)))
                continue
            except BadRequestError as e:
                return [ImageResult.failure(BAD_REQUEST, str(e))] * n
            except ClientError as e:
                return [ImageResult.failure(REQUEST_FAILED, str(e))] * n
            if len(results) != n:
                return [ImageResult.failure(
                    REQUEST_FAILED, f"the client returned {len(results)} results for {n} images")] * n
            return list(results)
        return [ImageResult.failure(UNAVAILABLE, f"{error} (gave up after {self.retries + 1} attempts)")] * n


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def run_batch(inputs: Sequence[PathLike], output: PathLike,
              client_factory: Callable[[], ClassifierClient], concurrency: int = 4, batch_size: int = 1,
              top_k: int = 5, retries: int = 5, *, output_format: Optional[str] = None,
              overwrite: bool = False, redo: Collection[str] = (), backoff: float = 0.5,
              max_backoff: float = 30.0, progress: bool = True, shard: Optional[Shard] = None,
              commit_seconds: float = DEFAULT_COMMIT_SECONDS,
              progress_seconds: float = DEFAULT_LOG_SECONDS) -> BatchSummary:
    """Classify every image named by ``inputs`` (folders, globs, list files) into ``output``.

    ``client_factory()`` builds one client per worker thread (``functools.partial(make_client, ...)``).
    Images already in ``output`` are skipped unless ``overwrite``, or unless their record is an error
    whose code is in ``redo`` (e.g. {"unavailable"} after the service was down): those are done again.
    Raises UsageError for unusable inputs or output, and BatchInterrupted (a KeyboardInterrupt carrying
    the summary) on Ctrl-C, after writing and syncing everything received.
    """
    _positive("concurrency", concurrency)
    _positive("batch_size", batch_size)
    _positive("top_k", top_k)
    _positive("backoff", backoff)
    _positive("max_backoff", max_backoff)
    if retries < 0:
        raise ValueError(f"retries must be zero or more, got {retries}")
    started = time.monotonic()
    run = open_run(inputs, output, format_for(output, output_format), overwrite=overwrite, redo=redo,
                   tool="rexnet-batch", shard=shard, commit_seconds=commit_seconds)
    todo, summary = run.todo, run.summary

    workers = _Workers(client_factory, top_k, retries, backoff, max_backoff)
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    for batch in batches:
        workers.tasks.put(batch)
    threads = [threading.Thread(target=workers.run, name=f"rexnet-batch-{i}", daemon=True)
               for i in range(min(concurrency, len(batches)))]
    bar = Progress(summary, len(todo), enabled=progress, every=progress_seconds)
    interrupted = True  # until every batch is in

    def record(done: _Done) -> None:
        for item, result in done:
            run.write(item, result)
        bar.update(len(done))
        run.checkpoint()

    try:
        for thread in threads:
            thread.start()
        remaining = len(batches)
        while remaining:
            try:
                done = workers.results.get(timeout=1.0)
            except queue.Empty:
                continue
            if isinstance(done, BaseException):
                raise done
            record(done)
            remaining -= 1
        for thread in threads:
            thread.join()
        interrupted = False
    except KeyboardInterrupt:
        workers.stop.set()
        while True:  # what already arrived is complete: keep it
            try:
                done = workers.results.get_nowait()
            except queue.Empty:
                break
            if not isinstance(done, BaseException):
                record(done)
        summary.interrupted = True
        summary.wall_seconds = time.monotonic() - started
        raise BatchInterrupted(summary) from None
    finally:
        workers.stop.set()
        bar.close()
        run.close(interrupted=interrupted)
    summary.wall_seconds = time.monotonic() - started
    return summary


# ------------------------------------------------------------------------------------------------- CLI

def default_address(protocol: str) -> str:
    """127.0.0.1 and the protocol's port from rexnet_serving.defaults."""
    if protocol not in DEFAULT_PORTS:
        raise UsageError(f"protocol {protocol!r} has no default port: pass --address host:port")
    return f"127.0.0.1:{DEFAULT_PORTS[protocol]}"


def _codes(text: str) -> Tuple[str, ...]:
    codes = tuple(code.strip() for code in text.split(",") if code.strip())
    if not codes:
        raise argparse.ArgumentTypeError("name at least one error code")
    return codes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rexnet-batch",
        description="Classify images (folders, globs, list files, object-store URLs) through the rexnet "
                    "service into a JSONL, CSV or Parquet file, N requests at a time; rerunning resumes "
                    "where a run stopped. `rexnet-batch merge --help`: check the shards of a run.",
        epilog="Exit codes: 0 every image succeeded, 1 some images failed, 2 usage or store error, "
               "3 the output could not be committed to its object store (rerun to resume), "
               "130 interrupted (Ctrl-C; 143 on SIGTERM) after writing what had arrived.")
    parser.add_argument("sources", nargs="+", metavar="SRC", help=SOURCES_HELP)
    add_output_arguments(parser, required=True)
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="http",
                        help="how to reach the service (default: %(default)s)")
    parser.add_argument("--address", help="host:port (default: 127.0.0.1 and the protocol's default port: "
                        + ", ".join(f"{p} {port}" for p, port in DEFAULT_PORTS.items()) + ")")
    parser.add_argument("--concurrency", type=bounded(int, 1), default=4,
                        help="requests in flight (default: %(default)s)")
    parser.add_argument("--batch-size", type=bounded(int, 1), default=1,
                        help="images per request (default: %(default)s)")
    parser.add_argument("--top-k", type=bounded(int, 1), default=5,
                        help="predictions per image (default: %(default)s)")
    parser.add_argument("--retries", type=bounded(int, 0), default=5,
                        help="retries of a request after a transient failure (default: %(default)s)")
    parser.add_argument("--timeout", type=bounded(float, 0, inclusive=False), default=30.0,
                        help="seconds per request (default: %(default)s)")
    parser.add_argument("--backoff", type=bounded(float, 0, inclusive=False), default=0.5,
                        help="first retry waits up to this many seconds, doubling each time up to 30 "
                             "(default: %(default)s)")
    parser.add_argument("--redo", type=_codes, default=(), metavar="CODE[,CODE...]",
                        help="on resume, do again the images whose record is an error with one of these "
                             f"codes, e.g. {UNAVAILABLE} after the service was down, or {UNREADABLE}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:  # a folder named "merge" is ./merge
        from ..runs.merge import main as merge_main
        return merge_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        address = args.address or default_address(args.protocol)
        fmt = format_for(args.output, args.format)
        shard = shard_from_args(args)
    except UsageError as e:
        print(f"rexnet-batch: error: {e}", file=sys.stderr)
        return EXIT_USAGE

    def client_factory() -> ClassifierClient:
        return make_client(args.protocol, address, timeout=args.timeout)

    try:
        # Built once up front so that a wrong address or a missing dependency is one clear line.
        client_factory().close()
    except TransientError:
        pass  # an eager client that cannot connect yet: the workers retry
    except Exception as e:
        print(f"rexnet-batch: error: cannot create the {args.protocol} client for {address}: {e}",
              file=sys.stderr)
        return EXIT_USAGE

    return run_and_report("rexnet-batch", lambda: run_batch(
        args.sources, args.output, client_factory, concurrency=args.concurrency,
        batch_size=args.batch_size, top_k=args.top_k, retries=args.retries, output_format=fmt,
        overwrite=args.overwrite, redo=args.redo, backoff=args.backoff, progress=not args.no_progress,
        shard=shard, commit_seconds=args.commit_every, progress_seconds=args.progress_every))

if __name__ == "__main__":
    sys.exit(main())
