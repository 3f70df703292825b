"""The Serve deployments: image and text encoders (replicas; a GPU each where the cluster has them)
and one shard per index data directory.

A shard is its own Serve application (`emkum-shard-<i>`) so that it can be deployed, replaced or
deleted alone - what losing or moving one looks like - while the ingress keeps serving the others.
Its writer has one replica, the only writer of its directory (SQLite and the in-memory FAISS index
take one writer); Serve's health checks restart it when it dies, and a restart reopens the directory,
which holds every acknowledged write (the store commits before it answers). Read replicas
(`emkum-shard-<i>-read`, any number) open the same directory as followers: they take the shard's
searches and reads, so reads scale and go on while the writer restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve

from index import VectorStore
from index.store import ItemInput, Query, SearchHit
from runtime.encoders import Encoders, ImageEmbedding, TextEmbedding
from runtime.modelcard import load_model_card, store_config


def shard_app_name(shard: int) -> str:
    return f"emkum-shard-{shard}"


def reader_app_name(shard: int) -> str:
    return f"emkum-shard-{shard}-read"


class _Encoder:
    def __init__(self, model_dir: str, providers: str, precision: str, threads: int) -> None:
        card = load_model_card(Path(model_dir))
        self.encoders = Encoders(Path(model_dir), card, providers, precision, threads)

    def info(self) -> dict[str, str]:
        return {"provider": self.encoders.provider, "precision": self.encoders.precision}


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256)
class ImageEncoder(_Encoder):
    """The image graph behind Serve's own micro-batching (`serve.batch`)."""

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def embed(self, pixels: list[np.ndarray]) -> list[ImageEmbedding]:
        return await asyncio.to_thread(self.encoders.embed_images_now, pixels)


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256)
class TextEncoder(_Encoder):
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def embed(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> list[TextEmbedding]:
        return await asyncio.to_thread(self.encoders.embed_tokens_now, rows)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, health_check_period_s=2, health_check_timeout_s=10)
class Shard:
    """One data directory: the two-stage search over its items, and their durable writes. With
    `follow`, a read replica of it: the same reads, kept up with the writer's commits before each
    one (VectorStore.catch_up), no writes."""

    def __init__(
        self, shard: int, data_dir: str, model_dir: str, store_options: dict[str, Any], follow: bool = False
    ) -> None:
        card = load_model_card(Path(model_dir))
        self.shard = shard
        self.store = VectorStore(data_dir, store_config(card, **store_options), follow=follow)

    def info(self) -> dict[str, Any]:
        self.store.catch_up()
        return {
            "shard": self.shard,
            "node": ray.get_runtime_context().get_node_id(),
            "items": len(self.store),
            "grid": self.store.grid,
            "read_only": self.store.read_only,
            "index_on_gpu": self.store.gpu,
            "patch_codec": self.store.config.patch_codec,
            "patch_pool": self.store.config.patch_pool,
        }

    def search(self, query: Query, options: dict[str, Any]) -> list[SearchHit]:
        return self.store.search(query, **options)

    def add(self, items: list[ItemInput]) -> list[str]:
        """Answers once the write is durable: the ingress acknowledges nothing before this returns."""
        return self.store.add(items)

    def delete(self, item_id: str) -> None:
        self.store.delete(item_id)

    def get(self, item_id: str) -> dict[str, Any]:
        return self.store.get(item_id)

    def page(self, limit: int, offset: int) -> list[dict[str, Any]]:
        return self.store.list(limit, offset)

    def check_health(self) -> None:
        self.store.counts()  # the database answers

    def __del__(self) -> None:
        """Serve calls this on a graceful stop: the writer snapshots its CLS index for a fast reopen
        (a follower has nothing to write; a killed replica replays the change log instead)."""
        store = getattr(self, "store", None)  # None when the constructor failed
        if store is not None:
            store.close()
