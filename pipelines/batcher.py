"""Auto-batching for the infer op: which requests go into the next forward pass, and how long to wait.

Paddle Serving's own generator (operator.py ``_auto_batching_generator``) waits up to
``auto_batching_timeout`` for each missing request whenever a batch is not full, so a lone request
always pays the timeout; MLServer's adaptive batcher waits up to ``max_batch_time`` for every partial
batch too. The wait policy here waits only when waiting can pay off:

1. block until the first request arrives;
2. take every request already queued (those that arrived while the previous pass ran), up to the size cap;
3. while the batch is not full, wait for more only while admitted requests are still being prepared
   (decoded and preprocessed: one is on its way), and at most ``timeout_s`` in all for this batch.

So a lone request never waits, and under load the wait is bounded by the time cap. The queue and the
"still preparing" count are passed in, so the policy is tested without Paddle Serving
(tests/test_batcher.py); rexnet_pipelines.paddle_adapter.BatchingOp adapts Paddle Serving's input
channel to ``BatchQueue``.
"""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Protocol


class BatchQueue(Protocol):
    def take(self, timeout: Optional[float]) -> Any:
        """The next request: block (``timeout`` None), only look (0), or wait up to ``timeout`` seconds;
        ``queue.Empty`` when none came."""


@dataclass
class Batch:
    items: List[Any]
    waited: float  # seconds spent waiting for requests still being prepared (0 when nothing was on its way)


class Batcher:
    """``next_batch(queue)``: up to ``max_size`` requests, with the wait policy of this module.

    ``timeout_s`` None: never wait for a request that is not queued yet. ``preparing()``: how many admitted
    requests are being prepared right now (rexnet_pipelines.admission.Admission.preparing).
    """

    def __init__(self, max_size: int, timeout_s: Optional[float], preparing: Callable[[], int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self.timeout_s = timeout_s
        self.preparing = preparing
        self.clock = clock

    def worth_waiting(self) -> bool:
        """The wait policy: a request is on its way (and waiting is allowed at all)."""
        return self.timeout_s is not None and self.preparing() > 0

    def next_batch(self, source: BatchQueue) -> Batch:
        items = [source.take(None)]
        waited, give_up_at = 0.0, None
        while len(items) < self.max_size:
            try:
                items.append(source.take(0))  # already queued: taken at once
                continue
            except queue.Empty:
                pass
            if not self.worth_waiting():
                break
            now = self.clock()
            give_up_at = give_up_at if give_up_at is not None else now + self.timeout_s
            if now >= give_up_at:
                break
            try:
                items.append(source.take(give_up_at - now))
            except queue.Empty:
                break
            finally:
                waited += self.clock() - now
        return Batch(items, waited)
