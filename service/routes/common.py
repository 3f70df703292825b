"""Helpers the routes share: reading uploads, embedding a query, validating k and candidates."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

import numpy as np
from fastapi import UploadFile
from starlette.concurrency import run_in_threadpool

from index import Query
from runtime.encoders import ImageEmbedding
from runtime.images import PixelBudget
from runtime.ingest import PreparedImage, prepare_image
from runtime.query import text_queries
from service import metrics
from service.deps import AppState, run_encoder
from service.errors import ApiError

T = TypeVar("T")


async def read_upload(state: AppState, upload: UploadFile) -> bytes:
    limit = state.settings.max_image_bytes
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "image_too_large", f"{upload.filename}: more than {limit} bytes")
    return data


async def decode_upload(
    state: AppState, upload: UploadFile, thumbnail_size: int | None = None, budget: PixelBudget | None = None
) -> PreparedImage:
    """One uploaded file through runtime/ingest.py's `prepare_image`; 4xx on anything wrong with it.
    At most one decode per core runs at once (`state.decode_slots`): a request of 64 large files
    must not hold 64 decoded full-size images."""
    data = await read_upload(state, upload)
    s = state.settings
    async with state.decode_slots:
        start = time.perf_counter()
        prepared = await run_in_threadpool(
            prepare_image,
            data,
            upload.filename or "upload",
            state.card["image"],
            s.max_image_bytes,
            s.max_image_pixels,
            budget,
            thumbnail_size,
        )
        metrics.STAGE_LATENCY.labels("decode").observe(time.perf_counter() - start)
    return prepared


async def embed_image(state: AppState, pixels: np.ndarray) -> ImageEmbedding:
    return await run_encoder(state, "image", pixels)


async def embed_image_list(state: AppState, pixels: list[np.ndarray]) -> list[ImageEmbedding]:
    return await in_batches(state, "image", pixels)


async def in_batches(state: AppState, encoder: str, payloads: list) -> list:
    """The inputs of one request, submitted `max_batch` at a time so they batch together without one
    request taking more than a batch's room in the encoder's queue."""
    step = state.settings.max_batch
    out: list = []
    for start in range(0, len(payloads), step):
        out += await all_in_order([run_encoder(state, encoder, p) for p in payloads[start : start + step]])
    return out


async def all_in_order(awaitables: list[Awaitable[T]]) -> list[T]:
    """Run concurrently (the files of one request decode on several cores and reach the encoder's
    batcher together, instead of one batch of one after another); on failure, raise the error of
    the first failing input in request order, so the answer does not depend on timing."""
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def check_unicode(text: str, field: str) -> str:
    """JSON may carry lone UTF-16 surrogates (`"\\ud800"`), which no tokenizer, database or response
    can encode: refuse them here, by name, instead of failing later with a 500."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(422, "invalid_text", f"{field} is not valid Unicode text ({exc.reason} at {exc.start})") from exc
    return text


def check_text(state: AppState, text: str, field: str = "query") -> str:
    if not isinstance(text, str) or not text.strip():
        raise ApiError(422, "empty_text", f"{field} is empty")
    check_unicode(text, field)
    if len(text) > state.settings.max_query_chars:
        raise ApiError(
            413,
            "text_too_long",
            f"{field} has {len(text)} characters, the limit is {state.settings.max_query_chars}",
        )
    return text.strip()


async def embed_texts(state: AppState, texts: list[str]) -> tuple[list[Query], list[bool]]:
    """Texts -> queries (runtime/query.py) through the text micro-batcher; also whether each text
    was cut to the length limit."""
    start = time.perf_counter()
    batch = state.tokenizer(texts)
    metrics.STAGE_LATENCY.labels("tokenize").observe(time.perf_counter() - start)
    return text_queries(batch, await in_batches(state, "text", batch.rows())), batch.truncated


def request_budget(state: AppState) -> PixelBudget:
    return PixelBudget(state.settings.max_request_pixels)


def check_explain(state: AppState, k: int, query_vectors: int) -> None:
    """explain answers k x query vectors x item vectors numbers: refuse, naming the sizes, beyond the
    setting rather than build a response of gigabytes."""
    per_item = state.card["image"]["num_patches"] // state.store.config.patch_pool**2
    values = k * query_vectors * per_item
    limit = state.settings.max_explain_values
    if values > limit:
        raise ApiError(
            413,
            "explain_too_large",
            f"explain for k={k} would return {values} similarities ({query_vectors} query vectors x {per_item} "
            f"patches x k), the limit is {limit}: ask for k <= {max(1, limit // (query_vectors * per_item))}",
        )


def check_k(state: AppState, k: int, candidates: int | None) -> tuple[int, int]:
    """k and the number of CLS candidates to rerank (at least k; the model's own number if unset)."""
    s = state.settings
    if candidates is None:
        candidates = state.rerank.candidates
    if not 1 <= k <= s.max_k:
        raise ApiError(422, "k_out_of_range", f"k must be between 1 and {s.max_k}, got {k}")
    if not 1 <= candidates <= s.max_candidates:
        raise ApiError(
            422,
            "candidates_out_of_range",
            f"candidates must be between 1 and {s.max_candidates}, got {candidates}",
        )
    return k, max(k, candidates)
