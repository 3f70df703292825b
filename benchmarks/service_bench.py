"""End-to-end text-query latency of the real service (`POST /search/text`) on loopback, with and
without CMLI rerank, under 1, 8 and 32 concurrent clients, over an index of N items.

The index is filled with synthetic vectors straight through `VectorStore` (embedding 100k real
photos on 2 CPU cores would take hours); what is measured is the query path: HTTP, tokenizer,
text graph (ONNX Runtime), CLS ANN, decode of the candidates, CMLI rerank. The load generator runs
in this process, on the same cores as the server: the numbers include that contention.

    python benchmarks/service_bench.py --items 10000 --requests 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe  # noqa: E402
from index import VectorStore  # noqa: E402
from index.store import ItemInput  # noqa: E402
from service.modelcard import load_model_card, store_config  # noqa: E402
from tests.server import running_server  # noqa: E402

WORDS = ["dog", "man", "woman", "child", "beach", "snow", "red", "bike", "water", "street", "grass", "ball"]


def fill(data_dir: Path, card: dict, n: int, codec: str, pool: int, rng: np.random.Generator) -> None:
    config = store_config(card, patch_codec=codec, use_gpu=False, patch_pool=pool)
    store = VectorStore(data_dir, config)
    patches = card["image"]["num_patches"]
    for start in tqdm(range(0, n, 256), desc=f"fill {n} items", unit="batch"):
        batch = []
        for i in range(start, min(n, start + 256)):
            cls = rng.standard_normal(card["dim"], dtype=np.float32)
            vec = rng.standard_normal((patches, card["dim"]), dtype=np.float32)
            batch.append(
                ItemInput(
                    f"item{i}", cls / np.linalg.norm(cls), vec / np.linalg.norm(vec, axis=1, keepdims=True), {"n": i}
                )
            )
        store.add(batch)
    store.close()


async def load(url: str, concurrency: int, total: int, rerank: bool, rng: np.random.Generator) -> dict:
    queries = [" ".join(rng.choice(WORDS, 3)) for _ in range(total)]
    latencies: list[float] = []
    codes: dict[int, int] = {}
    queue: asyncio.Queue[str] = asyncio.Queue()
    for q in queries:
        queue.put_nowait(q)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            q = queue.get_nowait()
            t0 = time.perf_counter()
            r = await client.post("/search/text", json={"query": q, "k": 10, "candidates": 100, "rerank": rerank})
            latencies.append(time.perf_counter() - t0)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as c:
        await c.post("/search/text", json={"query": "warm up", "rerank": rerank})
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "rerank": rerank,
        "requests": total,
        "status": codes,
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "throughput_rps": round(total / wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=ROOT / "artifacts" / "emkum-flickr8k")
    ap.add_argument("--items", type=int, nargs="+", default=[10_000])
    ap.add_argument("--codec", default="SQ8")
    ap.add_argument("--pool", type=int, default=1, help="patch pooling factor (EMKUM_PATCH_POOL)")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "service_bench.json")
    args = ap.parse_args()
    card = load_model_card(args.model_dir)
    rng = np.random.default_rng(0)
    report = {
        "machine": describe(),
        "model": card["name"],
        "codec": args.codec,
        "command": " ".join(sys.argv),
        "runs": [],
    }
    for n in args.items:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            fill(data, card, n, args.codec, args.pool, rng)
            settings = {"patch_codec": args.codec, "patch_pool": args.pool, "queue_size": 1024}
            with running_server(args.model_dir, data, Path(tmp), **settings) as srv:
                for rerank in (False, True):
                    for c in args.concurrency:
                        row = {"items": n, **asyncio.run(load(srv.url, c, args.requests, rerank, rng))}
                        report["runs"].append(row)
                        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
