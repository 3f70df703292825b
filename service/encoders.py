"""ONNX Runtime encoders behind dynamic micro-batchers.

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

import numpy as np
import onnxruntime as ort

from service import metrics
from service.deadline import Shed


class QueueFull(Exception):
    pass


def choose_providers(preference: str) -> list[str]:
    """CUDA when asked for (or 'auto') and this onnxruntime build has it; CPU otherwise."""
    available = ort.get_available_providers()
    if preference in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def has_variant(card: dict, precision: str) -> bool:
    return precision == "fp32" or (f"image_{precision}" in card["files"] and f"text_{precision}" in card["files"])


def choose_precision(card: dict, preference: str, provider: str) -> str:
    """'auto': fp16 on CUDA when the model ships it; on CPU the graph the export chose (model.json
    `cpu.precision`: the fastest on the export machine within its parity tolerance, int8 for the
    default model). A named precision is served as asked.

    Asking for a variant the model was exported without is a configuration error, said at start-up,
    rather than a silent fall back to fp32."""
    if preference != "auto":
        if not has_variant(card, preference):
            raise ValueError(
                f"precision {preference} asked, but {card['name']} has no {preference} variant: "
                "re-export it with `emkum export`"
            )
        return preference
    if provider == "CUDAExecutionProvider":
        return "fp16" if has_variant(card, "fp16") else "fp32"
    chosen = card.get("cpu", {}).get("precision", "fp32")
    return chosen if has_variant(card, chosen) else "fp32"


def open_session(path: Path, providers: list[str], threads: int = 0, spinning: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime session. Spinning is off by default: the service runs FAISS and numpy on the
    same cores between encoder calls, and ONNX Runtime's threads spinning for work steal their time."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


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
            metrics.QUEUE_WAIT.labels(self.name).observe(j.waited)
            if j.waited > self.max_queue_wait:
                metrics.SHED.labels(self.name, "queue_wait").inc()
                j.future.set_exception(Shed(self.name, j.waited, self.max_queue_wait))
            else:
                fresh.append(j)
        return fresh

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5)


@dataclass
class ImageEmbedding:
    cls: np.ndarray  # [P]
    patches: np.ndarray  # [N, P]


@dataclass
class TextEmbedding:
    cls: np.ndarray  # [P]
    tokens: np.ndarray  # [L, P]
    mask: np.ndarray  # [L] 1 for words (not CLS, SEP or padding)


class Encoders:
    """The image and text graphs of one exported model, each behind its micro-batcher."""

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
    ) -> None:
        self.card = card
        self.providers = choose_providers(providers)
        self.precision = choose_precision(card, precision, self.providers[0])
        suffix = "" if self.precision == "fp32" else f"_{self.precision}"
        image_file, text_file = card["files"][f"image{suffix}"], card["files"][f"text{suffix}"]
        self.image_session = open_session(model_dir / image_file, self.providers, threads, spinning)
        self.text_session = open_session(model_dir / text_file, self.providers, threads, spinning)
        self.provider = self.image_session.get_providers()[0]
        bounds = (max_batch, max_wait_ms, queue_size, company, max_queue_wait_ms)
        self.image = MicroBatcher("image", self._run_images, *bounds)
        self.text = MicroBatcher("text", self._run_texts, *bounds)

    def embed_images_now(self, pixels: list[np.ndarray]) -> list[ImageEmbedding]:
        """One batched call, bypassing the queue (bulk indexing and evaluation)."""
        return self._run_images(pixels)

    def embed_tokens_now(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[TextEmbedding]:
        return self._run_texts(items)

    def _run_images(self, pixels: list[np.ndarray]) -> list[ImageEmbedding]:
        cls, patches = self.image_session.run(None, {"pixels": np.stack(pixels).astype(np.float32)})
        return [ImageEmbedding(cls[i], patches[i]) for i in range(len(pixels))]

    def _run_texts(self, items: list[tuple[np.ndarray, np.ndarray]]) -> list[TextEmbedding]:
        width = max(len(ids) for ids, _ in items)
        ids = np.zeros((len(items), width), dtype=np.int64)
        mask = np.zeros((len(items), width), dtype=np.int64)
        for i, (row_ids, row_mask) in enumerate(items):
            ids[i, : len(row_ids)] = row_ids
            mask[i, : len(row_mask)] = row_mask
        cls, tokens, word_mask = self.text_session.run(None, {"ids": ids, "mask": mask})
        out = []
        for i, (row_ids, _) in enumerate(items):
            n = len(row_ids)
            out.append(TextEmbedding(cls[i], tokens[i, :n], word_mask[i, :n]))
        return out

    def close(self) -> None:
        self.image.close()
        self.text.close()
