"""rexnet-batch: classify a folder, glob or list file of images through the rexnet service, resumably.

Any protocol registered in ``clients.base.PROTOCOLS`` (HTTP, gRPC, bRPC) carries the requests; this
module only reads files, groups them into requests, runs N of them at once, retries the transient
failures and writes one line per image.

Output, one record per image (JSONL, or CSV with the same content flattened)::

    {"path": "/abs/img.jpg", "ok": true, "predictions": [{"class_id": 281, "label": "...", "score": 0.9}]}
    {"path": "/abs/bad.jpg", "ok": false, "error": {"code": "truncated", "message": "..."}}

``path`` is the resolved absolute path; it is the key that resume matches on. A list file's second
column (PaddleClas ``path label`` lines) is carried into the record as ``label`` (a string), so the
output can be scored against it; folder and glob inputs have no label.

Error codes the batch client records itself (the service's own per-image codes pass through):
``unreadable`` (the local file could not be read), ``unavailable`` (a request still failed with a
transient error after the retries), ``bad_request`` (the service rejected the request: not retried),
``request_failed`` (any other whole-request failure the client reported). Resume skips every image
already in the output, errors included; ``--redo unavailable`` (any codes) does those again, rewriting the
output without their old records so each image still appears once.

Retries follow "full jitter" exponential backoff (M. Brooker, "Exponential Backoff And Jitter", AWS
Architecture Blog, 2015): attempt n waits uniform(0, min(max_backoff, backoff * 2**n)) seconds.

Durability: only the main thread writes, a whole line per write, flushed at once and fsynced at the end,
so a kill loses at most the requests in flight; a torn last line left by a kill is cut off on resume.
"""
from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import queue
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import (Any, Callable, Collection, Dict, List, NamedTuple, Optional, Sequence,
                    TextIO, Tuple, Union)

from tqdm import tqdm

from .. import defaults
from ..results import ImageResult
from .base import PROTOCOLS, BadRequestError, ClassifierClient, ClientError, TransientError, make_client

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
DEFAULT_PORTS = {"http": defaults.HTTP_PORT, "grpc": defaults.GRPC_PORT, "brpc": defaults.BRPC_PORT}
FORMATS = ("jsonl", "csv")
CSV_FIELDS = ("path", "ok", "top1_class_id", "top1_label", "top1_score", "topk",
              "error_code", "error_message", "label")

UNREADABLE = "unreadable"
UNAVAILABLE = "unavailable"
BAD_REQUEST = "bad_request"
REQUEST_FAILED = "request_failed"

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

PathLike = Union[str, "os.PathLike[str]"]


class UsageError(ValueError):
    """The inputs or the output cannot be used as given (no images found, unknown format, ...)."""


class InputItem(NamedTuple):
    path: Path                   # resolved, absolute
    label: Optional[str] = None  # from a PaddleClas list file's second column


# ---------------------------------------------------------------------------------------------- inputs

def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _has_glob_magic(source: str) -> bool:
    return any(c in source for c in "*?[")


