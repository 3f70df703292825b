"""CPU graphs: int8 variants of the exported fp32 graphs, and the export machine's choice of the
fastest graph whose outputs still agree with torch.

Why dynamic int8 (ONNX Runtime's `quantize_dynamic`, weights int8 per output channel, activations
quantised per call from their own range): on the 2-core development box (AVX-512 VNNI) it runs the
image graph about 2.5x faster than fp32 and keeps the CLS vectors at cosine 0.9995 to fp32, with no
calibration data to choose and keep. bf16 was not an option: ONNX Runtime's CPU kernels for x86 have
no bf16 MatMul. The measured comparison and the ranking quality are in docs/evidence.md.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

# relative error vs fp32 torch on the export's random inputs. Image: the default model measures ~0.03
# (cosine 0.9995). Text: ~0.2 on random token ids, 0.11 on real captions (cosine 0.994): looser, and
# the ranking it gives is what `emkum eval --precision int8` measures (docs/evidence.md)
INT8_TOLERANCE = 0.08
INT8_TEXT_TOLERANCE = 0.25


def quantize_int8(src: Path, dst: Path) -> None:
    """Write the dynamic int8 variant of the fp32 graph `src` to `dst`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)


def images_per_second(graph: Path, image_size: int, batch: int = 1, repeats: int = 5) -> float:
    """Median images/s of `graph` on this machine's CPU (one warm-up call first)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the service runs it
    session = ort.InferenceSession(str(graph), sess_options=options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(batch, 3, image_size, image_size)).astype(np.float32)
    session.run(None, {"pixels": x})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"pixels": x})
        times.append(time.perf_counter() - start)
    return batch / float(np.median(times))


def query_seconds(graph: Path, length: int, repeats: int = 20) -> float:
    """Median seconds of one text query of `length` tokens through `graph` on this machine's CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(graph), sess_options=options, providers=["CPUExecutionProvider"])
    feed = {"ids": np.full((1, length), 1000, dtype=np.int64), "mask": np.ones((1, length), dtype=np.int64)}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def cpu_name() -> str:
    """The CPU the speeds were measured on (model name from /proc/cpuinfo where there is one)."""
    import os
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores"


def choose_cpu_precision(speeds: dict[str, float], passed: dict[str, bool]) -> str:
    """The fastest variant whose parity check passed (fp32 always has: the export refuses otherwise)."""
    candidates = [name for name in speeds if passed.get(name, False)] or ["fp32"]
    return max(candidates, key=lambda name: speeds.get(name, 0.0))
