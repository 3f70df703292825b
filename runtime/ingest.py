"""How an image gets in: bytes -> checked, decoded pixels and a thumbnail (`prepare_image`) ->
vectors (the caller's encoder: a micro-batcher in the service, a batched call in the CLI, an actor on
Ray) -> a durable write, then its thumbnail (`commit`). `POST /items`, `emkum index`, `emkum
bulk-index` and `emkum eval` all go through here, so an image is decoded, resized and normalised one
way everywhere (training reads its pixels with the same `decode_square`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index import VectorStore
from index.store import ItemInput
from runtime.images import PixelBudget, decode_image, preprocess, thumbnail_jpeg


@dataclass
class PreparedImage:
    data: bytes  # the file as sent (its SHA-1 is the default id)
    pixels: np.ndarray  # the image graph's input, float32 [3, S, S]
    thumbnail: bytes | None  # JPEG, when one was asked for


def prepare_image(
    data: bytes,
    name: str,
    image_spec: dict,
    max_bytes: int,
    max_pixels: int,
    budget: PixelBudget | None = None,
    thumbnail_size: int | None = None,
) -> PreparedImage:
    """Check and decode one file, as model.json's `image` spec says; InputError names what is wrong.
    The full-size decoded image is dropped on return: only the model input and the thumbnail stay."""
    image = decode_image(data, name, max_bytes, max_pixels, budget)
    pixels = preprocess(image, image_spec["size"], image_spec["mean"], image_spec["std"])
    thumbnail = thumbnail_jpeg(image, thumbnail_size) if thumbnail_size else None
    return PreparedImage(data, pixels, thumbnail)


def default_id(data: bytes) -> str:
    """An item's id when the client gives none: the SHA-1 of its bytes (re-sending a file updates it)."""
    return hashlib.sha1(data).hexdigest()


def thumb_path(thumbnails: Path, item_id: str) -> Path:
    return Path(thumbnails) / f"{hashlib.sha1(item_id.encode()).hexdigest()}.jpg"


def commit(
    store: VectorStore, items: list[ItemInput], thumbnails: list[bytes | None], folder: Path | None
) -> list[str]:
    """The durable write, then the thumbnails: a refused write leaves none behind, and a crash between
    the two loses only a thumbnail (the page shows none; the item is searchable). Returns each item's
    status (created or updated)."""
    statuses = store.add(items)
    if folder is not None:
        for item, thumb in zip(items, thumbnails, strict=True):
            if thumb is not None:
                _write_atomically(thumb_path(folder, item.id), thumb)
    return statuses


def remove(store: VectorStore, item_id: str, folder: Path | None) -> None:
    """Delete an item durably, then its thumbnail."""
    store.delete(item_id)
    if folder is not None:
        thumb_path(folder, item_id).unlink(missing_ok=True)


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError:
        pass  # a thumbnail is a convenience for the web page; the index write decided success
