"""The Parquet result file (``--format parquet``, pyarrow: the ``parquet`` extra).

Schema, one row per image (the JSONL record's content, flattened for query engines):

    path             string          the image's canonical name (resolved path or URL)
    label            string, null    a list file's label, if any
    ok               bool
    class_ids        list<int32>     top-k class ids, best first (empty on error)
    labels           list<string>    their class names
    scores           list<float64>   their probabilities
    error_code       string, null    the error code (null when ok)
    error_message    string, null
    model_name       string, null    the export's arch (null through a service, which does not say)
    model_version    string, null    the export's version in its repository (1 for a bare export)
    manifest_sha256  string, null    the export's manifest digest (manifest.json ``content_sha256``)

Parquet cannot be appended to, so a run keeps its resumable record in a JSONL journal beside the file
(``OUT.parquet.journal.jsonl``, the same lines as ``--format jsonl``) and writes the Parquet file from it
whenever the run stops (finished or interrupted); the journal stays so that a rerun resumes from it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional

from .summary import UsageError

JOURNAL_SUFFIX = ".journal.jsonl"


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
        return pyarrow
    except ImportError as e:
        raise UsageError(f"--format parquet needs pyarrow (pip install 'rexnet-serving[parquet]'): {e}") \
            from None


def schema() -> Any:
    pa = _pyarrow()
    return pa.schema([
        ("path", pa.string()), ("label", pa.string()), ("ok", pa.bool_()),
        ("class_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float64())), ("error_code", pa.string()), ("error_message", pa.string()),
        ("model_name", pa.string()), ("model_version", pa.string()), ("manifest_sha256", pa.string()),
    ])


def write_from_journal(journal: Path, target: Path, model: Optional[Mapping[str, Any]]) -> None:
    """``target`` (a local file, replaced atomically) from the JSONL journal's records."""
    pa = _pyarrow()
    model = model or {}
    columns: Dict[str, list] = {name: [] for name in schema().names}
    with journal.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            predictions = record.get("predictions") or []
            error = record.get("error") or {}
            for name, value in (("path", record["path"]), ("label", record.get("label")),
                                ("ok", bool(record["ok"])),
                                ("class_ids", [int(p["class_id"]) for p in predictions]),
                                ("labels", [str(p["label"]) for p in predictions]),
                                ("scores", [float(p["score"]) for p in predictions]),
                                ("error_code", error.get("code")), ("error_message", error.get("message")),
                                ("model_name", model.get("name")), ("model_version", model.get("version")),
                                ("manifest_sha256", model.get("manifest_sha256"))):
                columns[name].append(value)
    table = pa.table(columns, schema=schema())
    temporary = target.with_name(target.name + ".tmp")
    pa.parquet.write_table(table, temporary)
    temporary.replace(target)


def read_records(source: Any) -> Iterator[Dict[str, Any]]:
    """(path, ok, error_code) of every row of a Parquet result file (a local path or an open file)."""
    pa = _pyarrow()
    table = pa.parquet.read_table(source, columns=["path", "ok", "error_code"])
    for row in table.to_pylist():
        yield row
