"""Which int8 graphs this CPU runs exactly (issue #18).

ONNX Runtime's int8 MatMul (MLAS) multiplies uint8 activations by the weights. With int8 weights
(U8S8) on an x86 CPU without VNNI it uses `vpmaddubsw`, which adds each pair of byte products in
int16 *with saturation*: 255 x 127 x 2 > 32,767, so large activations are clipped and the vectors
drift (ONNX Runtime's quantization docs say as much). VNNI (`vpdpbusd`, AVX-512 or AVX) and AMX add
in int32 and are exact. uint8 weights (U8U8) take a widening kernel that never saturates, at some
cost in speed on CPUs that have VNNI. Measured on the development boxes (docs/evidence.md): the
default model's int8 image graph errs 0.03 from fp32 on an Intel Xeon with VNNI and 0.10 (beyond
its tolerance) on an AMD EPYC with AVX2 only; with uint8 weights 0.03 on the AVX2 box.

So the export writes the int8 graph with the weights this machine runs exactly and records which
(model.json `cpu.int8_weights`), and a server on a CPU that would saturate on them does not pick it.
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

EXACT_U8S8_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none to read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def int8_exact(weights: str) -> bool:
    """Whether int8 graphs with `weights` ('s8' or 'u8') run without saturation here. Only U8S8 on
    x86 without VNNI saturates (ARM's int8 dot products accumulate in int32)."""
    return weights == "u8" or not is_x86() or bool(cpu_flags() & EXACT_U8S8_FLAGS)


def int8_weights_for_this_cpu() -> str:
    """'s8' (the fast kernels) where they are exact, 'u8' where they would saturate."""
    return "s8" if int8_exact("s8") else "u8"


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether bf16 matrix products run in hardware (AVX-512 BF16 or AMX on x86; ARM's bf16). Without
    it PyTorch emulates them: 0.8 GFLOP/s against 81 in fp32 for a 1024^3 product on the AVX2-only
    AMD EPYC of session 9, so CPU autocast to bf16 must be switched off there."""
    return bool((cpu_flags() if flags is None else flags) & {"avx512_bf16", "amx_bf16", "bf16"})
