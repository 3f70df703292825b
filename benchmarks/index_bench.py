"""Index benchmark on synthetic vectors (CLS dim 256, 256 patches per image).

1. Codec quality and size: structured synthetic items (patches drawn around a few "concepts" each),
   queries whose words are noisy concepts; for each codec, top-10 overlap of the CMLI rerank of the
   CLS top-100 against the same rerank with exact fp32 vectors, and bytes per item.
2. Latency at 100k and 1M items: CLS search (FAISS) for K candidates, then decode the candidates'
   codes and CMLI-rerank them, with the store's own pieces (`PatchCodec.inner_products`, CMLI). Code bytes
   are random at this scale (latency does not depend on their values; quality is measured in 1).
3. Durable add throughput of `VectorStore` (SQLite commit + fsync per batch).

    python benchmarks/index_bench.py                 # ~15 minutes on 2 cores
    python benchmarks/index_bench.py --sizes 100000  # quicker
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import describe, write_report
from index import StoreConfig, VectorStore, one_thread_per_search
from index.cmli import cmli_from_similarities, rerank_cmli
from index.codecs import PatchCodec
from index.store import ItemInput

D, N_PATCH, WORDS = 256, 256, 8


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def synthetic(n_items: int, rng: np.random.Generator, n_concepts: int = 512):
    concepts = unit(rng.normal(size=(n_concepts, D)))
    owned = rng.integers(0, n_concepts, size=(n_items, 4))
    patches = np.empty((n_items, N_PATCH, D), dtype=np.float32)
    for i in tqdm(range(n_items), desc="synthetic items", leave=False):
        pick = concepts[owned[i, rng.integers(0, 4, N_PATCH)]]
        patches[i] = unit(pick + 0.8 * rng.normal(size=(N_PATCH, D)).astype(np.float32) / np.sqrt(D) * 4)
    cls = unit(patches.mean(1) + 0.05 * rng.normal(size=(n_items, D)))
    return concepts, owned, patches, cls


def queries(concepts, owned, rng, n):
    out = []
    for _ in range(n):
        item = rng.integers(len(owned))
        words = concepts[owned[item, rng.integers(0, 4, WORDS)]]
        tokens = unit(words + 0.15 * rng.normal(size=words.shape))
        out.append((unit(tokens.mean(0)), tokens))
    return out


def codec_quality(n_items: int, n_queries: int, codecs: list[str], rng) -> dict:
    concepts, owned, patches, cls = synthetic(n_items, rng)
    flat = faiss.IndexFlatIP(D)
    flat.add(cls)
    qs = queries(concepts, owned, rng, n_queries)
    mask = np.ones(WORDS)
    results = {}
    sample = patches[rng.integers(0, n_items, 100)].reshape(-1, D)
    for name in codecs:
        codec = PatchCodec(name, D)
        if not codec.is_trained:
            codec.train(sample)
        codes = np.stack([codec.encode(p) for p in tqdm(patches, desc=f"encode {name}", leave=False)])
        overlaps = []
        for q_cls, tokens in qs:
            _, cand = flat.search(q_cls[None], 100)
            cand = cand[0]
            exact = rerank_cmli(tokens, mask, patches[cand])
            decoded = codec.decode(codes[cand].reshape(-1, codec.code_size)).reshape(len(cand), N_PATCH, D)
            approx = rerank_cmli(tokens, mask, decoded)
            overlaps.append(len(set(cand[np.argsort(-exact)[:10]]) & set(cand[np.argsort(-approx)[:10]])) / 10)
        results[name] = {
            "bytes_per_item": int(codes[0].nbytes),
            "top10_overlap_vs_fp32": round(float(np.mean(overlaps)), 4),
            "items": n_items,
            "queries": n_queries,
        }
        print(name, results[name], flush=True)
    return results


def latency(
    n_items: int, factory: str, codec_name: str, n_queries: int, ks: list[int], rng, n_vectors: int = N_PATCH
) -> dict:
    cls = unit(rng.standard_normal((n_items, D), dtype=np.float32))
    index = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    if not index.is_trained:
        index.train(cls[rng.choice(n_items, min(n_items, 100_000), replace=False)])
    index.add(cls)
    build_s = time.perf_counter() - t0
    if hasattr(index, "nprobe"):
        index.nprobe = 32
    codec = PatchCodec(codec_name, D)
    if not codec.is_trained:
        codec.train(unit(rng.standard_normal((20_000, D), dtype=np.float32)))
    codes = rng.integers(0, 256, size=(n_items, n_vectors, codec.code_size), dtype=np.uint8)
    out = {
        "items": n_items,
        "vectors_per_item": n_vectors,
        "cls_factory": factory,
        "codec": codec_name,
        "build_s": round(build_s, 1),
        "resident_gib": round((cls.nbytes + codes.nbytes) / 2**30, 2),
    }
    for k in ks:
        ann, rer = [], []
        for _ in range(n_queries):
            q = unit(rng.standard_normal(D, dtype=np.float32))
            tokens = unit(rng.standard_normal((WORDS, D), dtype=np.float32))
            t0 = time.perf_counter()
            _, cand = index.search(q[None], k)
            t1 = time.perf_counter()
            # the store's path: scored on the codes (SQ) or decoded once (others), then CMLI
            sims = codec.inner_products(codes[cand[0]].reshape(-1, codec.code_size), tokens)
            cmli_from_similarities(sims.reshape(k, n_vectors, -1), np.ones(WORDS))
            t2 = time.perf_counter()
            ann.append(t1 - t0)
            rer.append(t2 - t1)
        ann_ms, rer_ms = np.array(ann) * 1e3, np.array(rer) * 1e3
        tot = ann_ms + rer_ms
        out[f"K={k}"] = {
            "ann_p50_ms": round(float(np.percentile(ann_ms, 50)), 2),
            "ann_p99_ms": round(float(np.percentile(ann_ms, 99)), 2),
            "rerank_p50_ms": round(float(np.percentile(rer_ms, 50)), 2),
            "rerank_p99_ms": round(float(np.percentile(rer_ms, 99)), 2),
            "total_p50_ms": round(float(np.percentile(tot, 50)), 2),
            "total_p99_ms": round(float(np.percentile(tot, 99)), 2),
        }
    print(json.dumps(out), flush=True)
    del codes, cls, index
    return out


def add_throughput(n_items: int, codec: str, rng) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = VectorStore(tmp, StoreConfig(dim=D, model="bench", patch_codec=codec, use_gpu=False))
        if "PQ" in codec:
            store.train_codec(unit(rng.standard_normal((20_000, D), dtype=np.float32)))
        batches = [
            [
                ItemInput(
                    f"{b}-{i}",
                    unit(rng.standard_normal(D, dtype=np.float32)),
                    unit(rng.standard_normal((N_PATCH, D), dtype=np.float32)),
                )
                for i in range(64)
            ]
            for b in range(n_items // 64)
        ]
        t0 = time.perf_counter()
        for batch in batches:
            store.add(batch)
        seconds = time.perf_counter() - t0
        return {
            "codec": codec,
            "items": len(batches) * 64,
            "items_per_s": round(len(batches) * 64 / seconds, 1),
            "batch": 64,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--quality-items", type=int, default=3000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--codecs", nargs="+", default=["SQfp16", "SQ8", "PQ64x8", "PQ32x8", "PQ16x8"])
    ap.add_argument("--latency-codec", default="PQ32x8")
    ap.add_argument("--latency-vectors", type=int, default=N_PATCH, help="vectors per item (64 = 2x2 pooling)")
    ap.add_argument("--latency-only", action="store_true", help="skip the codec-quality and add-throughput parts")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "index_bench.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    report = {
        "machine": describe(),
        "faiss": faiss.__version__,
        "dim": D,
        "patches_per_item": N_PATCH,
        "words_per_query": WORDS,
        "command": " ".join(sys.argv),
    }
    if not args.latency_only:
        report["codec_quality"] = codec_quality(args.quality_items, args.queries, args.codecs, rng)
        report["add_throughput"] = [add_throughput(1024, c, rng) for c in ("SQ8", "PQ32x8")]
        print(report["add_throughput"], flush=True)
    report["latency"] = []
    report["threads_per_search"] = 1  # as the service runs them (index.one_thread_per_search)
    one_thread_per_search()
    for n in args.sizes:
        factories = ["Flat"] if n <= 200_000 else ["IVF4096,Flat"]
        for factory in factories:
            report["latency"].append(
                latency(n, factory, args.latency_codec, args.queries, [100, 1000], rng, args.latency_vectors)
            )
    write_report(args.out, report)


if __name__ == "__main__":
    main()
