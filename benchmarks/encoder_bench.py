"""Image-embedding throughput of the default model: ONNX Runtime against plain PyTorch eager on the
same inputs in the same run, at batch 1 and batch 64; on a GPU also bf16 autocast and the share of
the GPU's measured matrix rate that the image tower reaches.

    python benchmarks/encoder_bench.py            # CPU here; on a GPU machine it adds CUDA rows
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
