"""Image-embedding throughput of the default model: ONNX Runtime against plain PyTorch eager on the
same inputs in the same run, at batch 1 and batch 64; on a GPU also bf16 autocast and the share of
the GPU's measured matrix rate that the image tower reaches.

    python benchmarks/encoder_bench.py            # CPU here; on a GPU machine it adds CUDA rows
    python benchmarks/encoder_bench.py --cpu-graphs   # each CPU graph of the model (fp32, int8)

`--cpu-graphs` (issue #18): every CPU variant the model ships, as the service opens it, on the same
inputs in one run with the repeats interleaved (graph A, graph B, A, B, ...: a machine that slows
down part way slows all of them), medians and ranges; images/s at batch 1 and 8, the GFLOP/s that
is and its share of this machine's measured fp32 matrix rate, and text query latency on a real
caption.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.machine import describe, record, write_report


def timed(fn, reps: int) -> float:
    fn()  # warm-up (session init, allocator, kernel choice)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def image_flops(model, size: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # its module tracker needs autograd enabled
        model.encode_image(torch.zeros(1, 3, size, size), with_kd=False)
    return int(counter.get_total_flops())


def matmul_rate(device: str, dtype: torch.dtype) -> float:
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, 10 if device == "cuda" else 3)
    return 2 * n**3 / seconds


def interleaved(calls: dict[str, object], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call, `repeats` rounds, every call once per round (after one warm-up each)."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def cpu_graphs(model_dir: Path, report: dict, flops: int, repeats: int) -> None:
    """The fp32 and int8 graphs (and any other CPU variant in model.json) as the service runs them."""
    import json

    from runtime.encoders import graph_files, has_variant, open_session
    from runtime.tokenizer import TextTokenizer

    card = json.loads((model_dir / "model.json").read_text())
    variants = [p for p in ("fp32", "int8") if has_variant(card, p)]
    report["cpu_default"] = card.get("cpu", {}).get("precision", "fp32")
    rate = matmul_rate("cpu", torch.float32)
    report["cpu_fp32_matmul_gflops"] = round(rate / 1e9, 1)
    cpu = ["CPUExecutionProvider"]
    files = {p: graph_files(card, p)[0] for p in variants}
    texts = {p: graph_files(card, p)[1] for p in variants}
    images = {p: open_session(model_dir / files[p], cpu) for p in variants}
    size = card["image"]["size"]
    rng = np.random.default_rng(0)
    for batch in (1, 8):
        x = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
        calls = {p: (lambda s=s, x=x: s.run(None, {"pixels": x})) for p, s in images.items()}
        for p, secs in interleaved(calls, repeats).items():
            per_s = batch / float(np.median(secs))
            record(
                report,
                {
                    "graph": f"image {p} ({files[p]})",
                    "batch": batch,
                    "images_per_s": round(per_s, 2),
                    "images_per_s_range": [round(batch / max(secs), 2), round(batch / min(secs), 2)],
                    "gflops": round(per_s * flops / 1e9, 1),
                    "share_of_fp32_matmul_rate": round(per_s * flops / rate, 3),
                },
            )
    tokenizer = TextTokenizer(model_dir / card["files"]["tokenizer"], card["text"]["max_length"])
    query = tokenizer(["a brown dog runs through the tall grass beside a river"])
    feed = {"ids": query.ids, "mask": query.mask}
    text_sessions = {p: open_session(model_dir / texts[p], cpu) for p in variants}
    calls = {p: (lambda s=s: s.run(None, feed)) for p, s in text_sessions.items()}
    for p, secs in interleaved(calls, repeats * 4).items():
        record(
            report,
            {
                "graph": f"text {p} ({texts[p]})",
                "tokens": int(query.mask.sum()),
                "ms_p50": round(1000 * float(np.median(secs)), 2),
                "ms_range": [round(1000 * min(secs), 2), round(1000 * max(secs), 2)],
            },
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-graphs", action="store_true", help="time each CPU graph the model ships (fp32, int8)")
    ap.add_argument("--repeats", type=int, default=10, help="interleaved rounds for --cpu-graphs")
    ap.add_argument("--model-dir", type=Path, default=Path("artifacts/emkum-flickr8k"))
    ap.add_argument("--checkpoint", type=Path, default=Path("model/weights/emkum-flickr8k.partial.safetensors"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from model.checkpoint import load_checkpoint
    from training.export import ImageGraph

    model, _ = load_checkpoint(args.checkpoint)
    size = model.cfg.vision.image_size
    gpu = torch.cuda.is_available()
    report = {
        "machine": describe(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "providers_available": ort.get_available_providers(),
        "rows": [],
    }
    flops = image_flops(model, size)
    report["image_gflops_per_image"] = round(flops / 1e9, 2)
    if args.cpu_graphs:
        cpu_graphs(args.model_dir, report, flops, args.repeats)
        write_report(args.out or Path(__file__).parent / "results" / "encoder_bench-cpu-graphs.json", report)
        return
    rng = np.random.default_rng(0)
    graph = ImageGraph(model).eval()
    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* pip packages, when present
        ort.preload_dlls()
    graphs = {"fp32": args.model_dir / "image.onnx", "fp16": args.model_dir / "image.fp16.onnx"}
    sessions = {"onnxruntime-cpu": (["CPUExecutionProvider"], graphs["fp32"])}
    if "CUDAExecutionProvider" in ort.get_available_providers():
        sessions["onnxruntime-cuda"] = (["CUDAExecutionProvider"], graphs["fp32"])
        if graphs["fp16"].is_file():  # what the service runs on CUDA (EMKUM_PRECISION=auto)
            sessions["onnxruntime-cuda-fp16"] = (["CUDAExecutionProvider"], graphs["fp16"])
    for batch in args.batches:
        x = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
        reps = 3 if (batch > 8 and not gpu) else 10
        rows = []
        with torch.no_grad():
            xt = torch.from_numpy(x)
            rows.append(("torch-eager-cpu", timed(lambda xt=xt: graph(xt), reps)))
            if gpu:
                g = graph.to("cuda")
                xg = xt.to("cuda")
                rows.append(("torch-eager-cuda-fp32", timed(lambda g=g, xg=xg: g(xg), 20)))
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    rows.append(("torch-eager-cuda-bf16", timed(lambda g=g, xg=xg: g(xg), 20)))
                graph.to("cpu")
        for name, (providers, path) in sessions.items():
            session = ort.InferenceSession(str(path), providers=providers)
            rows.append((name, timed(lambda s=session, x=x: s.run(None, {"pixels": x}), reps if "cpu" in name else 20)))
        for name, seconds in rows:
            row = {
                "backend": name,
                "batch": batch,
                "seconds_per_batch": round(seconds, 5),
                "images_per_s": round(batch / seconds, 1),
            }
            record(report, row)
    if gpu:
        rate = matmul_rate("cuda", torch.bfloat16)
        report["gpu_bf16_matmul_tflops"] = round(rate / 1e12, 1)
        for row in report["rows"]:
            if "cuda" in row["backend"]:
                row["share_of_bf16_matmul_rate"] = round(row["images_per_s"] * flops / rate, 4)
    out = args.out or Path(__file__).parent / "results" / f"encoder_bench-{'gpu' if gpu else 'cpu'}.json"
    write_report(out, report)


if __name__ == "__main__":
    main()
