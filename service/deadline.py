"""Bounded waiting: each request has a deadline from its arrival, and no queue holds work longer
than `max_queue_wait_ms`.

Why: under overload a queue that only refuses when full (256 places) let text search at 2,000
clients reach an 11 s median with no 503 ever sent; clients had long given up on the answers the
server was still computing. Work that has waited past the bound is refused with 503 + Retry-After
(the client retries or goes elsewhere) instead of being done late, and a request past its deadline
stops before its next stage. Both count in `emkum_shed_total{stage, reason}`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import TypeVar

from service import metrics
from service.errors import ApiError

T = TypeVar("T")

_arrived: ContextVar[float | None] = ContextVar("emkum_request_arrived", default=None)


class Shed(Exception):
    """Work refused because it waited too long; `stage` names where."""

    def __init__(self, stage: str, waited_s: float, bound_s: float) -> None:
        super().__init__(f"{stage}: waited {waited_s * 1000:.0f} ms, the bound is {bound_s * 1000:.0f} ms")
        self.stage = stage


def mark_arrival() -> None:
    """Called by the HTTP middleware when a request arrives (the context reaches the route)."""
    _arrived.set(time.monotonic())


def remaining(deadline_s: float) -> float:
    """Seconds left of the request's deadline (the whole deadline outside a request)."""
    arrived = _arrived.get()
    return deadline_s if arrived is None else deadline_s - (time.monotonic() - arrived)


def check_deadline(stage: str, deadline_s: float) -> None:
    """Stop a request that is past its deadline before it starts `stage`."""
    if remaining(deadline_s) <= 0:
        metrics.SHED.labels(stage, "deadline").inc()
        raise overloaded(f"the request passed its {deadline_s} s deadline before {stage}")


def overloaded(message: str) -> ApiError:
    return ApiError(503, "overloaded", f"{message}; retry shortly", {"Retry-After": "1"})


def too_late(stage: str, waited_s: float, bound_s: float) -> Shed | None:
    """Record a queue wait; the Shed to answer with when it passed the bound (counted), else None.
    One rule for the encoders' batchers and the search threads."""
    metrics.QUEUE_WAIT.labels(stage).observe(waited_s)
    if waited_s <= bound_s:
        return None
    metrics.SHED.labels(stage, "queue_wait").inc()
    return Shed(stage, waited_s, bound_s)


def bounded_wait(stage: str, bound_s: float, work: Callable[[], T]) -> Callable[[], T]:
    """`work` wrapped for a thread pool: it refuses to start (Shed) if it waited in the pool's
    queue longer than `bound_s`."""
    queued = time.monotonic()

    def run() -> T:
        shed = too_late(stage, time.monotonic() - queued, bound_s)
        if shed is not None:
            raise shed
        return work()

    return run
