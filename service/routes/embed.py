from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, UploadFile

from runtime.modelcard import cls_dim
from service.deps import AppState, get_state
from service.errors import ApiError
from service.forms import Utf8FormRoute
from service.routes.common import (
    all_in_order,
    check_text,
    decode_upload,
    embed_image_list,
    embed_texts,
    request_budget,
)
from service.schemas import ImageEmbeddings, TextEmbeddings, TextRequest

router = APIRouter(tags=["embed"], route_class=Utf8FormRoute)


@router.post("/embed/image", response_model_exclude_unset=True)  # optional parts only when asked for
async def embed_images(
    files: Annotated[list[UploadFile], File(description="one or more images")],
    patches: Annotated[bool, Query(description="also return the patch vectors")] = False,
    state: AppState = Depends(get_state),
) -> ImageEmbeddings:
    """Embed images: the global (CLS) vector and, with `patches=true`, one vector per patch."""
    if len(files) > state.settings.max_files:
        raise ApiError(413, "too_many_files", f"{len(files)} files, the limit is {state.settings.max_files}")
    budget = request_budget(state)
    decoded = await all_in_order([decode_upload(state, upload, None, budget) for upload in files])
    embeddings = await embed_image_list(state, [p.pixels for p in decoded])
    out = []
    for emb in embeddings:
        item = {"cls": emb.cls.tolist()}
        if patches:
            item["patches"] = emb.patches.tolist()
        out.append(item)
    return {"model": state.card["name"], "dim": state.card["dim"], "cls_dim": cls_dim(state.card), "embeddings": out}


@router.post("/embed/text", response_model_exclude_unset=True)  # optional parts only when asked for
async def embed_text(body: TextRequest, state: AppState = Depends(get_state)) -> TextEmbeddings:
    """Embed texts: the global vector and, with `tokens: true`, the word vectors (CLS, SEP excluded)."""
    if len(body.texts) > state.settings.max_texts:
        raise ApiError(413, "too_many_texts", f"{len(body.texts)} texts, the limit is {state.settings.max_texts}")
    texts = [check_text(state, t, f"texts[{i}]") for i, t in enumerate(body.texts)]
    queries, truncated = await embed_texts(state, texts)
    out = []
    for query, cut in zip(queries, truncated, strict=True):
        item = {"cls": query.cls.tolist(), "truncated": cut}
        if body.tokens:
            vectors, words = query.words()
            item["tokens"], item["words"] = vectors.tolist(), words
        out.append(item)
    return {"model": state.card["name"], "dim": state.card["dim"], "cls_dim": cls_dim(state.card), "embeddings": out}
