"""The HTTP API's request and response bodies, in one place: FastAPI documents them in
`/openapi.json` (so a client can be generated from it, and schemathesis checks every response
against it) and validates what the routes return."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable kind, e.g. invalid_image, overloaded")
    message: str = Field(description="what was wrong, for a person")


class ErrorBody(BaseModel):
    error: ErrorDetail


# every route may answer these; the app documents them once (service/app.py)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "the body could not be read (a form field that is not UTF-8, a bad Host)",
        401: "an X-API-Key is needed",
        403: "a cross-site write from a browser",
        404: "no such item or route",
        413: "a request larger than a limit (files, pixels, explain size)",
        422: "an invalid value (the message names it)",
        503: "not ready, or overloaded (Retry-After)",
        504: "the encoder did not answer before the request's deadline",
        507: "writes are refused (full or read-only disk); reads still work",
    }.items()
}


class Health(BaseModel):
    status: str


class ShardState(BaseModel):
    shard: int
    state: str = Field(description="up, reads_only (its writer is down; searches whole, writes refused) or down")
    items: int | None = None
    node: str | None = Field(None, description="the Ray node it runs on")


class Ready(BaseModel):
    status: str = Field(description="ready or not_ready")
    model: str | None = None
    provider: str | None = None
    precision: str | None = None
    items: int | None = None
    index_on_gpu: bool | None = None
    read_only: bool | None = None
    cls_factory: str | None = None
    patch_codec: str | None = None
    patch_pool: int | None = None
    shards: list[ShardState] | None = Field(None, description="emkum serve-cluster: each index shard")
    error: str | None = Field(None, description="why loading failed (no filesystem paths)")


# Bounds the routes check themselves (service/routes/common.py), so that each refusal has its own
# error code (empty_text, k_out_of_range, ...): documented in the schema, not validated twice.
NOT_BLANK = {"minLength": 1, "pattern": r"\S"}
AT_LEAST_ONE = {"minimum": 1}
# JSON bodies are taken as typed: `"explain": 0` or `"k": "10"` is a 422, not quietly coerced
STRICT = ConfigDict(strict=True)


class TextSearch(BaseModel):
    model_config = STRICT
    query: str = Field(json_schema_extra=NOT_BLANK, description="at most EMKUM_MAX_QUERY_CHARS characters")
    k: int = Field(10, json_schema_extra=AT_LEAST_ONE, description="results; at most EMKUM_MAX_K")
    candidates: int | None = Field(
        None,
        json_schema_extra=AT_LEAST_ONE,
        description="CLS candidates to rerank; null: the model's own (model.json rerank.candidates)",
    )
    rerank: bool = True
    explain: bool = False


class TextRequest(BaseModel):
    model_config = STRICT
    texts: list[str] = Field(min_length=1, json_schema_extra={"items": {"type": "string", **NOT_BLANK}})
    tokens: bool = False


class WordMatch(BaseModel):
    token: str = Field(description="the query word (or the query patch's index for an image query)")
    patch: int = Field(description="the index of the item's patch it matched best, row-major on the grid")
    score: float
    heatmap: list[float] = Field(description="its similarity to every patch of the item")


class Hit(BaseModel):
    id: str
    score: float = Field(description="what the results are ordered by (fused when reranked)")
    cls_score: float
    cmli_score: float | None = Field(description="null when the hit was not reranked")
    metadata: dict[str, Any]
    matches: list[WordMatch] | None = Field(None, description="with explain: one per query word")
    grid: int | None = Field(None, description="with explain: patches per side of the heatmaps")


class TextSearchResults(BaseModel):
    results: list[Hit]
    truncated: bool = Field(description="the query was longer than the model reads")
    candidates: int
    timings_ms: dict[str, float]
    partial: bool | None = Field(None, description="emkum serve-cluster: some shards did not answer")
    missing_shards: list[int] | None = Field(None, description="with partial: the shards left out")


class ImageSearchResults(BaseModel):
    results: list[Hit]
    candidates: int
    timings_ms: dict[str, float]
    partial: bool | None = Field(None, description="emkum serve-cluster: some shards did not answer")
    missing_shards: list[int] | None = Field(None, description="with partial: the shards left out")


class ImageVectors(BaseModel):
    cls: list[float]
    patches: list[list[float]] | None = None


class ImageEmbeddings(BaseModel):
    model: str
    dim: int = Field(description="width of the patch vectors")
    cls_dim: int = Field(description="width of the CLS vectors")
    embeddings: list[ImageVectors]


class TextVectors(BaseModel):
    cls: list[float]
    truncated: bool
    tokens: list[list[float]] | None = None
    words: list[str] | None = None


class TextEmbeddings(BaseModel):
    model: str
    dim: int = Field(description="width of the word vectors")
    cls_dim: int = Field(description="width of the CLS vectors")
    embeddings: list[TextVectors]


class ItemStatus(BaseModel):
    id: str
    status: str = Field(description="created, updated or deleted")


class AddedItems(BaseModel):
    items: list[ItemStatus]


class ListedItem(BaseModel):
    id: str
    metadata: dict[str, Any]


class ItemPage(BaseModel):
    items: list[ListedItem]
    total: int
    limit: int
    offset: int


class Item(BaseModel):
    id: str
    metadata: dict[str, Any]
    n_vectors: int
