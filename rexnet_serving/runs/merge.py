"""rexnet-batch merge: did the shards of a run, together, classify every input exactly once?

Reads the input listing again (the same sources the shards were given), every shard's result file
(``OUT-0000I-of-0000N.EXT`` beside ``-o OUT.EXT``, a path or a URL) and their ``.run.json`` stats, and
writes one summary (JSON): counts, errors by code, images/s per shard, the model and its manifest
digest, and what is wrong if anything is — inputs with no record, inputs with more than one, records
for no input, records in another shard's file, shards missing or unfinished, results from more than one
model. Exit 0 only when every input appears exactly once (its record may be an error: those are counted
by code), 1 otherwise, 2 for a usage error. The result files are read, never changed.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from . import parquet, storage
from .inputs import collect_inputs
from .output import CSV_FIELDS, format_for, unescape_path
from .run import RUN_SUFFIX
from .shards import Shard, shard_of, shard_output, shard_outputs_pattern
from .summary import EXIT_FAILED, EXIT_OK, EXIT_USAGE, UsageError

TOOL = "rexnet-batch merge"
EXAMPLES = 20  # paths listed per problem in the summary
SHARD_LINES = 32  # shards listed one per line on stderr; more are summarised


def _siblings(output: str) -> List[str]:
    """The names in the folder (or prefix) of ``output``."""
    head = output.rpartition("/")[0] or "."
    if storage.is_url(output) and storage.file_url_path(output) is None:
        fs, path = storage.filesystem(output)
        try:
            folder = path.rpartition("/")[0]
            fs.invalidate_cache(folder)
            return [p.rpartition("/")[2] for p in fs.ls(folder, detail=False)]
        except FileNotFoundError:
            return []
        except Exception as e:
            raise storage.access_error(output, e) from None
    folder = storage.file_url_path(head) or Path(head)
    return [p.name for p in folder.iterdir()] if folder.is_dir() else []


def find_shards(output: str, count: Optional[int]) -> Tuple[int, Dict[int, str]]:
    """(N, {index: result file}) of the run writing ``output``; N from ``count`` or the files found."""
    pattern = shard_outputs_pattern(output)
    found: Dict[int, Dict[int, str]] = {}
    for name in _siblings(output):  # listed afresh on every call (merge --wait polls)
        match = pattern.fullmatch(name)
        if match:
            index, n = int(match.group(1)), int(match.group(2))
            found.setdefault(n, {})[index] = shard_output(output, Shard(index, n))
    if count is None:
        if len(found) > 1:
            raise UsageError(f"{output}: shard files of several runs ({', '.join(map(str, sorted(found)))} "
                             "shards): pass --shards N")
        if not found:
            raise UsageError(f"{output}: no shard files (OUT-00000-of-0000N.EXT) found beside it")
        count = next(iter(found))
    return count, found.get(count, {})


def _open_text(location: str) -> Optional[str]:
    return storage.read_text(location)


def _lines(location: str) -> Iterator[str]:
    """The complete lines of a result file, streamed; a torn last line (a shard still running, or
    killed mid-write) is left out, as resume would cut it."""
    if storage.is_url(location) and storage.file_url_path(location) is None:
        fs, path = storage.filesystem(location)
        handle = fs.open(path, "rt", encoding="utf-8", newline="")
    else:
        handle = open(storage.file_url_path(location) or location, encoding="utf-8", newline="")
    with handle as f:
        for line in f:
            if not line.endswith("\n"):
                return
            yield line


def read_records(location: str, fmt: str) -> Iterator[Tuple[str, Optional[str]]]:
    """(path, error code or None) of every complete record of a result file, streamed."""
    if fmt == "parquet":
        if storage.is_url(location) and storage.file_url_path(location) is None:
            fs, path = storage.filesystem(location)
            with fs.open(path, "rb") as f:
                rows = list(parquet.read_records(f))
        else:
            rows = list(parquet.read_records(str(storage.file_url_path(location) or location)))
        for row in rows:
            yield row["path"], None if row["ok"] else row["error_code"]
        return
    lines = _lines(location)
    if fmt == "jsonl":
        for line in lines:
            if line.strip():
                record = json.loads(line)
                yield record["path"], None if record["ok"] else record["error"]["code"]
        return
    header = next(lines, None)  # every row of a result CSV is one physical line (output.escape_path)
    if header is not None and tuple(next(csv.reader([header]))) != CSV_FIELDS:
        raise UsageError(f"{location}: not a result CSV (header {header.strip()!r})")
    for line in lines:
        row = next(csv.reader([line]))
        yield unescape_path(row[0]), None if row[1] == "true" else row[6]


def merge(sources: Sequence[str], output: str, fmt: str, count: Optional[int] = None,
          wait: float = 0.0, poll: float = 30.0) -> Dict[str, Any]:
    """The summary of the run's shards against the listing of ``sources`` (see the module docstring).

    With ``wait`` > 0 (the merge Job, started with the shards' Job), the shards are read again every
    ``poll`` seconds until each has a finished result file or ``wait`` seconds have passed; the input
    is listed once. Memory: the input names, grouped by shard, and one shard's records at a time.
    """
    names = [item.name for item in collect_inputs(sources)]
    groups: Dict[int, List[set]] = {}
    deadline = time.monotonic() + wait
    while True:
        try:
            summary = _check(names, groups, output, fmt, count)
        except UsageError:
            if time.monotonic() >= deadline:
                raise
            summary = None  # no shard file yet
        if summary is not None and (summary["complete"] or not (summary["absent_shards"] or
                                                                summary["unfinished_shards"])):
            return summary
        if time.monotonic() >= deadline:
            return summary
        print(f"{TOOL}: waiting for the shards"
              + ("" if summary is None else f" ({len(summary['absent_shards'])} absent, "
                 f"{len(summary['unfinished_shards'])} unfinished)"), file=sys.stderr, flush=True)
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


class _Problems:
    """How many of one kind of problem, and the first few paths."""

    def __init__(self) -> None:
        self.count = 0
        self.examples: List[str] = []

    def add(self, path: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(path)


def _check(names: List[str], groups: Dict[int, List[set]], output: str, fmt: str,
           count: Optional[int]) -> Dict[str, Any]:
    count, files = find_shards(output, count)
    if count not in groups:
        groups.clear()
        groups[count] = [set() for _ in range(count)]
        for name in names:
            groups[count][shard_of(name, count)].add(name)
    expected_by_shard = groups[count]
    problems = {key: _Problems() for key in ("missing", "duplicates", "unexpected", "misplaced")}
    errors: Counter = Counter()
    ok = records_total = 0
    shards: List[Dict[str, Any]] = []
    models: Dict[str, Dict[str, Any]] = {}
    for index in range(count):
        location = shard_output(output, Shard(index, count))
        expected = expected_by_shard[index]
        entry: Dict[str, Any] = {"index": index, "output": location, "present": index in files,
                                 "expected": len(expected)}
        stats_text = _open_text(location + RUN_SUFFIX)
        stats = json.loads(stats_text) if stats_text else {}
        entry.update({key: stats.get(key) for key in ("finished", "processed", "wall_seconds",
                                                      "images_per_second", "updated_at")})
        if stats.get("model"):
            models[json.dumps(stats["model"], sort_keys=True)] = stats["model"]
        seen: Counter = Counter()
        records = 0
        if index in files:
            for path, code in read_records(location, fmt):
                records += 1
                owner = shard_of(path, count)
                if owner != index:  # another shard's input (the listing or N changed), or none
                    problems["misplaced" if path in expected_by_shard[owner] else "unexpected"].add(path)
                    continue
                if path not in expected:
                    problems["unexpected"].add(path)
                    continue
                seen[path] += 1
                if seen[path] == 2:
                    problems["duplicates"].add(path)
                elif seen[path] == 1:
                    if code is None:
                        ok += 1
                    else:
                        errors[code] += 1
        for path in sorted(expected - seen.keys()):
            problems["missing"].add(path)
        entry["records"] = records
        records_total += records
        shards.append(entry)
    absent = [s["index"] for s in shards if not s["present"]]
    complete = not (any(p.count for p in problems.values()) or absent) and len(models) <= 1
    return {
        "complete": complete, "inputs": len(names), "records": records_total, "ok": ok,
        "errors": dict(sorted(errors.items())), "shard_count": count,
        **{key: p.count for key, p in problems.items()}, "absent_shards": absent,
        "unfinished_shards": [s["index"] for s in shards if s["present"] and not s["finished"]],
        "examples": {key: p.examples for key, p in problems.items()},
        "model": next(iter(models.values())) if len(models) == 1 else None,
        "models": list(models.values()),
        "images_per_second": sum(s["images_per_second"] or 0.0 for s in shards),
        "shards": shards,
    }


def format_summary(summary: Dict[str, Any]) -> str:
    lines = [f"{TOOL}: {summary['inputs']} inputs, {summary['records']} records in "
             f"{summary['shard_count']} shards: " + ("COMPLETE, every input exactly once" if summary["complete"]
                                                      else "INCOMPLETE"),
             f"  ok {summary['ok']}, errors " + (", ".join(f"{c}={n}" for c, n in summary["errors"].items())
                                                 or "none")]
    for key in ("missing", "duplicates", "unexpected", "misplaced"):
        if summary[key]:
            lines.append(f"  {key} {summary[key]}: " + ", ".join(summary["examples"][key][:5])
                         + (" ..." if summary[key] > 5 else ""))
    if summary["absent_shards"]:
        lines.append(f"  no result file for shards {summary['absent_shards']}")
    if summary["unfinished_shards"]:
        lines.append(f"  shards not finished (or still running): {summary['unfinished_shards']}")
    if len(summary["models"]) > 1:
        lines.append(f"  results from {len(summary['models'])} different models: {summary['models']}")
    rates = sorted(s["images_per_second"] or 0.0 for s in summary["shards"])
    if len(rates) <= SHARD_LINES:
        for s in summary["shards"]:
            lines.append(f"  shard {s['index']}: {s['records']}/{s['expected']} records, "
                         f"{s['images_per_second'] or 0.0:.1f} images/s")
    else:  # the JSON summary has every shard
        lines.append(f"  images/s per shard: min {rates[0]:.1f}, median {rates[len(rates) // 2]:.1f}, "
                     f"max {rates[-1]:.1f}")
    lines.append(f"  images/s, all shards: {summary['images_per_second']:.1f}")
    return "\n".join(lines)


def default_summary_path(output: str) -> str:
    head, sep, tail = output.rpartition("/")
    return f"{head}{sep}{tail.partition('.')[0]}-summary.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=TOOL, description="Check that the shards of a run (rexnet-predict/rexnet-batch --shard I/N "
                               "-o OUT) together hold every input exactly once; write one summary.",
        epilog="Exit codes: 0 every input exactly once, 1 not, 2 usage error.")
    parser.add_argument("sources", nargs="+", metavar="SRC", help="the sources the shards were given")
    parser.add_argument("-o", "--output", required=True,
                        help="the -o the shards were given (OUT.EXT, a path or a URL)")
    parser.add_argument("--format", choices=("jsonl", "csv", "parquet"),
                        help="the shards' format (default: from the extension)")
    parser.add_argument("--shards", type=int, metavar="N",
                        help="the shard count (default: from the files found)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to this long for every shard to finish, re-reading them every "
                             "--poll seconds (a merge Job started with the shards' Job; default: no wait)")
    parser.add_argument("--poll", type=float, default=30.0, metavar="SECONDS",
                        help="how often to re-read the shards while waiting (default: %(default)s)")
    parser.add_argument("--summary", metavar="PATH",
                        help="where to write the JSON summary (default: OUT-summary.json beside OUT)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.shards is not None and args.shards < 1:
            raise UsageError("--shards must be at least 1")
        output = str(args.output)
        if args.wait < 0 or args.poll <= 0:
            raise UsageError("--wait must be zero or more and --poll more than zero")
        summary = merge(args.sources, output, format_for(output, args.format), args.shards,
                        wait=args.wait, poll=args.poll)
        target = args.summary or default_summary_path(output)
        storage.write_text(target, json.dumps(summary, indent=2) + "\n")
    except UsageError as e:
        print(f"{TOOL}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, KeyError, IndexError, OSError) as e:  # a damaged result file
        print(f"{TOOL}: error: cannot read a result file: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(format_summary(summary) + f"\n  summary {target}", file=sys.stderr)
    return EXIT_OK if summary["complete"] else EXIT_FAILED
