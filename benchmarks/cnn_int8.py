"""Whether the fine-grained head's second tower (model/cnn.py) belongs in the int8 image graph: the
default model's fp32 image graph quantised with its ConvNet kept fp32 (what `emkum export` writes)
and with it quantised too (ONNX Runtime's dynamic ConvInteger), timed in turns on one image, and
each one's error against the fp32 graph on the 26 scikit-image demo photos.

    python benchmarks/cnn_int8.py --model artifacts/emkum-flickr8k
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe  # noqa: E402


def outputs(session, pixels: np.ndarray) -> list[np.ndarray]:
    """CLS and patch vectors of each photo, one photo per call (as the service embeds one upload)."""
    runs = [session.run(None, {"pixels": pixels[i : i + 1]}) for i in range(len(pixels))]
    return [np.concatenate([r[k] for r in runs]) for k in (0, 1)]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def main(
    model: Path = typer.Option(ROOT / "artifacts" / "emkum-flickr8k", help="an exported model folder"),
    rounds: int = typer.Option(15, help="interleaved timing rounds"),
    out: Path = typer.Option(ROOT / "benchmarks" / "results" / "cnn_int8.json"),
) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from runtime.cpu import int8_weights_for_this_cpu
    from runtime.encoders import open_session
    from runtime.images import decode_square, normalize
    from runtime.modelcard import load_model_card
    from service.cli import demo_images
    from training.quantize import CNN_FP32, KEEP_FP32, fp32_node_names, interleaved_seconds

    card = load_model_card(model)
    src = model / card["files"]["image"]
    kind = int8_weights_for_this_cpu()
    nodes = onnx.load(str(src), load_external_data=False).graph.node
    text_only = tuple(parts for parts in KEEP_FP32 if parts != CNN_FP32)
    spec = card["image"]
    photos = sorted(demo_images().glob("*.png"))
    decoded = [decode_square(p.read_bytes(), spec["size"]) for p in photos]
    pixels = np.stack([normalize(d, spec["mean"], spec["std"]) for d in decoded])
    weights = {"s8": QuantType.QInt8, "u8": QuantType.QUInt8}[kind]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": src}
        for name, patterns in (("int8, ConvNet fp32", KEEP_FP32), ("int8, ConvNet int8", text_only)):
            keep = fp32_node_names(nodes, patterns)
            paths[name] = Path(tmp) / f"{len(paths)}.onnx"
            quantize_dynamic(str(src), str(paths[name]), weight_type=weights, per_channel=True, nodes_to_exclude=keep)
        sessions = {name: open_session(path, ["CPUExecutionProvider"]) for name, path in paths.items()}
        one = {"pixels": pixels[:1]}
        seconds = interleaved_seconds({n: (lambda s=s: s.run(None, one)) for n, s in sessions.items()}, rounds)
        ref = outputs(sessions["fp32"], pixels)
        rows = []
        for name, session in sessions.items():
            got = outputs(session, pixels)
            patch = cosine(got[1], ref[1])
            rows.append(
                {
                    "graph": name,
                    "ms_per_image": round(1000 * seconds[name], 1),
                    "cls_cosine_min": round(float(cosine(got[0], ref[0]).min()), 4),
                    "patch_cosine_mean": round(float(patch.mean()), 4),
                    "patch_cosine_min": round(float(patch.min()), 4),
                }
            )
            typer.echo(json.dumps(rows[-1]))
    report = {"machine": describe(), "model": str(model), "weights": kind, "photos": len(photos), "rows": rows}
    out.write_text(json.dumps(report, indent=2))
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
