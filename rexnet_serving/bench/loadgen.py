"""Load generation: closed loop (N clients back to back) and open loop (a fixed arrival rate).

Closed loop: ``concurrency`` threads, each with its own client (its own connection, reused), send the
next request as soon as the previous one returns. This finds the throughput at a given concurrency but
hides queueing: a slow answer delays the next send ("coordinated omission", Gil Tene, "How NOT to Measure
Latency", 2013).

Open loop: send times are fixed in advance (Poisson arrivals: exponential gaps, or uniform gaps) and each
latency is measured from the *scheduled* send time, as wrk2 does, so a request that could not even be
sent on time because every connection was busy is charged for the wait. Overload then shows up in the
tail instead of disappearing.

Both discard the warm-up: latency statistics cover requests started (or scheduled) inside the measured
window, throughput counts images answered inside it. A failed request (exception, or an image answered
with an error) is counted, never timed as a success.

Threads are enough for the load side: clients block in socket I/O (the GIL is released) and their
Python work per request is small; rexnet-bench measures that cost (CPU seconds of this process per
request) so the report shows the generator was not the bottleneck.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence

import numpy as np

ARRIVALS = ("poisson", "uniform")


class Sender(Protocol):
    def send(self, data: bytes) -> None:
        """Send one request with one encoded image; raise on any failure (transport or result)."""

    def close(self) -> None:
        ...


SenderFactory = Callable[[], Sender]


class Window(Protocol):
    """Told when the measured window opens and closes (resource monitors hook in here)."""

    def begin(self) -> None:
        ...

    def end(self) -> None:
        ...


@dataclass
class Sample:
    start: float          # closed loop: actual send time; open loop: scheduled send time
    end: float
    sent: float           # actual send time (open loop: minus ``start`` = how late it went out)
    error: Optional[str]  # None on success


@dataclass
class RunResult:
    samples: List[Sample]
    window_start: float
    window_end: float
    mode: str
    level: float          # concurrency (closed) or requests/s (open)

    def summary(self) -> Dict[str, Any]:
        return summarize(self.samples, self.window_start, self.window_end)


def summarize(samples: Sequence[Sample], window_start: float, window_end: float) -> Dict[str, Any]:
    """Throughput, latency percentiles (ms) and errors of the requests inside the window."""
    measured = [s for s in samples if window_start <= s.start < window_end]
    ok = np.array([s.end - s.start for s in measured if s.error is None], np.float64) * 1000.0
    answered = sum(1 for s in samples if s.error is None and window_start <= s.end <= window_end)
    seconds = window_end - window_start
    lag = np.array([s.sent - s.start for s in measured], np.float64) * 1000.0
    errors = Counter(s.error for s in measured if s.error is not None)
    stats: Dict[str, Any] = {
        "requests": len(measured), "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(3)),
        "images_per_s": round(answered / seconds, 2) if seconds > 0 else 0.0,
        "window_s": round(seconds, 2),
    }
    for name, q in (("p50", 50), ("p90", 90), ("p99", 99)):
        stats[f"{name}_ms"] = round(float(np.percentile(ok, q)), 2) if ok.size else None
    stats["mean_ms"] = round(float(ok.mean()), 2) if ok.size else None
    stats["max_ms"] = round(float(ok.max()), 2) if ok.size else None
    stats["send_lag_p99_ms"] = round(float(np.percentile(lag, 99)), 2) if lag.size else None
    return stats


def _timed_send(sender: Sender, data: bytes) -> Optional[str]:
    try:
        sender.send(data)
        return None
    except Exception as exc:  # noqa: BLE001 - every failure is a data point, kept by its type
        return type(exc).__name__


def _clock(window: Optional[Window], begin_at: float, end_at: float, stop: threading.Event) -> None:
    if window is None:
        return
    if not stop.wait(max(0.0, begin_at - time.perf_counter())):
        window.begin()
        stop.wait(max(0.0, end_at - time.perf_counter()))
        window.end()


def _run(workers: int, factory: SenderFactory, body: Callable[[int, Sender, float], None],
         warmup: float, duration: float, window: Optional[Window]) -> float:
    """Open ``workers`` clients, start them together, return the common start time after they finish."""
    senders = [factory() for _ in range(workers)]
    barrier = threading.Barrier(workers + 1)
    start_box: List[float] = []

    def worker(index: int) -> None:
        barrier.wait()
        body(index, senders[index], start_box[0])

    threads = [threading.Thread(target=worker, args=(i,), name=f"load-{i}", daemon=True) for i in range(workers)]
    for thread in threads:
        thread.start()
    start_box.append(time.perf_counter() + 0.05)  # every worker is parked at the barrier by then
    stop = threading.Event()
    clock = threading.Thread(target=_clock, args=(window, start_box[0] + warmup,
                                                  start_box[0] + warmup + duration, stop), daemon=True)
    clock.start()
    barrier.wait()
    try:
        for thread in threads:
            thread.join()
    finally:
        clock.join(timeout=duration + warmup + 5)
        stop.set()
        for sender in senders:
            sender.close()
    return start_box[0]


def closed_loop(factory: SenderFactory, payloads: Sequence[bytes], concurrency: int, duration: float,
                warmup: float, window: Optional[Window] = None) -> RunResult:
    """``concurrency`` clients sending back to back for ``warmup + duration`` seconds."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    samples: List[Sample] = []

    def body(index: int, sender: Sender, t0: float) -> None:
        time.sleep(max(0.0, t0 - time.perf_counter()))
        end_at = t0 + warmup + duration
        # Worker i sends payloads i, i+N, i+2N, ...: every image is in flight, none twice at once.
        for n in itertools.count():
            start = time.perf_counter()
            if start >= end_at:
                return
            error = _timed_send(sender, payloads[(index + n * concurrency) % len(payloads)])
            samples.append(Sample(start, time.perf_counter(), start, error))

    t0 = _run(concurrency, factory, body, warmup, duration, window)
    return RunResult(samples, t0 + warmup, t0 + warmup + duration, "closed", concurrency)


