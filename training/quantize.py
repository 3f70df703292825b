"""CPU graphs: int8 variants of the exported fp32 graphs, and the export machine's choice of the
fastest graph whose outputs still agree with torch.

Why dynamic int8 (ONNX Runtime's `quantize_dynamic`, weights int8 per output channel, activations
quantised per call from their own range): on the 2-core development box (AVX-512 VNNI) it runs the
image graph about 2x faster than fp32 and keeps the CLS vectors at cosine 0.998 of fp32 on real
photos, with no calibration data to choose and keep. Static QDQ int8 with calibration on 32 training
images was tried and kept them at only 0.986 (min-max ranges) or 0.967 (99.99th percentile), no
faster; bf16 was not an option: ONNX Runtime's CPU kernels for x86 have no bf16 MatMul. The
measured comparison and the ranking quality are in docs/evidence.md.

The weights are int8 where this machine's CPU has VNNI and uint8 where it has not: ONNX Runtime's
uint8 x int8 kernel saturates without VNNI (runtime/cpu.py; `benchmarks/int8_weights.py` measured
0.10 error with int8 weights and 0.03 with uint8 on an AVX2-only AMD EPYC, at the same speed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Relative error vs fp32 torch on the export's random inputs. Image: the default model measures 0.03
# (cosine 0.998 on real photos). Text (its FFN output projections kept fp32, below): 0.11 on random
# token ids (cosine 0.997 on real captions). The ranking these give is what `emkum eval --precision
# int8` measures (docs/evidence.md).
INT8_TOLERANCE = 0.08
INT8_TEXT_TOLERANCE = 0.15


# Nodes left in fp32, each named by the parts its name contains:
# - the text tower's FFN output projections. BERT-style towers carry a few outlier channels through
#   their residual stream out of exactly these layers (Bondarenko et al., "Understanding and
#   Overcoming the Challenges of Efficient Transformer Quantization", 2021); with them in int8 the
#   default model's caption vectors fell to cosine 0.993 (min 0.972) of fp32, with them in fp32
#   0.997 (min 0.992), measured on 60 Flickr8k captions;
# - the fine-grained head's second tower (model/cnn.py): a tenth of the image graph's work, and in
#   int8 (ONNX Runtime's dynamic ConvInteger) both slower and wrong: 170.8 ms per image against 130.1
#   with it fp32, patch vectors at cosine 0.80 (min) of fp32 against 0.994, on an AVX2 AMD EPYC
#   (benchmarks/cnn_int8.py, benchmarks/results/cnn_int8.json).
CNN_FP32 = ("/cnn/",)
KEEP_FP32 = (("/text/blocks.", "/mlp/fc2/"), CNN_FP32)


def fp32_node_names(nodes, patterns: tuple[tuple[str, ...], ...] = KEEP_FP32) -> list[str]:
    """The names of the graph nodes that `patterns` keep in fp32 (a node is kept when its name
    contains every part of one pattern)."""
    return [n.name for n in nodes if any(all(part in n.name for part in parts) for parts in patterns)]


def quantize_int8(src: Path, dst: Path, weights: str = "s8", reduce_range: bool = False) -> None:
    """Write the dynamic int8 variant of the fp32 graph `src` to `dst` (KEEP_FP32 nodes excepted), its
    weights int8 ('s8') or uint8 ('u8'; runtime/cpu.py says which a CPU runs without saturation).
    `reduce_range` (7-bit weights, ONNX Runtime's other remedy for saturation) is only measured, by
    benchmarks/int8_weights.py: uint8 weights were closer to fp32 at the same speed."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src), load_external_data=False).graph
    keep = fp32_node_names(graph.node)
    weight_type = {"s8": QuantType.QInt8, "u8": QuantType.QUInt8}[weights]
    quantize_dynamic(
        str(src), str(dst), weight_type=weight_type, per_channel=True, reduce_range=reduce_range, nodes_to_exclude=keep
    )


def interleaved_seconds(calls: dict[str, Callable[[], object]], rounds: int = 9) -> dict[str, float]:
    """Median seconds of each call, after one warm-up each, timed in turns (a b, b a, a b, ...): a
    drift of the machine's speed (a busy neighbour, a clock change) then falls on every candidate
    alike instead of on whichever was timed last. Timing each graph in its own block let the export
    on a 2-core AMD box call fp32 faster than uint8 (113 against 130 ms) where 10 interleaved repeats
    of benchmarks/int8_weights.py measured uint8 1.3-1.4x faster."""
    names = list(calls)
    for name in names:
        calls[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def image_and_query_seconds(variants: dict[str, tuple[Path, Path]], image_size: int, length: int) -> dict[str, float]:
    """For each variant (its image graph, its text graph): the median seconds of one image and one
    `length`-token query, the graphs opened as the service opens them, timed interleaved."""
    from runtime.encoders import open_session

    pixels = {"pixels": np.random.default_rng(0).normal(size=(1, 3, image_size, image_size)).astype(np.float32)}
    query = {"ids": np.full((1, length), 1000, dtype=np.int64), "mask": np.ones((1, length), dtype=np.int64)}
    calls = {}
    for name, (image, text) in variants.items():
        image_session = open_session(image, ["CPUExecutionProvider"])
        text_session = open_session(text, ["CPUExecutionProvider"])
        calls[name] = lambda i=image_session, t=text_session: (i.run(None, pixels), t.run(None, query))
    return interleaved_seconds(calls)


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