def read_list_file(path: Path) -> List[InputItem]:
    """Images named by a list file: one path per line, relative to the list file's folder.

    PaddleClas ``path label`` lines are accepted: when the whole line is not an existing file, the last
    whitespace-separated field is taken as the label (so paths with spaces work when they exist).
    Blank lines and ``#`` comments are skipped.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: neither an image ({', '.join(sorted(IMAGE_EXTENSIONS))}) "
                         "nor a UTF-8 list file") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read the list file: {e.strerror or e}") from None
    base = path.parent
    items = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, label = line, None
        if not (base / Path(line).expanduser()).is_file():
            parts = line.rsplit(None, 1)
            if len(parts) == 2:
                name, label = parts
        items.append(InputItem((base / Path(name).expanduser()).resolve(), label))
    return items


def _expand(source: str) -> List[InputItem]:
    path = Path(source).expanduser()
    if path.is_dir():
        return [InputItem(p.resolve()) for p in sorted(path.rglob("*")) if _is_image(p) and p.is_file()]
    if path.is_file():
        return [InputItem(path.resolve())] if _is_image(path) else read_list_file(path)
    if _has_glob_magic(source):
        # A glob selects image files; matched folders and other files are left out, so "data/*" works.
        matches = sorted(glob.glob(os.path.expanduser(source), recursive=True))
        return [InputItem(Path(m).resolve()) for m in matches if _is_image(Path(m)) and Path(m).is_file()]
    raise UsageError(f"{source}: no such file or directory")


def collect_inputs(sources: Sequence[PathLike]) -> List[InputItem]:
    """Expand folders (recursive, image extensions, sorted), globs and list files into images.

    Each image appears once (the first mention wins); a source that yields nothing is a UsageError,
    because it is almost always a typo.
    """
    if not sources:
        raise UsageError("no inputs given")
    items: List[InputItem] = []
    seen = set()
    for source in sources:
        found = _expand(os.fspath(source))
        if not found:
            raise UsageError(f"{source}: no images found "
                             f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        for item in found:
            key = str(item.path)
            if key not in seen:
                seen.add(key)
                items.append(item)
    return items


# ---------------------------------------------------------------------------------------------- output

def format_for(output: PathLike, explicit: Optional[str] = None) -> str:
    """The output format: ``explicit`` if given, else from the extension (.jsonl / .csv)."""
    if explicit is not None:
        if explicit not in FORMATS:
            raise UsageError(f"unknown output format {explicit!r}; choose one of {', '.join(FORMATS)}")
        return explicit
    suffix = Path(output).suffix.lower().lstrip(".")
    if suffix in FORMATS:
        return suffix
    raise UsageError(f"{output}: cannot tell the output format from the extension; "
                     "name it .jsonl or .csv, or pass --format")


def result_record(item: InputItem, result: ImageResult) -> Dict[str, Any]:
    """The JSONL record of one image."""
    record: Dict[str, Any] = {"path": str(item.path), "ok": result.ok}
    record.update(result.to_dict())
    if item.label is not None:
        record["label"] = item.label
    return record


def _one_line(text: Optional[str]) -> str:
    # CSV rows stay one physical line each, so that a torn last row can be recognised and cut on resume.
    return "" if text is None else " ".join(str(text).splitlines())


def _csv_row(item: InputItem, result: ImageResult) -> List[str]:
    top1 = result.predictions[0] if result.predictions else None
    return [
        str(item.path),
        "true" if result.ok else "false",
        "" if top1 is None else str(top1.class_id),
        "" if top1 is None else _one_line(top1.label),
        "" if top1 is None else repr(top1.score),
        json.dumps([asdict(p) for p in result.predictions]) if result.ok else "",
        _one_line(result.error_code),
        _one_line(result.error_message),
        _one_line(item.label),
    ]


def _csv_line(row: Sequence[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(row)
    return buffer.getvalue()


class ResultWriter:
    """Appends one line per image to the output; remembers what an earlier run already wrote.

    ``done`` maps each path already in the output to its error code (None when it succeeded). Opening
    an existing output cuts off a torn last line (``repaired`` is then True) and removes the error
    records for which ``redo(path, code)`` is true (``redone`` counts them), so that their images are
    done again and still appear once; any other unparsable line is a UsageError, since guessing could
    drop results.
    """

    def __init__(self, path: PathLike, fmt: str, overwrite: bool = False,
                 redo: Optional[Callable[[str, str], bool]] = None) -> None:
        self.path = Path(path)
        self.format = fmt
        self.done: Dict[str, Optional[str]] = {}
        self.repaired = False
        self.redone = 0
        if self.path.is_dir():
            raise UsageError(f"{self.path}: is a directory, not an output file")
        fresh = overwrite or not self.path.exists() or self.path.stat().st_size == 0
        try:
            if not fresh:
                self._load_existing(redo or (lambda path, code: False))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file: TextIO = open(self.path, "w" if fresh else "a", encoding="utf-8", newline="")
        except OSError as e:
            raise UsageError(f"{self.path}: cannot open the output: {e.strerror or e}") from None
        if fmt == "csv" and (fresh or self.path.stat().st_size == 0):
            self._write_line(_csv_line(CSV_FIELDS))

    def _load_existing(self, redo: Callable[[str, str], bool]) -> None:
        data = self.path.read_bytes()
        # A kill between write() and the newline reaching the disk leaves half a line: it is dropped
        # and its image simply done again.
        keep = data.rfind(b"\n") + 1
        self.repaired = keep < len(data)
        try:
            text = data[:keep].decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{self.path}: not a rexnet-batch output ({e}); fix it or pass --overwrite") \
                from None
        # Everything is parsed before the file is touched, so a UsageError leaves it as it was.
        entries = self._parse_jsonl(text) if self.format == "jsonl" else self._parse_csv(text)
        kept = [(line, path, code) for line, path, code in entries if code is None or not redo(path, code)]
        self.redone = len(entries) - len(kept)
        self.done = {path: code for _, path, code in kept}
        if self.redone:
            header = _csv_line(CSV_FIELDS) if self.format == "csv" else ""
            self._replace("".join([header] + [line for line, _, _ in kept]))
        elif self.repaired:
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def _replace(self, text: str) -> None:
        # Write aside, sync, rename: a kill at any moment leaves either the old or the new file.
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _bad_line(self, number: int, why: str) -> UsageError:
        return UsageError(f"{self.path}:{number}: not a rexnet-batch {self.format} result line ({why}); "
                          "fix it or pass --overwrite")

    def _parse_jsonl(self, text: str) -> List[Tuple[str, str, Optional[str]]]:
        entries = []
        for number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                code = None if record["ok"] else str(record["error"]["code"])
                entries.append((line + "\n", str(record["path"]), code))
            except (ValueError, KeyError, TypeError) as e:
                raise self._bad_line(number, f"{type(e).__name__}: {e}") from None
        return entries

    def _parse_csv(self, text: str) -> List[Tuple[str, str, Optional[str]]]:
        if not text:
            return []  # only a torn header was there: it is written again
        rows = csv.reader(io.StringIO(text, newline=""))
        header = next(rows)
        if tuple(header) != CSV_FIELDS:
            raise self._bad_line(1, f"header {','.join(header)!r}, expected {','.join(CSV_FIELDS)!r}")
        entries = []
        for row in rows:
            if len(row) != len(CSV_FIELDS):
                raise self._bad_line(rows.line_num, f"{len(row)} fields, expected {len(CSV_FIELDS)}")
            entries.append((_csv_line(row), row[0], None if row[1] == "true" else row[6]))
        return entries

    def _write_line(self, line: str) -> None:
        self._file.write(line)
        self._file.flush()

    def write(self, item: InputItem, result: ImageResult) -> None:
        if self.format == "jsonl":
            line = json.dumps(result_record(item, result), ensure_ascii=False) + "\n"
        else:
            line = _csv_line(_csv_row(item, result))
        self._write_line(line)
        self.done[str(item.path)] = result.error_code

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


# --------------------------------------------------------------------------------------------- summary

@dataclass
class BatchSummary:
    """What a run did. ``processed`` counts images written by this run (errors included)."""
    output: Path
    total: int
    skipped: int = 0
    skipped_failed: int = 0   # of the skipped images, those whose earlier record is an error
    redone: int = 0           # earlier error records removed to do their images again (redo codes)
    processed: int = 0
    succeeded: int = 0
    errors: Dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    interrupted: bool = False
    repaired_torn_line: bool = False

    @property
    def failed(self) -> int:
        return self.processed - self.succeeded

    @property
    def images_per_second(self) -> float:
        return self.processed / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def all_ok(self) -> bool:
        """Every input image has a successful record in the output."""
        return (not self.interrupted and self.failed == 0 and self.skipped_failed == 0
                and self.processed + self.skipped == self.total)

    def exit_code(self) -> int:
        return EXIT_OK if self.all_ok else EXIT_FAILED

    def format(self) -> str:
        lines = [f"rexnet-batch: {self.total} images: {self.processed} processed, {self.skipped} skipped "
                 "(already in the output"
                 + (f", {self.skipped_failed} of them errors" if self.skipped_failed else "") + ")",
                 f"  output {self.output}"]
        if self.interrupted:
            lines.append(f"  interrupted: {self.total - self.skipped - self.processed} images not done; "
                         "run the same command again to resume")
        lines.append(f"  ok {self.succeeded}, failed {self.failed}"
                     + (": " + ", ".join(f"{code}={n}" for code, n in sorted(self.errors.items()))
                        if self.errors else ""))
        if self.redone:
            lines.append(f"  redid {self.redone} images whose earlier record was an error (--redo)")
        if self.repaired_torn_line:
            lines.append(f"  cut a torn last line off {self.output} (left by an interrupted run)")
        lines.append(f"  wall {self.wall_seconds:.2f} s, {self.images_per_second:.1f} images/s")
        return "\n".join(lines)


class BatchInterrupted(KeyboardInterrupt):
    """Raised by run_batch on Ctrl-C after everything received so far was written and synced."""

    def __init__(self, summary: BatchSummary) -> None:
        super().__init__("interrupted")
        self.summary = summary


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
                payloads.append(item.path.read_bytes())
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
              max_backoff: float = 30.0, progress: bool = True) -> BatchSummary:
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
    items = collect_inputs(inputs)
    wanted = {str(item.path) for item in items}
    redo_codes = frozenset(redo)
    writer = ResultWriter(output, format_for(output, output_format), overwrite=overwrite,
                          redo=lambda path, code: code in redo_codes and path in wanted)
    summary = BatchSummary(output=writer.path, total=len(items), repaired_torn_line=writer.repaired)
    todo = [item for item in items if str(item.path) not in writer.done]
    summary.skipped = len(items) - len(todo)
    summary.skipped_failed = sum(1 for item in items if writer.done.get(str(item.path), None) is not None)
    summary.redone = writer.redone

    workers = _Workers(client_factory, top_k, retries, backoff, max_backoff)
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    for batch in batches:
        workers.tasks.put(batch)
    threads = [threading.Thread(target=workers.run, name=f"rexnet-batch-{i}", daemon=True)
               for i in range(min(concurrency, len(batches)))]
    bar = tqdm(total=len(todo), unit="img", desc="rexnet-batch", disable=None if progress else True)

    def record(done: _Done) -> None:
        for item, result in done:
            writer.write(item, result)
            summary.processed += 1
            if result.ok:
                summary.succeeded += 1
            else:
                summary.errors[result.error_code] = summary.errors.get(result.error_code, 0) + 1
        bar.update(len(done))

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
        writer.close()
    summary.wall_seconds = time.monotonic() - started
    return summary


# ------------------------------------------------------------------------------------------------- CLI

def default_address(protocol: str) -> str:
    """127.0.0.1 and the protocol's port from rexnet_serving.defaults."""
    if protocol not in DEFAULT_PORTS:
        raise UsageError(f"protocol {protocol!r} has no default port: pass --address host:port")
    return f"127.0.0.1:{DEFAULT_PORTS[protocol]}"


