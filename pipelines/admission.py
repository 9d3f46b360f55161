"""Admission control for the service's front doors: a bounded number of requests inside the DAG, each
with a deadline and a way to be cancelled.

Paddle Serving's DAGExecutor takes every request it is handed: its queues grow without bound and a
request whose client has gone (or whose deadline passed) is still decoded and run through the model.
Every front door (rexnet_pipelines.frontdoor.FrontDoor, for every protocol) therefore admits a
request here first; its ticket travels in the request (rexnet_pipelines.request.ClassifyRequest):

* past ``max_in_flight`` admitted requests, a new one is refused at once (err_no 54 ``overloaded``,
  retryable) instead of queueing for seconds behind work the machine cannot finish in time;
* each admitted request carries a :class:`Ticket` with its deadline (the client's, or the configured
  default) and a cancelled flag set when its client disconnects; the ops look at the ticket before
  decoding and before inference and drop the request there (err_no 6000, Paddle Serving's TIMEOUT);
* the ticket also tells the infer op whether more requests are still being prepared, so auto-batching
  waits for them only when there is something to wait for (rexnet_pipelines.ops.InferOp).

Refusals are counted by reason in ``rexnet_refused_requests_total``.

Request bodies are admitted too, before they are read (:class:`BodyBudget`): the HTTP front doors of
every port take a share of one byte budget from a request's Content-Length (a chunked body: as its
chunks come), so that a few slow uploads cannot hold gigabytes while they trickle in.
"""
from __future__ import annotations

import threading
import time
from typing import Optional

from . import metrics

OVERLOADED, DEADLINE, CANCELLED, DRAINING = metrics.REFUSAL_REASONS


class Ticket:
    """One admitted request: its deadline (``time.monotonic()`` seconds), whether it still matters, and
    the key of the served model it went to (set by the prepare op; for the per-model metrics)."""

    __slots__ = ("deadline", "cancelled", "model", "_admission", "_preparing", "_released")

    def __init__(self, admission: "Admission", deadline: float) -> None:
        self.deadline = deadline
        self.cancelled = False
        self.model: Optional[str] = None
        self._admission = admission
        self._preparing = True
        self._released = False

    def cancel(self) -> None:
        """The client went away (gRPC cancellation, HTTP connection closed)."""
        self.cancelled = True

    def dropped_because(self) -> Optional[str]:
        """Why this request should not be worked on any more (CANCELLED, DEADLINE), or None."""
        if self.cancelled:
            return CANCELLED
        if time.monotonic() >= self.deadline:
            return DEADLINE
        return None

    def prepared(self) -> None:
        """The request left the prepare stage (decoded and preprocessed, or refused there)."""
        if self._preparing:
            self._preparing = False
            self._admission._prepared()

    def release(self) -> None:
        """The request was answered (idempotent)."""
        if not self._released:
            self._released = True
            self.prepared()
            self._admission._released()


class Overloaded(Exception):
    """The request was not admitted; the message says why in words."""


class Admission:
    """Counts what is inside the DAG and admits up to ``max_in_flight`` requests at a time."""

    def __init__(self, max_in_flight: int, default_timeout_s: float, max_body_bytes: int) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.max_in_flight = max_in_flight
        self.default_timeout_s = default_timeout_s
        self.bodies = BodyBudget(max_body_bytes)  # request bodies held by the HTTP front doors, all ports
        self._lock = threading.Lock()
        self._in_flight = 0
        self._preparing = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def preparing(self) -> int:
        """Admitted requests that have not reached the infer op yet."""
        return self._preparing

    def admit(self, timeout_s: Optional[float] = None) -> Ticket:
        """A ticket for a new request, or Overloaded. ``timeout_s``: the client's remaining deadline;
        the configured default applies when it is None or longer."""
        budget = self.default_timeout_s if timeout_s is None else min(timeout_s, self.default_timeout_s)
        with self._lock:
            if self._in_flight >= self.max_in_flight:
                metrics.REFUSED.labels(OVERLOADED).inc()
                raise Overloaded(f"overloaded: {self._in_flight} requests in progress, the limit is "
                                 f"{self.max_in_flight}; retry with backoff")
            self._in_flight += 1
            self._preparing += 1
        metrics.IN_FLIGHT.inc()
        return Ticket(self, time.monotonic() + budget)

    def _prepared(self) -> None:
        with self._lock:
            self._preparing -= 1

    def _released(self) -> None:
        with self._lock:
            self._in_flight -= 1
        metrics.IN_FLIGHT.dec()


class BodyBudget:
    """Bytes of request bodies the process holds (received or being received), shared by every HTTP
    connection of every port; a body that would pass ``max_bytes`` is refused before it is read."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._held = 0

    @property
    def held(self) -> int:
        return self._held

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes; False (nothing reserved) when that would pass the budget."""
        with self._lock:
            if self._held + size > self.max_bytes:
                return False
            self._held += size
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self._held -= size
