"""Bulk indexing on Ray Data: for collections that one process embeds too slowly.

Decoding runs as Ray tasks on every CPU of the cluster, the image graph runs in a pool of encoder
actors (one ONNX Runtime session each; `num_gpus=1` per actor on GPU nodes), and the embeddings are
written to N index shards, each an ordinary data directory the service can serve
(`EMKUM_DATA_DIR=<out>/shard-00`). Items go to shard `crc32(id) % N`, so re-running the job over a
grown folder sends each id to the same shard, where already indexed ids are skipped.

Writes happen in the driver, one writer per shard (SQLite takes one writer): durable adds run at
~1,000 items/s per shard (benchmarks/results/index_bench.json), far above what encoders produce."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from index import VectorStore
from index.sharding import shard_of
from index.store import ItemInput
from runtime.errors import InputError
from runtime.images import find_images
from runtime.ingest import prepare_image
from runtime.modelcard import cls_dim, load_model_card, store_config


def _decode_batch(batch: dict, spec: dict, max_bytes: int, max_pixels: int) -> dict:
    """runtime/ingest.py's `prepare_image` on each file; a bad file keeps its row with an `error`
    (columns stay aligned)."""
    size = spec["size"]
    pixels = np.zeros((len(batch["id"]), 3, size, size), np.float32)
    errors = []
    for i, path in enumerate(batch["path"]):
        try:
            pixels[i] = prepare_image(Path(path).read_bytes(), Path(path).name, spec, max_bytes, max_pixels).pixels
            errors.append("")
        except (InputError, OSError) as exc:
            errors.append(f"{path}: {exc}")
    return {"id": batch["id"], "pixels": pixels, "error": np.array(errors, dtype=object)}


class _Encoder:
    """A Ray actor holding one ONNX Runtime session of the image graph."""

    def __init__(self, model_dir: str, providers: str) -> None:
        from runtime.encoders import Encoders

        card = load_model_card(Path(model_dir))
        self.dim, self.cls_dim, self.patches = card["dim"], cls_dim(card), card["image"]["num_patches"]
        self.encoders = Encoders(Path(model_dir), card, providers=providers)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["id"])
        cls = np.zeros((n, self.cls_dim), np.float32)
        patches = np.zeros((n, self.patches, self.dim), np.float32)
        ok = [i for i in range(n) if not batch["error"][i]]
        if ok:
            out = self.encoders.embed_images_now([batch["pixels"][i] for i in ok])
            for i, emb in zip(ok, out, strict=True):
                cls[i], patches[i] = emb.cls, emb.patches
        return {"id": batch["id"], "error": batch["error"], "cls": cls, "patches": patches}


def bulk_index(
    folder: Path,
    out_dir: Path,
    model_dir: Path,
    shards: int = 2,
    encoders: int = 1,
    batch_size: int = 32,
    gpus_per_encoder: float = 0.0,
    max_bytes: int = 20 * 1024 * 1024,
    max_pixels: int = 50_000_000,
    codec: str = "SQ8",
    pool: int = 1,
) -> dict:
    """Index every image under `folder` into `shards` data directories under `out_dir`."""
    import ray

    card = load_model_card(model_dir)
    config = store_config(card, patch_codec=codec, use_gpu=False, patch_pool=pool)
    stores = [VectorStore(out_dir / f"shard-{i:02d}", config) for i in range(shards)]
    files = find_images(folder)
    rows = [{"path": str(p), "id": str(p.relative_to(folder))} for p in files]
    todo = [r for r in rows if r["id"] not in stores[shard_of(r["id"], shards)]]
    report = {
        "files": len(rows),
        "skipped_existing": len(rows) - len(todo),
        "indexed": 0,
        "bad_files": [],
        "shards": {},
    }
    if todo:
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        spec = card["image"]
        decoded = ray.data.from_items(todo).map_batches(
            _decode_batch,
            batch_size=batch_size,
            batch_format="numpy",
            fn_kwargs={"spec": spec, "max_bytes": max_bytes, "max_pixels": max_pixels},
        )
        embedded = decoded.map_batches(
            _Encoder,
            batch_size=batch_size,
            batch_format="numpy",
            concurrency=encoders,
            num_gpus=gpus_per_encoder,
            fn_constructor_kwargs={"model_dir": str(model_dir), "providers": "cuda" if gpus_per_encoder else "cpu"},
        )
        for batch in embedded.iter_batches(batch_size=batch_size, batch_format="numpy"):
            by_shard: dict[int, list[ItemInput]] = {}
            for item_id, error, cls, patches in zip(
                batch["id"], batch["error"], batch["cls"], batch["patches"], strict=True
            ):
                if error:
                    report["bad_files"].append(str(error))
                    continue
                item = ItemInput(str(item_id), cls, patches, {"filename": str(item_id)})
                by_shard.setdefault(shard_of(item.id, shards), []).append(item)
            for shard, items in by_shard.items():
                stores[shard].add(items)
                report["indexed"] += len(items)
    for i, store in enumerate(stores):
        report["shards"][f"shard-{i:02d}"] = len(store)
        store.close()
    return report