def _bounded(kind: type, low: float, inclusive: bool = True) -> Callable[[str], Any]:
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


def _codes(text: str) -> Tuple[str, ...]:
    codes = tuple(code.strip() for code in text.split(",") if code.strip())
    if not codes:
        raise argparse.ArgumentTypeError("name at least one error code")
    return codes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rexnet-batch",
        description="Classify images (folders, globs, list files) through the rexnet service into a "
                    "JSONL or CSV file, N requests at a time; rerunning resumes where a run stopped.",
        epilog="Exit codes: 0 every image succeeded, 1 some images failed, 2 usage error, "
               "130 interrupted (Ctrl-C; 143 on SIGTERM) after writing what had arrived.")
    parser.add_argument("sources", nargs="+", metavar="SRC",
                        help="a folder (searched recursively for .jpg .jpeg .png .bmp .webp), a glob "
                             "(quote it), an image, or a list file (one path per line, relative to the "
                             "list file; PaddleClas 'path label' lines carry the label into the output)")
    parser.add_argument("-o", "--output", required=True, help="OUT.jsonl or OUT.csv")
    parser.add_argument("--format", choices=FORMATS, help="output format (default: from the extension)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="http",
                        help="how to reach the service (default: %(default)s)")
    parser.add_argument("--address", help="host:port (default: 127.0.0.1 and the protocol's default port: "
                        + ", ".join(f"{p} {port}" for p, port in DEFAULT_PORTS.items()) + ")")
    parser.add_argument("--concurrency", type=_bounded(int, 1), default=4,
                        help="requests in flight (default: %(default)s)")
    parser.add_argument("--batch-size", type=_bounded(int, 1), default=1,
                        help="images per request (default: %(default)s)")
    parser.add_argument("--top-k", type=_bounded(int, 1), default=5,
                        help="predictions per image (default: %(default)s)")
    parser.add_argument("--retries", type=_bounded(int, 0), default=5,
                        help="retries of a request after a transient failure (default: %(default)s)")
    parser.add_argument("--timeout", type=_bounded(float, 0, inclusive=False), default=30.0,
                        help="seconds per request (default: %(default)s)")
    parser.add_argument("--backoff", type=_bounded(float, 0, inclusive=False), default=0.5,
                        help="first retry waits up to this many seconds, doubling each time up to 30 "
                             "(default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start the output over instead of skipping the images already in it")
    parser.add_argument("--redo", type=_codes, default=(), metavar="CODE[,CODE...]",
                        help="on resume, do again the images whose record is an error with one of these "
                             f"codes, e.g. {UNAVAILABLE} after the service was down, or {UNREADABLE}")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        address = args.address or default_address(args.protocol)
        fmt = format_for(args.output, args.format)
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

    terminated = threading.Event()

    def on_sigterm(signum: int, frame: Any) -> None:
        # A Kubernetes Job or a shell's kill: stop like on Ctrl-C, writing what has arrived.
        terminated.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        summary = run_batch(args.sources, args.output, client_factory, concurrency=args.concurrency,
                            batch_size=args.batch_size, top_k=args.top_k, retries=args.retries,
                            output_format=fmt, overwrite=args.overwrite, redo=args.redo,
                            backoff=args.backoff,
                            progress=not args.no_progress)
    except UsageError as e:
        print(f"rexnet-batch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BatchInterrupted as e:
        print(e.summary.format(), file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated.is_set() else signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(summary.format(), file=sys.stderr)
    return summary.exit_code()


if __name__ == "__main__":
    sys.exit(main())
