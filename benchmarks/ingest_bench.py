"""Indexing throughput end to end: real JPEGs (Flickr8k val) through `POST /items` of the real service,
JPEG decoding, preprocessing, the image graph, the durable write and thumbnails included.

Clients post `--files-per-request` images per request from `--clients` concurrent connections; the
report gives images/s and the server's own mean time per stage (decode, encode_image), so the limit
shows: on a small CPU box the image graph, on a GPU the decoding (see docs/evidence.md).

    python benchmarks/ingest_bench.py --images 256        # CPU; add --set providers=cuda on a GPU
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe, record, write_report  # noqa: E402
from benchmarks.service_bench import stage_means_ms, stage_totals  # noqa: E402
from tests.server import running_server  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"


def read_jpegs(limit: int) -> list[tuple[str, bytes]]:
    """The first `limit` JPEGs of the val shards, as bytes (never written to the repository)."""
    shards = sorted(FLICKR.glob("images-val-*.tar"))
    if not shards:
        sys.exit(f"no Flickr8k val shards under {FLICKR}: this benchmark needs ../shared beside the repository")
    out = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile() and member.name.lower().endswith(".jpg"):
                    out.append((Path(member.name).name, tar.extractfile(member).read()))
                    if len(out) == limit:
                        return out
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=ROOT / "artifacts" / "emkum-flickr8k")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--files-per-request", type=int, default=8)
    ap.add_argument("--set", dest="settings", action="append", default=[], help="a service setting, e.g. max_batch=64")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ingest_bench.json")
    args = ap.parse_args()
    images = read_jpegs(args.images)
    settings = {"queue_size": 4096, **dict(s.split("=", 1) for s in args.settings)}
    report = {
        "machine": describe(),
        "settings": settings,
        "images": len(images),
        "mean_jpeg_bytes": sum(len(b) for _, b in images) // len(images),
        "command": " ".join(sys.argv),
        "rows": [],
    }
    for clients in args.clients:
        with (
            tempfile.TemporaryDirectory() as tmp,
            running_server(args.model_dir, Path(tmp) / "data", Path(tmp), quiet=True, **settings) as srv,
        ):
            requests = [images[i : i + args.files_per_request] for i in range(0, len(images), args.files_per_request)]

            def post(batch: list[tuple[str, bytes]], url: str = srv.url) -> int:
                files = [("files", (name, data, "image/jpeg")) for name, data in batch]
                with httpx.Client(base_url=url, timeout=600) as c:
                    r = c.post("/items", files=files, data={"ids": [name for name, _ in batch]})
                return r.status_code

            post(requests[0])  # warm up (also indexes the first batch again below: an upsert)
            before = stage_totals(srv.url)
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(clients) as pool:
                codes = list(pool.map(post, requests))
            wall = time.perf_counter() - t0
            row = {
                "clients": clients,
                "files_per_request": args.files_per_request,
                "status": {str(c): codes.count(c) for c in sorted(set(codes))},
                "images_per_s": round(len(images) / wall, 2),
                "server_stage_mean_ms": stage_means_ms(before, stage_totals(srv.url)),
                "provider": httpx.get(f"{srv.url}/readyz").json().get("provider"),
            }
            record(report, row)
    write_report(args.out, report)


if __name__ == "__main__":
    main()
