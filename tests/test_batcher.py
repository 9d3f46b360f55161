"""The infer op's auto-batching (rexnet_pipelines.batcher) against a fake queue on a fake clock: a lone
request never waits, queued requests are taken at once, the wait happens only while admitted requests are
still being prepared, size and time caps; and the adapter over Paddle Serving's real ThreadChannel."""
from __future__ import annotations

import queue
from collections import deque
from typing import Any, Iterable, Optional, Tuple

import pytest

from rexnet_pipelines.batcher import Batcher

TIMEOUT = 0.005  # serving_configs' auto_batching_timeout: 5 ms


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeQueue:
    """Requests queued now, and requests being prepared that arrive at given times. Waiting advances
    the clock instead of sleeping."""

    def __init__(self, clock: Clock, queued: Iterable[Any] = (), arriving: Iterable[Tuple[float, Any]] = ()) -> None:
        self.clock = clock
        self.ready = deque(queued)
        self.arriving = sorted(arriving)

    def preparing(self) -> int:
        return len(self.arriving)

    def _arrive(self) -> None:
        while self.arriving and self.arriving[0][0] <= self.clock.now:
            self.ready.append(self.arriving.pop(0)[1])

    def take(self, timeout: Optional[float]) -> Any:
        self._arrive()
        if self.ready:
            return self.ready.popleft()
        if self.arriving and (timeout is None or self.arriving[0][0] <= self.clock.now + timeout):
            self.clock.now = self.arriving[0][0]
            self._arrive()
            return self.ready.popleft()
        if timeout is None:
            raise AssertionError("would block forever")
        self.clock.now += timeout
        raise queue.Empty


def batcher(q: FakeQueue, max_size: int = 8, timeout: Optional[float] = TIMEOUT, preparing=None) -> Batcher:
    return Batcher(max_size, timeout, preparing or q.preparing, clock=q.clock)


def test_a_lone_request_never_waits():
    clock = Clock()
    q = FakeQueue(clock, queued=["a"])
    batch = batcher(q).next_batch(q)
    assert (batch.items, batch.waited, clock.now) == (["a"], 0.0, 0.0)


def test_the_first_request_is_waited_for_without_counting_it():
    clock = Clock()
    q = FakeQueue(clock, arriving=[(0.5, "a")])
    batch = batcher(q).next_batch(q)
    assert (batch.items, batch.waited, clock.now) == (["a"], 0.0, 0.5)


def test_queued_requests_are_taken_at_once():
    clock = Clock()
    q = FakeQueue(clock, queued="abc")
    batch = batcher(q).next_batch(q)
    assert (batch.items, batch.waited, clock.now) == (list("abc"), 0.0, 0.0)


def test_the_wait_happens_only_while_admitted_requests_are_being_prepared():
    clock = Clock()
    q = FakeQueue(clock, queued="ab", arriving=[(0.002, "c")])
    batch = batcher(q).next_batch(q)
    assert batch.items == list("abc") and batch.waited == pytest.approx(0.002)
    # the same arrival, not yet admitted (nothing in prepare): no wait
    clock = Clock()
    q = FakeQueue(clock, queued="ab", arriving=[(0.002, "c")])
    batch = batcher(q, preparing=lambda: 0).next_batch(q)
    assert (batch.items, batch.waited, clock.now) == (list("ab"), 0.0, 0.0)


def test_the_wait_stops_once_nothing_is_on_its_way():
    clock = Clock()
    q = FakeQueue(clock, queued="a", arriving=[(0.001, "b"), (0.002, "c")])
    # c's request is dropped in prepare (its deadline passed): only b is counted as on its way
    batch = batcher(q, preparing=lambda: 1 if clock.now < 0.001 else 0).next_batch(q)
    assert batch.items == ["a", "b"] and batch.waited == pytest.approx(0.001)


def test_the_wait_is_capped_in_total_per_batch():
    clock = Clock()
    q = FakeQueue(clock, queued="a", arriving=[(0.002, "b"), (0.004, "c"), (0.006, "d"), (0.008, "e")])
    batch = batcher(q).next_batch(q)
    assert batch.items == list("abc") and batch.waited == pytest.approx(TIMEOUT)
    assert clock.now == pytest.approx(TIMEOUT)
    following = batcher(q).next_batch(q)  # d is then waited for like a first request; e arrives in the window
    assert following.items == ["d", "e"] and following.waited == pytest.approx(0.002)


def test_a_request_that_never_comes_costs_at_most_the_timeout():
    clock = Clock()
    q = FakeQueue(clock, queued="a", arriving=[(1.0, "late")])
    batch = batcher(q).next_batch(q)
    assert batch.items == ["a"] and batch.waited == pytest.approx(TIMEOUT)


def test_no_timeout_means_never_wait():
    clock = Clock()
    q = FakeQueue(clock, queued="a", arriving=[(0.001, "b")])
    batch = batcher(q, timeout=None).next_batch(q)
    assert (batch.items, batch.waited, clock.now) == (["a"], 0.0, 0.0)


def test_batches_are_capped_in_size():
    clock = Clock()
    q = FakeQueue(clock, queued=range(10), arriving=[(0.001, 10)])
    b = batcher(q, max_size=4)
    sizes = [len(b.next_batch(q).items) for _ in range(3)]
    assert sizes == [4, 4, 3] and clock.now == pytest.approx(0.001)  # the full ones never waited
    with pytest.raises(ValueError, match="max_size must be >= 1"):
        Batcher(0, TIMEOUT, lambda: 0)


def test_the_op_adapts_paddle_servings_thread_channel(tmp_path, monkeypatch):
    """The Paddle adapter over the real ThreadChannel: fails here if Paddle Serving's channel changes."""
    monkeypatch.chdir(tmp_path)  # importing Paddle Serving's pipeline writes logs into the cwd
    from paddle_serving_server.pipeline.channel import ChannelData, ChannelDataType, ThreadChannel
    from rexnet_pipelines.paddle_adapter import _ChannelQueue

    channel = ThreadChannel(name="prepare->infer", maxsize=8)
    channel.add_producer("prepare")
    channel.add_consumer("infer")
    for data_id in (1, 2):
        channel.push(ChannelData(ChannelDataType.DICT.value, dictdata={"n": data_id}, data_id=data_id, log_id=0),
                     "prepare")
    source = _ChannelQueue(channel, "infer")
    batch = Batcher(8, TIMEOUT, lambda: 1).next_batch(source)
    assert [item["prepare"].dictdata["n"] for item in batch.items] == [1, 2]
    assert 0 < batch.waited < 5  # waited for the one in prepare (it never came), then gave up
    with pytest.raises(queue.Empty):
        source.take(0)
