"""End-to-end text-query latency of the real service (`POST /search/text`) on loopback, with and
without CMLI rerank, under 1, 8 and 32 concurrent clients, over an index of N items.

The load generator is wrk (Debian's `wrk`; closed loop: each connection sends its next request when
the last one is answered), so the client costs the 2-core box little. Without wrk, an httpx client in
this process stands in (recorded as `load_generator`). Each setting runs `--repeats` times, plain and
rerank interleaved, so that drift on a shared machine hits both; the report gives the median and the
range over repeats, and the rerank overhead per repeat pair.

The index is filled with synthetic vectors straight through `VectorStore` (embedding 100k real
photos on 2 CPU cores would take hours); the patch vectors of 512 random images are reused, which
does not change the cost of a query. What is measured is the query path: HTTP, tokenizer, text
graph (ONNX Runtime), CLS search, CMLI rerank of K = 100 candidates on their codes.

    python benchmarks/service_bench.py --items 10000 100000 --codec SQ4 --pool 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe, write_report  # noqa: E402
from index import VectorStore  # noqa: E402
from index.store import ItemInput  # noqa: E402
from runtime.modelcard import load_model_card, store_config  # noqa: E402
from tests.server import running_server  # noqa: E402

WORDS = ["dog", "man", "woman", "child", "beach", "snow", "red", "bike", "water", "street", "grass", "ball"]
BANK = 512

WRK_SCRIPT = """
local queries = {%(queries)s}
local i = 0
request = function()
  i = i + 1
  local body = '{"query": "' .. queries[(i %% #queries) + 1] .. '", "k": 10, ' ..
    '"candidates": %(candidates)d, "rerank": %(rerank)s}'
  return wrk.format("POST", "/search/text", {["Content-Type"] = "application/json"}, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %%d, "duration_us": %%d, "non_2xx": %%d, "socket_errors": %%d, ' ..
    '"p50_us": %%d, "p95_us": %%d, "p99_us": %%d}\\n', summary.requests, summary.duration, e.status,
    e.connect + e.read + e.write + e.timeout, latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def fill(data_dir: Path, card: dict, n: int, codec: str, pool: int, rng: np.random.Generator) -> None:
    config = store_config(card, patch_codec=codec, use_gpu=False, patch_pool=pool)
    store = VectorStore(data_dir, config)
    dim, patches = card["dim"], card["image"]["num_patches"]
    bank = [unit(rng.standard_normal((patches, dim), dtype=np.float32)) for _ in range(min(BANK, n))]
    for start in tqdm(range(0, n, 512), desc=f"fill {n} items", unit="batch"):
        ids = range(start, min(n, start + 512))
        cls = unit(rng.standard_normal((len(ids), config.global_dim), dtype=np.float32))
        store.add([ItemInput(f"item{i}", cls[j], bank[i % len(bank)], {"n": i}) for j, i in enumerate(ids)])
    store.close()


def stage_totals(url: str) -> dict[str, tuple[float, float]]:
    """(sum of seconds, count) per stage from the service's own histograms."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "emkum_stage_seconds":
            continue
        for s in family.samples:
            stage = s.labels.get("stage")
            if s.name.endswith("_sum"):
                out.setdefault(stage, [0.0, 0.0])[0] = s.value
            elif s.name.endswith("_count"):
                out.setdefault(stage, [0.0, 0.0])[1] = s.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def stage_means_ms(before: dict, after: dict) -> dict[str, float]:
    means = {}
    for stage, (total, count) in after.items():
        t0, c0 = before.get(stage, (0.0, 0.0))
        if count > c0:
            means[stage] = round((total - t0) / (count - c0) * 1000, 2)
    return means


def run_wrk(url: str, concurrency: int, seconds: int, rerank: bool, queries: list[str], candidates: int) -> dict:
    script = WRK_SCRIPT % {
        "queries": ", ".join(f'"{q}"' for q in queries),
        "rerank": str(rerank).lower(),
        "candidates": candidates,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "30s", "-s", f.name, url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    stats = json.loads(re.search(r"WRKJSON (\{.*\})", out).group(1))
    return {
        "requests": stats["requests"],
        "non_2xx": stats["non_2xx"],
        "socket_errors": stats["socket_errors"],
        "p50_ms": round(stats["p50_us"] / 1000, 2),
        "p95_ms": round(stats["p95_us"] / 1000, 2),
        "p99_ms": round(stats["p99_us"] / 1000, 2),
        "throughput_rps": round(stats["requests"] / (stats["duration_us"] / 1e6), 1),
    }


def run_httpx(url: str, concurrency: int, seconds: int, rerank: bool, queries: list[str], candidates: int) -> dict:
    latencies: list[float] = []
    codes: dict[int, int] = {}

    async def worker(client: httpx.AsyncClient, deadline: float, offset: int) -> None:
        i = offset
        while time.perf_counter() < deadline:
            body = {"query": queries[i % len(queries)], "k": 10, "candidates": candidates, "rerank": rerank}
            t0 = time.perf_counter()
            r = await client.post("/search/text", json=body)
            latencies.append(time.perf_counter() - t0)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            i += concurrency

    async def main() -> float:
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(client, t0 + seconds, i) for i in range(concurrency)))
            return time.perf_counter() - t0

    wall = asyncio.run(main())
    ms = np.array(latencies) * 1000
    return {
        "requests": len(ms),
        "non_2xx": sum(v for k, v in codes.items() if not 200 <= k < 300),
        "socket_errors": 0,
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "throughput_rps": round(len(ms) / wall, 1),
    }


def summarise(runs: list[dict]) -> list[dict]:
    """Median and range over repeats per (items, concurrency, rerank), and rerank's overhead per pair."""
    rows = []
    keys = sorted({(r["items"], r["concurrency"]) for r in runs})
    for items, conc in keys:
        pick = {
            rr: [r for r in runs if (r["items"], r["concurrency"], r["rerank"]) == (items, conc, rr)] for rr in (0, 1)
        }
        row: dict = {"items": items, "concurrency": conc}
        for rr, name in ((0, "plain"), (1, "rerank")):
            p50 = [r["p50_ms"] for r in pick[rr]]
            row[name] = {
                "p50_ms_median": statistics.median(p50),
                "p50_ms_range": [min(p50), max(p50)],
                "p95_ms_median": statistics.median(r["p95_ms"] for r in pick[rr]),
                "p99_ms_median": statistics.median(r["p99_ms"] for r in pick[rr]),
                "throughput_rps_median": statistics.median(r["throughput_rps"] for r in pick[rr]),
            }
        pairs = [b["p50_ms"] / a["p50_ms"] - 1 for a, b in zip(pick[0], pick[1], strict=True)]
        row["rerank_overhead_p50"] = {
            "median": round(statistics.median(pairs), 3),
            "range": [round(min(pairs), 3), round(max(pairs), 3)],
        }
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=ROOT / "artifacts" / "emkum-flickr8k")
    ap.add_argument("--items", type=int, nargs="+", default=[10_000])
    ap.add_argument("--codec", default="SQ8")
    ap.add_argument("--pool", type=int, default=1, help="patch pooling factor (EMKUM_PATCH_POOL)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=int, default=10, help="length of one run")
    ap.add_argument("--candidates", type=int, default=100, help="K: CLS candidates reranked")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", dest="settings", action="append", default=[], help="a service setting, e.g. max_wait_ms=0")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "service_bench.json")
    args = ap.parse_args()
    card = load_model_card(args.model_dir)
    rng = np.random.default_rng(0)
    generator = run_wrk if shutil.which("wrk") else run_httpx
    queries = [" ".join(rng.choice(WORDS, 3)) for _ in range(64)]
    settings = {"patch_codec": args.codec, "patch_pool": args.pool, "queue_size": 1024}
    settings.update(dict(s.split("=", 1) for s in args.settings))
    report = {
        "machine": describe(),
        "model": card["name"],
        "settings": settings,
        "candidates": args.candidates,
        "load_generator": "wrk" if generator is run_wrk else "httpx (in-process)",
        "command": " ".join(sys.argv),
        "runs": [],
    }
    for n in args.items:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            fill(data, card, n, args.codec, args.pool, rng)
            with running_server(args.model_dir, data, Path(tmp), quiet=True, **settings) as srv:
                for _ in range(3):  # warm up: sessions, caches, page-in of the codes
                    httpx.post(f"{srv.url}/search/text", json={"query": "warm up"}, timeout=60)
                for repeat in range(args.repeats):
                    for c in args.concurrency:
                        for rerank in (False, True):
                            time.sleep(1)  # let the last run's in-flight requests finish first
                            before = stage_totals(srv.url)
                            stats = generator(srv.url, c, args.seconds, rerank, queries, args.candidates)
                            row = {"items": n, "repeat": repeat, "concurrency": c, "rerank": int(rerank), **stats}
                            row["server_stage_mean_ms"] = stage_means_ms(before, stage_totals(srv.url))
                            report["runs"].append(row)
                            print(json.dumps(row), flush=True)
    report["summary"] = summarise(report["runs"])
    for row in report["summary"]:
        print(json.dumps(row))
    write_report(args.out, report)


if __name__ == "__main__":
    main()
