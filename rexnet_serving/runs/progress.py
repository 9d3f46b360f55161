"""Progress of a run on stderr: a tqdm bar on a terminal; elsewhere (a Kubernetes pod's log, a file)
one line every ``every`` seconds, naming the shard, so ``kubectl logs`` of any pod says where it is."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from tqdm import tqdm

from .summary import RunSummary

DEFAULT_LOG_SECONDS = 30.0


class Progress:
    def __init__(self, summary: RunSummary, todo: int, enabled: bool = True,
                 every: float = DEFAULT_LOG_SECONDS, stream: Optional[TextIO] = None,
                 min_images: int = 0) -> None:
        self.summary, self.todo, self.every = summary, todo, every
        self.stream = stream or sys.stderr
        enabled = enabled and todo >= min_images
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log = enabled and not self.tty
        self.bar = tqdm(total=todo, unit="img", desc=summary.tool, file=self.stream, disable=not self.tty)
        self.started = self.last = time.monotonic()
        if self.log:
            self._line("started")

    def _line(self, what: str) -> None:
        s = self.summary
        elapsed = time.monotonic() - self.started
        rate = s.processed / elapsed if elapsed > 0 else 0.0
        errors = ", ".join(f"{code}={n}" for code, n in sorted(s.errors.items()))
        print(f"{s.tool}: {what}: {s.skipped + s.processed}/{s.total} images ({s.skipped} from an earlier "
              f"attempt), {rate:.1f} images/s, failed {s.failed}" + (f" ({errors})" if errors else ""),
              file=self.stream, flush=True)

    def update(self, n: int) -> None:
        self.bar.update(n)
        if self.log and time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            self._line("progress")

    def close(self) -> None:
        self.bar.close()
