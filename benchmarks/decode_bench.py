"""Decode + validate + preprocess speed of the service's image path on one core, on real JPEGs
(the first 300 Flickr8k val images, 224 px). `python benchmarks/decode_bench.py`"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe  # noqa: E402
from runtime.images import decode_image, preprocess  # noqa: E402
from training.data import read_karpathy  # noqa: E402

FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"


def main() -> None:
    pairs = read_karpathy(FLICKR / "dataset_flickr8k.json", str(FLICKR / "images-val-*.tar"), "val")[:300]
    blobs = [p.read() for p in pairs]
    times = []
    for data in blobs:
        t0 = time.perf_counter()
        im = decode_image(data, "x.jpg", 20_000_000, 50_000_000)
        preprocess(im, 224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1000
    out = {
        "machine": describe(),
        "images": len(blobs),
        "mean_bytes": int(np.mean([len(b) for b in blobs])),
        "p50_ms": round(float(np.median(ms)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "images_per_s_one_core": round(1000 / float(ms.mean()), 1),
    }
    (ROOT / "benchmarks" / "results" / "decode_bench.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
