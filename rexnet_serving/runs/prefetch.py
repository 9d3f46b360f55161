"""Decode ahead: a small thread pool prepares the next batches while the caller runs the current one.

Why threads: OpenCV's decoders release the GIL, so two decode threads keep a folder of large JPEGs
flowing while Paddle's math threads run the model; a process pool would copy every decoded image
between processes. ``concurrent.futures`` does the pooling; this module only keeps the window bounded
(``ahead`` batches), so memory stays at a few batches whatever the folder size.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Deque, Iterator, List, Sequence, Tuple, TypeVar

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_WORKERS = 2
DEFAULT_AHEAD = 2


def prefetched_batches(items: Sequence[T], batch_size: int, prepare: Callable[[T], R],
                       workers: int = DEFAULT_WORKERS, ahead: int = DEFAULT_AHEAD
                       ) -> Iterator[List[Tuple[T, R]]]:
    """Yield ``[(item, prepare(item)), ...]`` per batch of ``batch_size`` items, in input order.

    ``prepare`` runs on ``workers`` threads, up to ``ahead`` batches beyond the one being yielded. It
    should turn expected failures into values (an error result); an exception it raises is re-raised
    here when its batch comes up. Closing the generator (or an exception in the caller) cancels what
    has not started.
    """
    if batch_size < 1 or workers < 1 or ahead < 0:
        raise ValueError(f"batch_size and workers must be >= 1 and ahead >= 0, got "
                         f"{batch_size}, {workers}, {ahead}")
    batches = (items[i:i + batch_size] for i in range(0, len(items), batch_size))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rexnet-decode")
    pending: Deque[Tuple[Sequence[T], List["Future[R]"]]] = deque()

    def submit_next() -> None:
        batch = next(batches, None)
        if batch is not None:
            pending.append((batch, [pool.submit(prepare, item) for item in batch]))

    try:
        for _ in range(ahead + 1):
            submit_next()
        while pending:
            batch, futures = pending.popleft()
            submit_next()
            yield [(item, future.result()) for item, future in zip(batch, futures)]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
