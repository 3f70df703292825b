from __future__ import annotations

import hashlib
import json
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from index.store import ItemInput
from service import metrics
from service.deps import AppState, get_state, require_api_key
from service.errors import ApiError
from service.routes.common import all_in_order, decode_upload, embed_image_list

router = APIRouter(tags=["items"])


def thumb_path(state: AppState, item_id: str):
    return state.thumbs / f"{hashlib.sha1(item_id.encode()).hexdigest()}.jpg"


def parse_metadata(raw: str | None, filename: str) -> dict:
    if raw is None or raw == "":
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ApiError(422, "invalid_metadata", f"{filename}: metadata is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ApiError(422, "invalid_metadata", f"{filename}: metadata must be a JSON object")
    return value


@router.post("/items", dependencies=[Depends(require_api_key)])
async def add_items(
    files: Annotated[list[UploadFile], File(description="images to index")],
    ids: Annotated[list[str] | None, Form(description="one id per file (default: SHA-1 of the bytes)")] = None,
    metadata: Annotated[list[str] | None, Form(description="one JSON object per file")] = None,
    state: AppState = Depends(get_state),
) -> dict:
    """Index images. Answers only after the writes are durable; a bad file fails the whole request
    and nothing from it is written."""
    state.store.check_writable()  # a read-only data directory refuses before any work is done
    if len(files) > state.settings.max_files:
        raise ApiError(413, "too_many_files", f"{len(files)} files, the limit is {state.settings.max_files}")
    if ids is not None and len(ids) != len(files):
        raise ApiError(422, "ids_mismatch", f"{len(ids)} ids for {len(files)} files")
    if metadata is not None and len(metadata) != len(files):
        raise ApiError(422, "metadata_mismatch", f"{len(metadata)} metadata entries for {len(files)} files")
    metas = []
    for i, upload in enumerate(files):  # the cheap checks first, before any decoding
        name = upload.filename or f"file {i}"
        item_id = ids[i] if ids else None
        if item_id is not None and not 1 <= len(item_id) <= 512:
            raise ApiError(422, "invalid_id", f"{name}: ids must be 1 to 512 characters")
        meta = parse_metadata(metadata[i] if metadata else None, name)
        meta.setdefault("filename", name)
        metas.append(meta)
    size = state.settings.thumbnail_size
    decoded = await all_in_order([decode_upload(state, upload, size) for upload in files])
    embeddings = await embed_image_list(state, [pixels for _, _, pixels in decoded])
    items = []
    for i, ((data, thumb, _), emb) in enumerate(zip(decoded, embeddings, strict=True)):
        item_id = ids[i] if ids else hashlib.sha1(data).hexdigest()
        items.append(ItemInput(item_id, emb.cls, emb.patches, metas[i]))
        await run_in_threadpool(_write_thumb, thumb_path(state, item_id), thumb)
    statuses = await run_in_threadpool(state.store.add, items)
    metrics.ITEMS.set(len(state.store))
    return {"items": [{"id": it.id, "status": st} for it, st in zip(items, statuses, strict=True)]}


def _write_thumb(path, data: bytes) -> None:
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError:
        pass  # a thumbnail is a convenience for the web page; the index write decides success


@router.get("/items")
def list_items(
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**53)] = 0,  # SQLite integers are 64-bit
    state: AppState = Depends(get_state),
) -> dict:
    return {
        "items": state.store.list(limit, offset),
        "total": len(state.store),
        "limit": limit,
        "offset": offset,
    }


@router.get("/items/{item_id:path}")
def get_item(item_id: str, state: AppState = Depends(get_state)) -> dict:
    return state.store.get(item_id)


@router.delete("/items/{item_id:path}", dependencies=[Depends(require_api_key)])
async def delete_item(item_id: str, state: AppState = Depends(get_state)) -> dict:
    state.store.check_writable()
    await run_in_threadpool(state.store.delete, item_id)
    metrics.ITEMS.set(len(state.store))
    return {"id": item_id, "status": "deleted"}


@router.get("/thumbnails/{item_id:path}")
def thumbnail(item_id: str, state: AppState = Depends(get_state)) -> Response:
    state.store.get(item_id)  # 404 for unknown ids
    path = thumb_path(state, item_id)
    if not path.is_file():
        raise ApiError(404, "no_thumbnail", f"no thumbnail stored for {item_id!r}")
    return Response(path.read_bytes(), media_type="image/jpeg")
