"""How much an image's vectors depend on the other images in its encoder batch, per CPU graph.

The int8 graphs quantize activations dynamically with one scale per tensor, and a batch is one
tensor: the same photo embedded alone and beside seven others gets slightly different vectors, so
under the service's micro-batching a result would vary with the load. fp32 is batch-independent.
The served path (`Encoders`) therefore runs the int8 graphs one input per call; this measures both
that path and the int8 graph called with the whole batch, which is what it avoids.

    python benchmarks/int8_batch_dependence.py     # writes benchmarks/results/int8_batch_dependence.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe, record, write_report  # noqa: E402
from runtime.encoders import Encoders  # noqa: E402
from runtime.images import preprocess  # noqa: E402
from runtime.modelcard import load_model_card  # noqa: E402
from service.cli import demo_images  # noqa: E402

PHOTOS = ["rocket.jpg", "motorcycle_left.png", "chelsea.png", "coffee.png", "astronaut.png", "camera.png"]
PHOTOS += ["horse.png", "hubble_deep_field.jpg"]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def main() -> None:
    model = ROOT / "artifacts/emkum-flickr8k"
    card = load_model_card(model)
    spec = card["image"]
    pixels = [
        preprocess(Image.open(demo_images() / n).convert("RGB"), spec["size"], spec["mean"], spec["std"])
        for n in PHOTOS
    ]
    report = {"machine": describe(), "model": card["name"], "batch": len(PHOTOS), "rows": []}
    for precision in ("fp32", "int8"):
        encoders = Encoders(model, card, "cpu", precision)
        alone = [encoders.embed_images_now([p])[0] for p in pixels]
        served = encoders.embed_images_now(pixels)
        cls, patches = encoders.image_session.run(None, {"pixels": np.stack(pixels)})  # one call, all 8
        for path, batched in (
            ("served (Encoders)", [(e.cls, e.patches) for e in served]),
            ("graph, one call", list(zip(cls, patches, strict=True))),
        ):
            cls_cos = [float(cosine(a.cls, b[0])) for a, b in zip(alone, batched, strict=True)]
            patch_cos = np.concatenate([cosine(a.patches, b[1]) for a, b in zip(alone, batched, strict=True)])
            record(
                report,
                {
                    "precision": precision,
                    "path": path,
                    "cls_cosine_alone_vs_batched_min": round(min(cls_cos), 5),
                    "patch_cosine_min": round(float(patch_cos.min()), 5),
                    "patch_cosine_mean": round(float(patch_cos.mean()), 5),
                },
            )
        encoders.close()
    write_report(ROOT / "benchmarks/results/int8_batch_dependence.json", report)


if __name__ == "__main__":
    main()
