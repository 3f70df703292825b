"""`POST /search/text` over 1M synthetic items: the single-node service against `emkum serve-cluster`
with 1, 2 and 4 shards on this machine, p50/p99 latency and throughput under 1 and 8 concurrent
clients (wrk, closed loop), with the rerank on as served (K = the model's candidates).

The items are synthetic vectors written straight through `VectorStore` (service_bench.py says why),
in the store setting a large collection uses: patch pooling 2 and SQ4, 8 KB of patch codes per
image plus the 1 KB CLS vector. Each layout is real: item i lives in shard `shard_of(id, N)`, as the
cluster's writes would put it. The shards of a layout are filled in parallel processes.

The Serve hop: the 1-shard cluster against the single node over the same directory is the whole
cost of going through Serve (proxy -> ingress replica -> encoder and shard deployments, each a Ray
call); `shards` in the responses' `timings_ms` is the ingress's fan-out wait alone.

    python benchmarks/cluster_bench.py --items 1000000 --shards 1 2 4
Writes benchmarks/results/cluster_bench.json (and keeps the filled directories under --work).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe, record, write_report  # noqa: E402
from benchmarks.service_bench import WORDS, run_wrk, unit  # noqa: E402
from index import VectorStore  # noqa: E402
from index.sharding import shard_of  # noqa: E402
from index.store import ItemInput  # noqa: E402
from runtime.modelcard import cls_dim, load_model_card, store_config  # noqa: E402
from tests.server import free_port, running_server  # noqa: E402

CODEC, POOL, BANK = "SQ4", 2, 512


def fill_shard(model_dir: Path, directory: Path, n: int, shards: int, shard: int) -> None:
    """Write shard `shard` of an n-item, `shards`-way layout: the ids that hash to it."""
    card = load_model_card(model_dir)
    if (directory / "done").exists():
        return
    shutil.rmtree(directory, ignore_errors=True)
    config = store_config(card, patch_codec=CODEC, use_gpu=False, patch_pool=POOL)
    store = VectorStore(directory, config)
    rng = np.random.default_rng(1000 + shard)
    dim, patches = card["dim"], card["image"]["num_patches"]
    bank = [unit(rng.standard_normal((patches, dim), dtype=np.float32)) for _ in range(BANK)]
    mine = [i for i in range(n) if shard_of(f"item{i}", shards) == shard]
    for start in tqdm(range(0, len(mine), 512), desc=f"{shards}-way shard {shard}", unit="batch", position=shard):
        ids = mine[start : start + 512]
        cls = unit(np.random.default_rng(ids[0]).standard_normal((len(ids), config.global_dim), dtype=np.float32))
        store.add([ItemInput(f"item{i}", cls[j], bank[i % BANK], {"n": i}) for j, i in enumerate(ids)])
    store.close()
    (directory / "done").touch()


def prepare(model_dir: Path, work: Path, n: int, layouts: list[int]) -> dict[int, Path]:
    roots = {}
    for shards in layouts:
        root = work / f"{n}-items-{shards}-shards"
        jobs = [(model_dir, root / f"shard-{s:02d}", n, shards, s) for s in range(shards)]
        with multiprocessing.get_context("spawn").Pool(min(2, shards)) as pool:
            pool.starmap(fill_shard, jobs)
        roots[shards] = root
    return roots


def wait_ready(url: str, timeout: float = 1200) -> None:
    """Opening 1M items (their codes from SQLite, the CLS snapshot) takes a while."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=60).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {timeout} s")
        time.sleep(2)


def measure(url: str, seconds: int, candidates: int, concurrency: list[int], repeats: int) -> dict:
    queries = [f"a {a} and a {b}" for a, b in zip(WORDS, WORDS[3:] + WORDS[:3], strict=True)]
    for q in queries[:4]:  # warm: first calls open sessions, fill caches
        httpx.post(f"{url}/search/text", json={"query": q, "candidates": candidates}, timeout=120)
    probe = httpx.post(f"{url}/search/text", json={"query": queries[0], "candidates": candidates}, timeout=60).json()
    out = {"timings_ms_of_one_query": probe["timings_ms"]}
    for c in concurrency:
        runs = [run_wrk(url, c, seconds, True, queries, candidates) for _ in range(repeats)]
        out[f"c{c}"] = {
            key: statistics.median(r[key] for r in runs) for key in ("p50_ms", "p99_ms", "throughput_rps", "non_2xx")
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts/emkum-flickr8k")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/emkum-cluster-bench"))
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cluster_bench.json")
    args = parser.parse_args()

    import ray
    from ray import serve

    from service.cluster.app import required_cpus, start_cluster
    from service.settings import Settings

    card = load_model_card(args.model)
    candidates = int(card.get("rerank", {}).get("candidates", 20))
    t0 = time.perf_counter()
    roots = prepare(args.model, args.work, args.items, sorted(set(args.shards) | {1}))
    report = {
        "machine": describe(),
        "items": args.items,
        "store": {"patch_codec": CODEC, "patch_pool": POOL, "bytes_per_item": 8192 + 4 * cls_dim(card)},
        "candidates": candidates,
        "fill_seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join(sys.argv),
        "rows": [],
    }
    single_dir = roots[1] / "shard-00"
    with running_server(
        args.model, single_dir, args.work, quiet=True, wait_ready=False, patch_codec=CODEC, patch_pool=POOL
    ) as srv:
        wait_ready(srv.url)
        row = measure(srv.url, args.seconds, candidates, args.concurrency, args.repeats)
        record(report, {"service": "emkum serve (one process)", **row})
    for shards in args.shards:
        need = required_cpus(shards)  # Ray's logical CPUs; the deployments share the machine's cores
        cpus = max(len(os.sched_getaffinity(0)), int(need + 0.999))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        try:
            settings = Settings(
                model_dir=args.model, data_dir=roots[shards], port=free_port(), patch_codec=CODEC, patch_pool=POOL
            )
            started = time.perf_counter()
            start_cluster(settings, shards)
            url = f"http://127.0.0.1:{settings.port}"
            wait_ready(url)
            ready_s = time.perf_counter() - started
            row = {"service": f"emkum serve-cluster, {shards} shard(s)", "start_seconds": round(ready_s, 1)}
            record(report, {**row, **measure(url, args.seconds, candidates, args.concurrency, args.repeats)})
        finally:
            serve.shutdown()
            ray.shutdown()
    single, one_shard = report["rows"][0], next((r for r in report["rows"] if "1 shard" in r["service"]), None)
    if one_shard:
        report["serve_hop_ms_p50_c1"] = round(one_shard["c1"]["p50_ms"] - single["c1"]["p50_ms"], 2)
    write_report(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1)[:3000])


if __name__ == "__main__":
    main()
