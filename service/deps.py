"""Shared dependencies: the loaded state (settings, model, encoders, store), and the API key check."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Header, Request

from index import VectorStore
from runtime.modelcard import RerankDefaults
from runtime.tokenizer import TextTokenizer
from service.batching import BatchedEncoders, QueueFull
from service.deadline import Shed, overloaded, remaining
from service.errors import ApiError
from service.guards import key_matches
from service.settings import Settings


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one, as in containers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass
class AppState:
    settings: Settings
    card: dict[str, Any] | None = None
    rerank: RerankDefaults | None = None  # the card's K and score mix, read once at load
    encoders: BatchedEncoders | None = None
    store: VectorStore | None = None
    tokenizer: TextTokenizer | None = None
    thumbs: Path | None = None
    load_error: str | None = None  # why loading failed, as clients may see it (no paths)
    search_pool: ThreadPoolExecutor | None = None  # searches run here, one core each
    decode_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(available_cores()))
    active_requests: int = 0  # HTTP requests being served (the batchers wait for company only if > 1)

    def rerank_threads(self) -> int:
        """Cores for this search's rerank: all of them when its request is the only one in flight (they
        would idle otherwise; on 2 cores a lone rerank at K = 100 takes 1.9 ms instead of 2.7), one each
        when requests run side by side (each search already has a core; sharing would add contention)."""
        if self.active_requests > 1:
            return 1
        return self.settings.lone_search_threads or available_cores()

    @property
    def ready(self) -> bool:
        return self.encoders is not None and self.store is not None


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.emkum
    if not state.ready:
        raise ApiError(
            503,
            "not_ready",
            state.load_error or "the model and index are still loading",
            {"Retry-After": "5"},
        )
    return state


def require_api_key(request: Request, x_api_key: str | None = Header(default=None)) -> None:
    """Write endpoints need `X-API-Key` when a key is configured (reads too with EMKUM_PROTECT_READS,
    checked in service/guards.py for every route at once)."""
    if not key_matches(x_api_key, request.app.state.emkum.settings):
        raise ApiError(401, "unauthorized", "a valid X-API-Key header is required for this endpoint")


async def run_encoder(state: AppState, batcher_name: str, payload: Any) -> Any:
    """Submit one input to an encoder's micro-batcher and wait for it, until the request's deadline."""
    batcher = getattr(state.encoders, batcher_name)
    try:
        future = batcher.submit(payload)
    except QueueFull:
        raise overloaded(f"the {batcher_name} encoder queue is full") from None
    except Shed as exc:
        raise overloaded(str(exc)) from None
    left = max(0.0, remaining(state.settings.request_timeout_s))
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), left)
    except Shed as exc:
        raise overloaded(str(exc)) from None
    except TimeoutError:
        future.cancel()
        raise ApiError(
            504,
            "timeout",
            f"the {batcher_name} encoder did not answer within {state.settings.request_timeout_s} s",
        ) from None
