"""The result file of a run: one line per image (JSONL, or CSV with the same content flattened).

    {"path": "/abs/img.jpg", "ok": true, "predictions": [{"class_id": 281, "label": "...", "score": 0.9}]}
    {"path": "/abs/bad.jpg", "ok": false, "error": {"code": "truncated", "message": "..."}}

``path`` is the resolved absolute path (or the object's URL); it is the key that resume matches on. A
list file's label is carried into the record as ``label`` (a string). In CSV every field is kept on one
physical line; the path reversibly (``escape_path``), since resume must match it exactly.

Durability: a whole line per write, flushed at once and fsynced at close, so a kill loses at most the
images in flight; a torn last line left by a kill (SIGKILL included) is cut off when the file is opened
again, and its image simply done again.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, TextIO, Tuple

from ..results import ImageResult
from .inputs import InputItem, PathLike
from .summary import UsageError

FORMATS = ("jsonl", "csv", "parquet")
CSV_FIELDS = ("path", "ok", "top1_class_id", "top1_label", "top1_score", "topk",
              "error_code", "error_message", "label")


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
                     "name it .jsonl, .csv or .parquet, or pass --format")


def result_record(item: InputItem, result: ImageResult) -> Dict[str, Any]:
    """The JSONL record of one image."""
    record: Dict[str, Any] = {"path": item.name, "ok": result.ok}
    record.update(result.to_dict())
    if item.label is not None:
        record["label"] = item.label
    return record


def _one_line(text: Optional[str]) -> str:
    # CSV rows stay one physical line each, so that a torn last row can be recognised and cut on resume.
    return "" if text is None else " ".join(str(text).splitlines())


def escape_path(path: str) -> str:
    """The CSV path field, on one line and reversible (``unescape_path``): a path holding a line break,
    or starting with a double quote, is written as its JSON string literal; any other path as it is."""
    if "\n" in path or "\r" in path or path.startswith('"'):
        return json.dumps(path, ensure_ascii=False)
    return path


def unescape_path(field: str) -> str:
    return json.loads(field) if field.startswith('"') else field


def _csv_row(item: InputItem, result: ImageResult) -> List[str]:
    top1 = result.predictions[0] if result.predictions else None
    return [
        escape_path(item.name),
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


def csv_header() -> str:
    return _csv_line(CSV_FIELDS)


def format_line(item: InputItem, result: ImageResult, fmt: str) -> str:
    """One image's line in ``fmt`` (jsonl or csv), newline included."""
    if fmt == "jsonl":
        return json.dumps(result_record(item, result), ensure_ascii=False) + "\n"
    return _csv_line(_csv_row(item, result))


class ResultWriter:
    """Appends one line per image to the output; remembers what an earlier run already wrote.

    ``done`` maps each path already in the output to its error code (None when it succeeded). Opening
    an existing output cuts off a torn last line (``repaired`` is then True) and removes the error
    records for which ``redo(path, code)`` is true (``redone`` counts them), so that their images are
    done again and still appear once; any other unparsable line is a UsageError, since guessing could
    drop results.
    """

    def __init__(self, path: PathLike, fmt: str, overwrite: bool = False,
                 redo: Optional[Callable[[str, str], bool]] = None, tool: str = "rexnet-batch") -> None:
        self.path = Path(path)
        self.tool = tool
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
            raise UsageError(f"{self.path}: not a {self.tool} output ({e}); fix it or pass --overwrite") \
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
        return UsageError(f"{self.path}:{number}: not a {self.tool} {self.format} result line ({why}); "
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
            try:
                path = unescape_path(row[0])
            except ValueError as e:
                raise self._bad_line(rows.line_num, f"path field: {e}") from None
            entries.append((_csv_line(row), path, None if row[1] == "true" else row[6]))
        return entries

    def _write_line(self, line: str) -> None:
        self._file.write(line)
        self._file.flush()

    def write(self, item: InputItem, result: ImageResult) -> None:
        self._write_line(format_line(item, result, self.format))
        self.done[item.name] = result.error_code

    def flush(self) -> None:
        """Everything written so far on the disk (before a commit uploads the file)."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file.closed:
            return
        self.flush()
        self._file.close()
