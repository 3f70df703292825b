from __future__ import annotations

import asyncio
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Form, UploadFile
from pydantic import BeforeValidator

from index import Query, SearchHit
from runtime.query import image_query
from service import metrics
from service.deadline import Shed, bounded_wait, check_deadline, overloaded
from service.deps import AppState, get_state
from service.forms import Utf8FormRoute
from service.routes.common import check_explain, check_k, check_text, decode_upload, embed_image, embed_texts
from service.schemas import ImageSearchResults, TextSearch, TextSearchResults

router = APIRouter(tags=["search"], route_class=Utf8FormRoute)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def _search(
    state: AppState, query: Query, k: int, candidates: int, rerank: bool, explain: bool, timings: dict[str, float]
) -> dict:
    """Run the store's two-stage search on a search thread (bounded wait, the request's deadline)
    and format its hits; every number comes from the store. A sharded store (emkum serve-cluster)
    may answer without some shards: the response says so (`partial`, `missing_shards`)."""
    if explain:
        check_explain(state, k, int(np.asarray(query.mask).astype(bool).sum()))
    found: dict[str, float] = {}
    options = {
        "k": k,
        "candidates": candidates,
        "rerank": rerank,
        "explain": explain,
        "cls_weight": state.rerank.cls_weight,
        "timings": found,
        "threads": state.rerank_threads(),  # read now, while this request is in flight
    }
    check_deadline("search", state.settings.request_timeout_s)
    waiting = bounded_wait(
        "search", state.settings.max_queue_wait_ms / 1000, lambda: state.store.search(query, **options)
    )
    try:
        hits = await asyncio.get_running_loop().run_in_executor(state.search_pool, waiting)
    except Shed as exc:
        raise overloaded(str(exc)) from None
    for stage, seconds in found.items():
        metrics.STAGE_LATENCY.labels(stage).observe(seconds)
        timings[stage] = _ms(seconds)
    answer: dict = {"results": [_hit(h, state.store.grid) for h in hits]}
    if missing := getattr(hits, "missing_shards", None):
        answer.update(partial=True, missing_shards=missing)
    return answer


def _hit(h: SearchHit, grid: int | None) -> dict:
    row = {"id": h.id, "score": h.score, "cls_score": h.cls_score, "cmli_score": h.cmli_score, "metadata": h.metadata}
    if h.words is not None:
        row["matches"] = [
            {"token": w.label, "patch": w.best, "score": w.score, "heatmap": np.round(w.heatmap, 4).tolist()}
            for w in h.words
        ]
        row["grid"] = grid
    return row


@router.post("/search/text", response_model_exclude_unset=True)  # optional parts only when asked for
async def search_text(body: TextSearch, state: AppState = Depends(get_state)) -> TextSearchResults:
    """Text -> CLS ANN for `candidates` -> CMLI rerank -> top k. `explain` adds, per result, the patch
    each query word matched and its similarity over all patches."""
    start = time.perf_counter()
    text = check_text(state, body.query)
    k, candidates = check_k(state, body.k, body.candidates)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    (query,), (truncated,) = await embed_texts(state, [text])
    timings["encode"] = _ms(time.perf_counter() - t0)
    answer = await _search(state, query, k, candidates, body.rerank, body.explain, timings)
    timings["total"] = _ms(time.perf_counter() - start)
    return {**answer, "truncated": truncated, "candidates": candidates, "timings_ms": timings}


@router.post("/search/image", response_model_exclude_unset=True)  # optional parts only when asked for
async def search_image(
    file: Annotated[UploadFile, File(description="the query image")],
    k: Annotated[int, Form()] = 10,
    # a form cannot carry JSON's null: "" or "null" mean unset, as omitting the field does
    candidates: Annotated[int | None, BeforeValidator(lambda v: None if v in ("", "null") else v), Form()] = None,
    rerank: Annotated[bool, Form()] = True,
    explain: Annotated[bool, Form()] = False,
    state: AppState = Depends(get_state),
) -> ImageSearchResults:
    """Image -> CLS ANN -> patch-to-patch CMLI rerank (the query's patches play the words' part)."""
    start = time.perf_counter()
    k, candidates = check_k(state, k, candidates)
    timings: dict[str, float] = {}
    pixels = (await decode_upload(state, file)).pixels
    t0 = time.perf_counter()
    emb = await embed_image(state, pixels)
    timings["encode"] = _ms(time.perf_counter() - t0)
    query = image_query(emb)
    answer = await _search(state, query, k, candidates, rerank, explain, timings)
    timings["total"] = _ms(time.perf_counter() - start)
    return {**answer, "candidates": candidates, "timings_ms": timings}