def arrival_offsets(rate: float, seconds: float, arrivals: str, seed: int = 0) -> np.ndarray:
    """Send times (s from the start) of a ``rate`` requests/s stream over ``seconds``."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if arrivals not in ARRIVALS:
        raise ValueError(f"arrivals must be one of {', '.join(ARRIVALS)}, not {arrivals!r}")
    count = int(np.ceil(rate * seconds * 1.2)) + 16
    if arrivals == "uniform":
        gaps = np.full(count, 1.0 / rate)
    else:
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, count)
    offsets = np.cumsum(gaps) - gaps[0]
    return offsets[offsets < seconds]


def open_loop(factory: SenderFactory, payloads: Sequence[bytes], rate: float, duration: float,
              warmup: float, arrivals: str = "poisson", max_outstanding: int = 64,
              window: Optional[Window] = None, seed: int = 0) -> RunResult:
    """Requests at ``rate``/s on a fixed schedule; latency from the scheduled time.

    ``max_outstanding`` clients take the scheduled sends in order; when all are busy the next send goes
    out late and its latency includes the delay.
    """
    if max_outstanding < 1:
        raise ValueError(f"max_outstanding must be >= 1, got {max_outstanding}")
    offsets = arrival_offsets(rate, warmup + duration, arrivals, seed)
    tickets = itertools.count()  # next() on itertools.count is atomic under the GIL
    samples: List[Sample] = []

    def body(index: int, sender: Sender, t0: float) -> None:
        while True:
            i = next(tickets)
            if i >= len(offsets):
                return
            scheduled = t0 + offsets[i]
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent = time.perf_counter()
            error = _timed_send(sender, payloads[i % len(payloads)])
            samples.append(Sample(scheduled, time.perf_counter(), sent, error))

    t0 = _run(max_outstanding, factory, body, warmup, duration, window)
    return RunResult(samples, t0 + warmup, t0 + warmup + duration, "open", rate)
