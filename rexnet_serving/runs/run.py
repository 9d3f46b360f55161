"""One run (or one shard of it) from its inputs to its committed result file.

``open_run`` lists the inputs, keeps this shard's (``runs.shards``), opens the result file (local, or
staged locally for a URL: ``runs.storage``) and skips what an earlier attempt already wrote. ``Run``
writes each result, commits the staged file to the object store every ``commit_seconds`` and when the
run stops, and keeps ``OUT.run.json`` beside the result file: what the shard has done so far, its
images/s and the model, which ``rexnet-batch merge`` reads. That file is written first, before any
image is read, so a store that refuses writes (no credentials, no bucket) fails the run at once.
"""
from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence

from ..results import ImageResult
from . import parquet, storage
from .inputs import InputItem, PathLike, collect_inputs
from .output import ResultWriter
from .shards import Shard, select, shard_output
from .summary import CommitError, RunSummary, UsageError

RUN_SUFFIX = ".run.json"
DEFAULT_COMMIT_SECONDS = 60.0


class Run:
    """The open result file of a run; ``todo`` are the images still to do."""

    def __init__(self, output: str, fmt: str, items: List[InputItem], *, shard: Optional[Shard],
                 overwrite: bool, redo: Collection[str], tool: str, model: Optional[Mapping[str, Any]],
                 commit_seconds: float) -> None:
        self.output, self.format, self.shard, self.tool = shard_output(output, shard), fmt, shard, tool
        self.model = dict(model) if model else None
        self.commit_seconds = commit_seconds
        if fmt == "parquet":
            parquet.schema()  # pyarrow missing is a usage error now, not after the work
        record_file = self.output + (parquet.JOURNAL_SUFFIX if fmt == "parquet" else "")
        self.remote: Optional[storage.RemoteOutput] = None
        if storage.is_url(self.output) and storage.file_url_path(self.output) is None:
            self.remote = storage.RemoteOutput(record_file, overwrite=overwrite)
            local = self.remote.local
        else:
            local = storage.file_url_path(record_file) or Path(record_file)
        self.previous = {} if overwrite else self._previous_stats()
        if self.previous.get("model") and self.model and \
                self.previous["model"].get("manifest_sha256") != self.model.get("manifest_sha256"):
            raise UsageError(f"{self.output}: written by another model ({self.previous['model']}); "
                             "pass --overwrite or another output")
        wanted = {item.name for item in items}
        redo_codes = frozenset(redo)
        self.writer = ResultWriter(local, "jsonl" if fmt == "parquet" else fmt, overwrite=overwrite,
                                   tool=tool, redo=lambda path, code: code in redo_codes and path in wanted)
        self.summary = RunSummary(output=self.output if self.remote else self.writer.path,
                                  total=len(items), tool=tool if shard is None else f"{tool} shard {shard}",
                                  repaired_torn_line=self.writer.repaired, redone=self.writer.redone)
        self.todo = [item for item in items if item.name not in self.writer.done]
        self.summary.skipped = len(items) - len(self.todo)
        self.summary.skipped_failed = sum(1 for item in items if self.writer.done.get(item.name) is not None)
        self.started = self.last_commit = time.monotonic()
        try:
            if overwrite and self.remote is not None:
                self.remote.commit()  # the old results go now, not at the first checkpoint
        except Exception as e:
            raise storage.access_error(self.output, e) from None
        self._write_stats(finished=False)  # before any work: a store that refuses writes fails here

    def _previous_stats(self) -> Dict[str, Any]:
        text = storage.read_text(self.output + RUN_SUFFIX)
        try:
            return json.loads(text) if text else {}
        except ValueError:
            return {}  # a damaged stats file only loses the earlier attempts' timing

    def write(self, item: InputItem, result: ImageResult) -> None:
        self.writer.write(item, result)
        self.summary.count(result)

    def checkpoint(self) -> None:
        """Commit the staged file and the stats when ``commit_seconds`` have passed since the last."""
        if time.monotonic() - self.last_commit >= self.commit_seconds:
            try:
                self._commit(finished=False)
            except Exception as e:  # the store's own retries are spent: try again at the next one
                self.last_commit = time.monotonic()
                print(f"{self.summary.tool}: warning: commit to {self.output} failed, retrying at the next "
                      f"({type(e).__name__}: {e})", file=sys.stderr, flush=True)

    def _commit(self, finished: bool) -> None:
        self.writer.flush()
        if self.remote is not None:
            self.remote.commit()
        self._write_stats(finished)
        self.last_commit = time.monotonic()

    def close(self, interrupted: bool) -> None:
        """Sync, write the Parquet file (if that is the format), commit; the stats say whether every
        input of this shard now has a record."""
        self.writer.close()
        if self.format == "parquet":
            journal = self.writer.path
            local = journal.with_name(journal.name[:-len(parquet.JOURNAL_SUFFIX)])
            parquet.write_from_journal(journal, local, self.model)
            if self.remote is not None:
                storage.copy_local(local, self.output)
        done = self.summary.skipped + self.summary.processed
        finished = not interrupted and done == self.summary.total
        try:
            self._commit(finished)
        except Exception as e:
            raise CommitError(f"{self.output}: the results could not be committed ({type(e).__name__}: "
                              f"{e}); a rerun resumes from the last commit") from None
        if finished and self.remote is not None:
            self.remote.discard_staging()  # all of it is in the store; a rerun downloads it

    def _write_stats(self, finished: bool) -> None:
        elapsed = time.monotonic() - self.started
        processed = self.previous.get("processed", 0) + self.summary.processed
        wall = self.previous.get("wall_seconds", 0.0) + elapsed
        stats = {
            "tool": self.tool, "shard": None if self.shard is None else str(self.shard),
            "output": self.output, "format": self.format, "inputs": self.summary.total,
            "done": self.summary.skipped + self.summary.processed, "finished": finished,
            "processed": processed, "wall_seconds": round(wall, 3),
            "images_per_second": round(processed / wall, 3) if wall > 0 else 0.0,
            "model": self.model or self.previous.get("model"),
            "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        storage.write_text(self.output + RUN_SUFFIX, json.dumps(stats, indent=2) + "\n")


def open_run(inputs: Sequence[PathLike], output: PathLike, fmt: str, overwrite: bool = False,
             redo: Collection[str] = (), tool: str = "rexnet-batch", *, shard: Optional[Shard] = None,
             model: Optional[Mapping[str, Any]] = None,
             commit_seconds: float = DEFAULT_COMMIT_SECONDS) -> Run:
    """Start or resume a run (this ``shard`` of it): the open Run, its ``todo`` the images still to do.

    Images already in the output are skipped unless ``overwrite``, or unless their record is an error
    whose code is in ``redo``: those are done again and their old records removed.
    """
    items = select(collect_inputs(inputs), shard)
    return Run(str(output), fmt, items, shard=shard, overwrite=overwrite, redo=redo, tool=tool,
               model=model, commit_seconds=commit_seconds)
