"""What a run over many images did, and its exit code: 0 every image succeeded, 1 some failed, 2 usage,
3 the results could not be committed to their object store (a rerun resumes from the last commit)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

from ..results import ImageResult

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_COMMIT = 0, 1, 2, 3


class UsageError(ValueError):
    """The inputs or the output cannot be used as given (no images found, unknown format, ...)."""


class CommitError(RuntimeError):
    """The final upload of a result file failed: what was classified since the last commit is redone
    by the next attempt (a Job's retry), so this exit code must be retried, unlike a UsageError."""


@dataclass
class RunSummary:
    """What a run did. ``processed`` counts images written by this run (errors included)."""
    output: Optional[Union[Path, str]]  # None when the records went to stdout; a str for a URL
    total: int
    tool: str = "rexnet-batch"
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
        if self.output is None:  # records on stdout: nothing to resume, nothing skipped
            lines = [f"{self.tool}: {self.total} images: {self.processed} processed"]
        else:
            lines = [f"{self.tool}: {self.total} images: {self.processed} processed, {self.skipped} "
                     "skipped (already in the output"
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

    def count(self, result: ImageResult) -> None:
        """Count one image this run wrote."""
        self.processed += 1
        if result.ok:
            self.succeeded += 1
        else:
            self.errors[result.error_code] = self.errors.get(result.error_code, 0) + 1


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, see runs.cli) during a run, raised after everything done so far was written
    and synced; carries the summary."""

    def __init__(self, summary: RunSummary) -> None:
        super().__init__("interrupted")
        self.summary = summary
