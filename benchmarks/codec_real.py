"""Patch codecs and pooling on the default model's real vectors (Flickr8k val, 1,000 images, the
first caption of each as the query): bytes per image, top-10 overlap of the CMLI rerank of the CLS
top-100 against exact fp32 vectors, and text->image recall with the model's fused rerank (K = 20).

    python benchmarks/codec_real.py     # ~5 minutes on 2 cores
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe, record  # noqa: E402
from index import VectorStore  # noqa: E402
from index.cmli import rerank_cmli  # noqa: E402
from index.store import ItemInput  # noqa: E402
from runtime.encoders import Encoders  # noqa: E402
from runtime.images import decode_square, normalize  # noqa: E402
from runtime.modelcard import load_model_card, store_config  # noqa: E402
from runtime.query import embed_text_queries  # noqa: E402
from runtime.tokenizer import TextTokenizer  # noqa: E402
from training.data import read_karpathy  # noqa: E402
from training.metrics import t2i_recall  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"
TRAIN_AFTER = 32_768  # codec_training_vectors: 128 images at pool 1, 512 at pool 2 (of 1,000)
# (patch pool, codec, images per add). Until commit 36e4d06 a learned codec trained on the first
# batch, so one image per POST /items meant ranges learned from one image
# (results/codec_real-first-batch-training.json: SQ8 0.74 top-10 overlap). Now rows stay fp16 until
# TRAIN_AFTER vectors are stored; the "1" rows add images one at a time, as such a service does.
VARIANTS = [
    (1, "SQfp16", "all"),
    (1, "SQ8", "all"),
    (1, "SQ8", 1),
    (1, "SQ4", "all"),
    (1, "SQ4", 1),
    (1, "PQ64x8", "all"),
    (1, "PQ32x8", "all"),
    (2, "SQfp16", "all"),
    (2, "SQ8", "all"),
    (2, "SQ4", "all"),
    (2, "SQ4", 1),
    (2, "PQ32x8", "all"),
]


def main() -> None:
    model_dir = ROOT / "artifacts" / "emkum-flickr8k"
    card = load_model_card(model_dir)
    enc = Encoders(model_dir, card)
    tok = TextTokenizer(model_dir / card["files"]["tokenizer"], card["text"]["max_length"])
    pairs = read_karpathy(FLICKR / "dataset_flickr8k.json", str(FLICKR / "images-val-*.tar"), "val")
    spec = card["image"]
    images = []
    for s in tqdm(range(0, len(pairs), 32), desc="embed images"):
        px = [normalize(decode_square(p.read(), spec["size"]), spec["mean"], spec["std"]) for p in pairs[s : s + 32]]
        images.extend(enc.embed_images_now(px))
    queries = embed_text_queries(tok, enc.embed_tokens_now, [p.captions[0] for p in pairs])
    enc.close()
    truth = np.arange(len(pairs))
    cls = np.stack([e.cls for e in images])
    exact_patches = np.stack([e.patches for e in images])
    weight = float(card["rerank"]["cls_weight"])
    exact_top10 = []
    for q in queries:
        cand = np.argsort(-(cls @ q.cls))[:100]
        scores = rerank_cmli(q.vectors, q.mask, exact_patches[cand])
        exact_top10.append(set(cand[np.argsort(-scores)[:10]].tolist()))
    report = {"machine": describe(), "model": card["name"], "images": len(pairs), "queries": len(queries), "rows": []}
    for pool, codec, first in VARIANTS:
        with tempfile.TemporaryDirectory() as tmp:
            store = VectorStore(
                tmp,
                store_config(
                    card, patch_codec=codec, use_gpu=False, patch_pool=pool, codec_training_vectors=TRAIN_AFTER
                ),
            )
            items = [ItemInput(str(i), e.cls, e.patches) for i, e in enumerate(images)]
            step = len(items) if first == "all" else first
            for start in range(0, len(items), step):
                store.add(items[start : start + step])
            overlap, ranked, seconds = [], [], []
            for q, ref in zip(queries, exact_top10, strict=True):
                hits = store.search(q, k=10, candidates=100, cls_weight=0.0)
                overlap.append(len({int(h.id) for h in hits} & ref) / 10)
                t0 = time.perf_counter()
                hits = store.search(q, k=10, candidates=20, cls_weight=weight)
                seconds.append(time.perf_counter() - t0)
                ranked.append([int(h.id) for h in hits])
            row = {
                "patch_pool": pool,
                "codec": codec,
                "images_per_add": first,
                "bytes_per_image": int(store.bytes_per_item()),
                "top10_overlap_vs_exact_fp32": round(float(np.mean(overlap)), 4),
                "t2i_rerank_k20": t2i_recall(np.array(ranked), truth),
                "search_p50_ms_k20": round(float(np.median(seconds)) * 1000, 2),
            }
            record(report, row)
    out = ROOT / "benchmarks" / "results" / "codec_real.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
