"""Dynamic micro-batching in front of the runtime's encoders.

Concurrent requests put their inputs on a bounded queue; one worker thread per encoder takes up to
`max_batch` inputs, waiting at most `max_wait_ms` for more after the first, runs one batched
session call and resolves each request's future. A full queue refuses new work at once, and an input
that waited longer than `max_queue_wait_ms` is refused instead of run late (the route answers 503
with Retry-After either way) rather than letting a backlog and its latency grow without bound."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.encoders import Encoders
from service import metrics
from service.deadline import Shed, too_late


class QueueFull(Exception):
    pass


@dataclass
class _Job:
    payload: Any
    future: Future
    queued: float  # time.monotonic() at submit
    waited: float = 0.0  # from submit until the worker took it (a batch's gathering window excluded)


class MicroBatcher:
    """Collects single inputs into batches for `run_batch(list) -> list`."""

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list], list],
        max_batch: int,
        max_wait_ms: float,
        queue_size: int,
        company: Callable[[], bool] | None = None,
        max_queue_wait_ms: float = float("inf"),
    ) -> None:
        """`company()` says whether other requests are being served that might still join a batch;
        when it says no and nothing is queued, a lone input runs at once instead of waiting
        `max_wait_ms` for company that cannot come (one client paid the whole wait on every query)."""
        self.name = name
        self.company = company
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.max_queue_wait = max_queue_wait_ms / 1000
        self.last_wait = 0.0  # how long the latest batch's oldest input had waited
        self.queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self.thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self.thread.start()

    def submit(self, payload: Any) -> Future:
        future: Future = Future()
        if self.last_wait > self.max_queue_wait and not self.queue.empty():
            # the queue is already past its bound: refuse now rather than after the same wait
            metrics.SHED.labels(self.name, "queue_wait").inc()
            raise Shed(self.name, self.last_wait, self.max_queue_wait)
        try:
            self.queue.put_nowait(_Job(payload, future, time.monotonic()))
        except queue.Full:
            metrics.QUEUE_REJECTIONS.labels(self.name).inc()
            raise QueueFull(self.name) from None
        metrics.QUEUE_DEPTH.labels(self.name).set(self.queue.qsize())
        return future

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            first.waited = time.monotonic() - first.queued
            jobs = [first]
            alone = self.queue.empty() and self.company is not None and not self.company()
            deadline = time.monotonic() + (0.0 if alone else self.max_wait)
            while len(jobs) < self.max_batch:
                remaining = deadline - time.monotonic()
                try:
                    job = self.queue.get(timeout=remaining) if remaining > 0 else self.queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self.queue.put(None)
                    break
                job.waited = time.monotonic() - job.queued
                jobs.append(job)
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            metrics.QUEUE_DEPTH.labels(self.name).set(self.queue.qsize())
            jobs = self._shed_stale(jobs)
            if not jobs:
                continue
            metrics.BATCH_SIZE.labels(self.name).observe(len(jobs))
            start = time.perf_counter()
            try:
                results = self.run_batch([j.payload for j in jobs])
            except Exception as exc:  # the batch fails, the worker lives on
                for j in jobs:
                    j.future.set_exception(exc)
                continue
            metrics.STAGE_LATENCY.labels(f"encode_{self.name}").observe(time.perf_counter() - start)
            for j, r in zip(jobs, results, strict=True):
                j.future.set_result(r)

    def _shed_stale(self, jobs: list[_Job]) -> list[_Job]:
        """The jobs still worth running; those that waited past the bound get Shed."""
        self.last_wait = max((j.waited for j in jobs), default=0.0)
        fresh = []
        for j in jobs:
            shed = too_late(self.name, j.waited, self.max_queue_wait)
            if shed is not None:
                j.future.set_exception(shed)
            else:
                fresh.append(j)
        return fresh

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5)


class BatchedEncoders(Encoders):
    """The encoders with a micro-batcher in front of each graph (`.image`, `.text`)."""

    def __init__(
        self,
        model_dir: Path,
        card: dict,
        providers: str = "auto",
        precision: str = "fp32",
        threads: int = 0,
        spinning: bool = False,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        queue_size: int = 256,
        company: Callable[[], bool] | None = None,
        max_queue_wait_ms: float = float("inf"),
        max_image_queue_wait_ms: float = float("inf"),
    ) -> None:
        super().__init__(model_dir, card, providers, precision, threads, spinning)
        bounds = (max_batch, max_wait_ms, queue_size, company)
        self.image = MicroBatcher("image", self.embed_images_now, *bounds, max_image_queue_wait_ms)
        self.text = MicroBatcher("text", self.embed_tokens_now, *bounds, max_queue_wait_ms)

    def close(self) -> None:
        self.image.close()
        self.text.close()
