from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from index.store import ItemInput
from runtime.ingest import commit, default_id, remove, thumb_path
from service import metrics
from service.deps import AppState, get_state, require_api_key
from service.errors import ApiError
from service.forms import Utf8FormRoute
from service.routes.common import all_in_order, check_unicode, decode_upload, embed_image_list, request_budget
from service.schemas import AddedItems, Item, ItemPage, ItemStatus

router = APIRouter(tags=["items"], route_class=Utf8FormRoute)


MAX_METADATA_DEPTH = 32


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _depth(value: object) -> int:
    """Nesting depth, without recursion (a deep value must not become a RecursionError)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_METADATA_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_metadata(raw: str | None, filename: str) -> dict:
    """A JSON object that every later read can return: strict JSON (no NaN/Infinity, which would come
    back as null), nested at most MAX_METADATA_DEPTH deep, and encodable as UTF-8 (no lone surrogates)."""
    if raw is None or raw == "":
        return {}
    try:
        value = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ApiError(422, "invalid_metadata", f"{filename}: metadata is not valid JSON ({reason})") from exc
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_metadata", f"{filename}: metadata must be a JSON object")
    if _depth(value) > MAX_METADATA_DEPTH:
        raise ApiError(422, "invalid_metadata", f"{filename}: metadata nests deeper than {MAX_METADATA_DEPTH}")
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(422, "invalid_metadata", f"{filename}: metadata holds text that is not valid Unicode") from exc
    return value


@router.post("/items", dependencies=[Depends(require_api_key)])
async def add_items(
    files: Annotated[list[UploadFile], File(description="images to index")],
    ids: Annotated[list[str] | None, Form(description="one id per file (default: SHA-1 of the bytes)")] = None,
    metadata: Annotated[list[str] | None, Form(description="one JSON object per file")] = None,
    state: AppState = Depends(get_state),
) -> AddedItems:
    """Index images. Answers only after the writes are durable; a bad file fails the whole request
    and nothing from it is written."""
    state.store.check_writable()  # a read-only data directory refuses before any work is done
    if len(files) > state.settings.max_files:
        raise ApiError(413, "too_many_files", f"{len(files)} files, the limit is {state.settings.max_files}")
    if ids is not None and len(ids) != len(files):
        raise ApiError(422, "ids_mismatch", f"{len(ids)} ids for {len(files)} files")
    if ids is not None and len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise ApiError(422, "duplicate_id", f"ids must be unique within a request; repeated: {twice[:5]}")
    if metadata is not None and len(metadata) != len(files):
        raise ApiError(422, "metadata_mismatch", f"{len(metadata)} metadata entries for {len(files)} files")
    metas = []
    for i, upload in enumerate(files):  # the cheap checks first, before any decoding
        name = upload.filename or f"file {i}"
        item_id = ids[i] if ids else None
        if item_id is not None and not 1 <= len(item_id) <= 512:
            raise ApiError(422, "invalid_id", f"{name}: ids must be 1 to 512 characters")
        if item_id is not None:
            check_unicode(item_id, f"{name}: id")
        meta = parse_metadata(metadata[i] if metadata else None, name)
        meta.setdefault("filename", name)
        metas.append(meta)
    size = state.settings.thumbnail_size
    budget = request_budget(state)
    decoded = await all_in_order([decode_upload(state, upload, size, budget) for upload in files])
    embeddings = await embed_image_list(state, [p.pixels for p in decoded])
    items = [
        ItemInput(ids[i] if ids else default_id(p.data), emb.cls, emb.patches, metas[i])
        for i, (p, emb) in enumerate(zip(decoded, embeddings, strict=True))
    ]
    thumbs = [p.thumbnail for p in decoded]
    statuses = await run_in_threadpool(commit, state.store, items, thumbs, state.thumbs)
    metrics.ITEMS.set(len(state.store))
    return {"items": [{"id": it.id, "status": st} for it, st in zip(items, statuses, strict=True)]}


@router.get("/items")
def list_items(
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**53)] = 0,  # SQLite integers are 64-bit
    state: AppState = Depends(get_state),
) -> ItemPage:
    return {
        "items": state.store.list(limit, offset),
        "total": len(state.store),
        "limit": limit,
        "offset": offset,
    }


@router.get("/items/{item_id:path}")
def get_item(item_id: str, state: AppState = Depends(get_state)) -> Item:
    return state.store.get(item_id)


@router.delete("/items/{item_id:path}", dependencies=[Depends(require_api_key)])
async def delete_item(item_id: str, state: AppState = Depends(get_state)) -> ItemStatus:
    state.store.check_writable()
    await run_in_threadpool(remove, state.store, item_id, state.thumbs)
    metrics.ITEMS.set(len(state.store))
    return {"id": item_id, "status": "deleted"}


@router.get(
    "/thumbnails/{item_id:path}",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "the item's JPEG thumbnail"}},
)
def thumbnail(item_id: str, state: AppState = Depends(get_state)) -> Response:
    state.store.get(item_id)  # 404 for unknown ids
    path = thumb_path(state.thumbs, item_id)
    if not path.is_file():
        raise ApiError(404, "no_thumbnail", f"no thumbnail stored for {item_id!r}")
    return Response(path.read_bytes(), media_type="image/jpeg")
