from __future__ import annotations

import asyncio
import functools
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Form, UploadFile
from pydantic import BeforeValidator

from runtime.modelcard import rerank_defaults
from service import metrics
from service.deadline import Shed, bounded_wait, check_deadline, overloaded
from service.deps import AppState, get_state
from service.forms import Utf8FormRoute
from service.routes.common import check_explain, check_k, check_text, decode_upload, embed_image, embed_texts
from service.schemas import ImageSearchResults, TextSearch, TextSearchResults

router = APIRouter(tags=["search"], route_class=Utf8FormRoute)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


async def _search(state: AppState, q_cls, q_tok, q_mask, k, candidates, rerank, explain, timings, words=None):
    if explain:
        check_explain(state, k, int(np.asarray(q_mask).astype(bool).sum()))
    found: dict[str, float] = {}
    cls_weight = rerank_defaults(state.card).cls_weight
    search = functools.partial(  # threads: the load is read here, when the request is in flight
        state.store.search,
        q_cls,
        q_tok,
        q_mask,
        k,
        candidates,
        rerank,
        explain,
        cls_weight,
        found,
        threads=state.rerank_threads(),
    )
    check_deadline("search", state.settings.request_timeout_s)
    bound = state.settings.max_queue_wait_ms / 1000
    try:
        hits = await asyncio.get_running_loop().run_in_executor(
            state.search_pool, bounded_wait("search", bound, search)
        )
    except Shed as exc:
        raise overloaded(str(exc)) from None
    for stage, seconds in found.items():
        metrics.STAGE_LATENCY.labels(stage).observe(seconds)
        timings[stage] = _ms(seconds)
    results = []
    keep = q_mask.astype(bool) if q_mask is not None else None
    for h in hits:
        row = {
            "id": h.id,
            "score": h.score,
            "cls_score": h.cls_score,
            "cmli_score": h.cmli_score,
            "metadata": h.metadata,
        }
        if explain and h.similarities is not None:
            sims = h.similarities  # [words, patches]: the heatmap of each word
            labels = [w for w, k_ in zip(words, keep, strict=False) if k_] if words else list(range(len(sims)))
            row["matches"] = [
                {
                    "token": str(label),
                    "patch": int(s.argmax()),
                    "score": float(s.max()),
                    "heatmap": np.round(s, 4).tolist(),
                }
                for label, s in zip(labels, sims, strict=True)
            ]
            row["grid"] = state.card["image"]["grid"] // state.store.config.patch_pool
        results.append(row)
    return results


@router.post("/search/text", response_model_exclude_unset=True)  # optional parts only when asked for
async def search_text(body: TextSearch, state: AppState = Depends(get_state)) -> TextSearchResults:
    """Text -> CLS ANN for `candidates` -> CMLI rerank -> top k. `explain` adds, per result, the patch
    each query word matched and its similarity over all patches."""
    start = time.perf_counter()
    query = check_text(state, body.query)
    k, candidates = check_k(state, body.k, body.candidates)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    (emb,), (truncated,), (words,) = await embed_texts(state, [query])
    timings["encode"] = _ms(time.perf_counter() - t0)
    results = await _search(
        state, emb.cls, emb.tokens, emb.mask, k, candidates, body.rerank, body.explain, timings, words
    )
    timings["total"] = _ms(time.perf_counter() - start)
    return {"results": results, "truncated": truncated, "candidates": candidates, "timings_ms": timings}


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
    mask = np.ones(len(emb.patches), dtype=np.float32)
    results = await _search(state, emb.cls, emb.patches, mask, k, candidates, rerank, explain, timings)
    timings["total"] = _ms(time.perf_counter() - start)
    return {"results": results, "candidates": candidates, "timings_ms": timings}
