"""The application factory: settings -> loaded model, encoders and store -> routers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from index import VectorStore, one_thread_per_search
from runtime.modelcard import cls_dim, load_model_card, rerank_defaults, store_config
from runtime.tokenizer import TextTokenizer
from service import metrics
from service.batching import BatchedEncoders
from service.deps import AppState, available_cores
from service.errors import install_handlers, without_paths
from service.observe import Observe
from service.routes import embed, health, items, search, web
from service.schemas import ERROR_RESPONSES
from service.settings import Settings

log = logging.getLogger("emkum")


Backends = Callable[[AppState, dict], tuple[Any, Any]]


def local_backends(state: AppState, card: dict) -> tuple[BatchedEncoders, VectorStore]:
    """This process's own encoders (ONNX Runtime behind micro-batchers) and store (one data
    directory). `emkum serve-cluster` passes Serve deployments with the same methods instead."""
    s = state.settings
    encoders = BatchedEncoders(
        s.model_dir,
        card,
        s.providers,
        s.precision,
        s.intra_op_threads,
        s.ort_spinning,
        s.max_batch,
        s.max_wait_ms,
        s.queue_size,
        company=lambda: state.active_requests > 1,
        max_queue_wait_ms=s.max_queue_wait_ms,
        max_image_queue_wait_ms=s.max_image_queue_wait_ms,
    )
    store = VectorStore(
        s.data_dir,
        store_config(
            card,
            cls_factory=s.cls_factory,
            patch_codec=s.patch_codec,
            use_gpu=s.use_gpu_index,
            snapshot_every=s.snapshot_every,
            patch_pool=s.patch_pool,
            codec_training_vectors=s.codec_training_vectors,
            disk_reserve_bytes=s.disk_reserve_bytes,
        ),
    )
    return encoders, store


def load_state(state: AppState, backends: Backends = local_backends) -> None:
    s = state.settings
    card = load_model_card(s.model_dir)
    encoders, store = backends(state, card)
    state.tokenizer = TextTokenizer(s.model_dir / card["files"]["tokenizer"], card["text"]["max_length"])
    state.thumbs = Path(s.data_dir) / "thumbnails"
    if store.read_only:
        log.warning("data directory %s is read-only: serving its %d items, refusing writes", s.data_dir, len(store))
    else:
        state.thumbs.mkdir(parents=True, exist_ok=True)
    threads = s.search_threads or available_cores()
    state.search_pool = ThreadPoolExecutor(threads, thread_name_prefix="search", initializer=one_thread_per_search)
    state.card, state.encoders, state.store = card, encoders, store
    state.rerank = rerank_defaults(card)
    metrics.ITEMS.set(len(store))
    metrics.MODEL.info(
        {
            "model": card["name"],
            "provider": encoders.provider,
            "precision": encoders.precision,
            "dim": str(card["dim"]),
            "cls_dim": str(cls_dim(card)),
            "index_on_gpu": str(store.gpu).lower(),
            "cls_factory": s.cls_factory,
            "patch_codec": store.config.patch_codec,
            "patch_pool": str(store.config.patch_pool),
        }
    )


def create_app(settings: Settings | None = None, backends: Backends = local_backends) -> FastAPI:
    settings = settings or Settings()
    state = AppState(settings=settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            # off the event loop: the cluster's backends wait for their deployments' answers
            await asyncio.to_thread(load_state, state, backends)
            log.info("ready: %s on %s, %d items", state.card["name"], state.encoders.provider, len(state.store))
        except Exception as exc:  # keep serving /healthz and a /readyz that says why
            reason = f"{type(exc).__name__}: {exc}"
            log.error("not ready: %s", reason)  # the full text, paths included, for the operator
            state.load_error = without_paths(reason, settings)  # what /readyz and 503s tell clients
        yield
        if state.encoders:
            state.encoders.close()
        if state.search_pool:
            state.search_pool.shutdown(wait=True)
        if state.store:
            state.store.close()

    try:
        version = metadata.version("emkum-retrieval")
    except metadata.PackageNotFoundError:
        version = "0"
    app = FastAPI(
        title="EMKUM retrieval",
        version=version,
        lifespan=lifespan,
        description="Image search by text with fine-grained (CMLI) matching.",
        responses=ERROR_RESPONSES,
    )
    app.state.emkum = state
    install_handlers(app)
    body_limit = settings.max_files * settings.max_image_bytes + 1024 * 1024

    app.add_middleware(Observe, state=state, body_limit=body_limit)

    for router in (health.router, embed.router, items.router, search.router, web.router):
        app.include_router(router)
    return app
