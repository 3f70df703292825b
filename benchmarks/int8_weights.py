"""int8 weights on this CPU: int8 (U8S8), int8 with 7-bit range (U8S8 reduce_range) and uint8 (U8U8).

On an x86 CPU without VNNI, ONNX Runtime's U8S8 kernel adds byte-product pairs in int16 with
saturation (runtime/cpu.py). This measures, for the default model's fp32 graphs quantised each way:
a full-scale MatMul probe (exact or saturated), relative error against the fp32 graphs on random
inputs (what the export's parity check uses), cosine to fp32 on real photos, and images/s and query
latency with the three graphs and fp32 run interleaved.

    python benchmarks/int8_weights.py      # writes benchmarks/results/int8_weights-<cpu>.json
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe, record, write_report  # noqa: E402
from runtime.cpu import int8_exact  # noqa: E402
from runtime.encoders import open_session  # noqa: E402
from runtime.images import preprocess  # noqa: E402
from runtime.modelcard import load_model_card  # noqa: E402
from service.cli import demo_images  # noqa: E402
from training.quantize import quantize_int8  # noqa: E402

VARIANTS = {
    "s8": {"weights": "s8"},
    "s8_reduce_range": {"weights": "s8", "reduce_range": True},
    "u8": {"weights": "u8"},
}


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def main(repeats: int = 10) -> None:
    model = ROOT / "artifacts/emkum-flickr8k"
    card = load_model_card(model)
    spec = card["image"]
    photos = sorted(p for p in demo_images().iterdir() if p.suffix in (".png", ".jpg"))
    real = np.stack([preprocess(Image.open(p).convert("RGB"), spec["size"], spec["mean"], spec["std"]) for p in photos])
    rng = np.random.default_rng(0)
    rand = rng.normal(size=(2, 3, spec["size"], spec["size"])).astype(np.float32)
    one, eight = rand[:1], np.concatenate([rand] * 4)
    ids = rng.integers(1000, 20000, size=(4, 13))
    query = {"ids": np.full((1, 13), 1000, dtype=np.int64), "mask": np.ones((1, 13), dtype=np.int64)}
    cpu = ["CPUExecutionProvider"]
    sessions = {"fp32": (open_session(model / "image.onnx", cpu), open_session(model / "text.onnx", cpu))}
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in VARIANTS.items():
            pair = []
            for graph in ("image", "text"):
                dst = Path(tmp) / f"{graph}.{name}.onnx"
                quantize_int8(model / f"{graph}.onnx", dst, **options)
                pair.append(open_session(dst, cpu))
            sessions[name] = tuple(pair)
        ref_image, ref_text = sessions["fp32"]
        ref_real = ref_image.run(None, {"pixels": real})
        ref_rand = ref_image.run(None, {"pixels": rand})
        ref_ids = ref_text.run(None, {"ids": ids, "mask": np.ones_like(ids)})
        speeds: dict[str, dict[str, list[float]]] = {k: {"b1": [], "b8": [], "query_ms": []} for k in sessions}
        for image, text in sessions.values():  # warm-up
            image.run(None, {"pixels": one})
            text.run(None, query)
        for _ in tqdm(range(repeats), desc="interleaved repeats"):
            for name, (image, text) in sessions.items():
                start = time.perf_counter()
                image.run(None, {"pixels": one})
                speeds[name]["b1"].append(1 / (time.perf_counter() - start))
                start = time.perf_counter()
                image.run(None, {"pixels": eight})
                speeds[name]["b8"].append(8 / (time.perf_counter() - start))
                start = time.perf_counter()
                text.run(None, query)
                speeds[name]["query_ms"].append(1000 * (time.perf_counter() - start))
        report = {"machine": describe(), "model": card["name"], "photos": len(photos), "rows": []}
        report["u8s8_exact_on_this_cpu"] = int8_exact("s8")
        for name, (image, text) in sessions.items():
            row: dict = {"graphs": name}
            for key, values in speeds[name].items():
                row[f"{key}_median"] = round(float(np.median(values)), 2)
                row[f"{key}_range"] = [round(min(values), 2), round(max(values), 2)]
            if name != "fp32":
                got_real = image.run(None, {"pixels": real})
                got_rand = image.run(None, {"pixels": rand})
                got_ids = text.run(None, {"ids": ids, "mask": np.ones_like(ids)})
                row.update(
                    random_rel_error_image_cls=round(relative_error(got_rand[0], ref_rand[0]), 4),
                    random_rel_error_text_cls=round(relative_error(got_ids[0], ref_ids[0]), 4),
                    photo_cls_cosine_mean=round(float(cosine(got_real[0], ref_real[0]).mean()), 5),
                    photo_cls_cosine_min=round(float(cosine(got_real[0], ref_real[0]).min()), 5),
                    photo_patch_cosine_mean=round(float(cosine(got_real[1], ref_real[1]).mean()), 5),
                    photo_patch_cosine_min=round(float(cosine(got_real[1], ref_real[1]).min()), 5),
                )
            record(report, row)
    slug = "vnni" if int8_exact("s8") else "no-vnni"
    write_report(ROOT / f"benchmarks/results/int8_weights-{slug}.json", report)


if __name__ == "__main__":
    main()
