"""Inner products of uint8 codes with float weights on ONNX Runtime's integer matrix product (MLAS).

Why: the rerank's largest cost is scoring every candidate vector's scalar-quantiser codes against
the query words. In float, numpy first widens the codes to fp32 (4x the bytes) and then multiplies;
MLAS multiplies the bytes themselves (uint8 x int8 -> int32) and, in `MatMulIntegerToFloat`, scales
them to float in the same pass: ~1.5x faster for the unpooled rerank at K = 100, and 1.2x faster than
MatMulInteger followed by separate Cast/MatMul/Add passes (`benchmarks/rerank_kernels.py`).

Precision: the float weights are written as two int8 matrices, w ~ s_hi * hi + s_lo * lo, the second
holding what the first rounded away, so the result is within ~1e-4 of the largest product (the
codec's own rounding is larger). Both halves use 7 bits ([-63, 63]): on x86 CPUs without VNNI,
MLAS's uint8 x int8 kernel adds pairs of byte products in int16 with saturation, and 255 * 127 * 2
overflows it; a full int8 query error of 5% (measured) was that overflow, not rounding.
255 * 63 * 2 = 32,130 fits.

Runs on one thread per call, as every search does (`one_thread_per_search`), unless the caller asks
for more (a search alone on the machine). The codec keeps its float path
(`PatchCodec.inner_products(..., integer=False)`) as the reference the tests hold this to."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported when first used: `index` loads without them until a rerank needs them
    import onnx
    import onnxruntime as ort

BITS = 63  # the largest |int8| that cannot saturate MLAS's int16 pair sums (see above)


class IntegerScorer:
    """codes [T, d] uint8 x weights [d, M] float (+ offset [M]) -> [T, M] float32, in one ORT run.

    `threads` > 1 splits the codes' rows over that many cores (ONNX Runtime's intra-op pool, not
    spinning between calls, so an idle pool takes no time from the next request): worth it for a
    search that has the machine to itself, a loss under load (`VectorStore.search(threads=...)`)."""

    def __init__(self, threads: int = 1) -> None:
        from onnx import TensorProto, helper

        inputs = [
            ("codes", TensorProto.UINT8, [None, None]),
            ("parts", TensorProto.INT8, [None, None]),  # [d, 2M]: the high and the low parts side by side
            ("part_scales", TensorProto.FLOAT, [None]),  # [2M]: each part column's step
            ("part_offsets", TensorProto.FLOAT, [None]),  # [2M]: the offset on the high columns, 0 on the low
            ("sum_parts", TensorProto.FLOAT, [None, None]),  # [2M, M]: adds each word's two columns
        ]
        constants = [
            helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),  # the codes are the levels themselves
            helper.make_tensor("zero", TensorProto.UINT8, [], [0]),
        ]
        nodes = [  # MatMulIntegerToFloat: the integer GEMM with the scaling fused into its output pass
            helper.make_node(
                "MatMulIntegerToFloat",
                ["codes", "parts", "one", "part_scales", "zero", "", "part_offsets"],
                ["part_products"],
                domain="com.microsoft",
            ),
            helper.make_node("MatMul", ["part_products", "sum_parts"], ["products"]),
        ]
        graph = helper.make_graph(
            nodes,
            "integer_inner_products",
            [helper.make_tensor_value_info(name, kind, shape) for name, kind, shape in inputs],
            [helper.make_tensor_value_info("products", TensorProto.FLOAT, [None, None])],
            initializer=constants,
        )
        self.threads = threads
        self._session = graph_session(graph, threads)

    def __call__(self, codes: np.ndarray, weights: np.ndarray, offset: np.ndarray) -> np.ndarray:
        parts, steps = split_weights(weights)
        m = weights.shape[1]
        feed = {
            "codes": np.ascontiguousarray(codes, dtype=np.uint8),
            "parts": parts,
            "part_scales": steps,
            "part_offsets": np.concatenate([offset, np.zeros(m)]).astype(np.float32),
            "sum_parts": _sum_parts(m),
        }
        return self._session.run(None, feed)[0]


def graph_session(graph: onnx.GraphProto, threads: int = 1) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for a graph built with onnx.helper (standard and com.microsoft ops),
    on `threads` cores whose pool does not spin between calls (an idle pool takes no time from the
    next request). The benchmarks build the alternatives they time with it too."""
    import onnxruntime as ort
    from onnx import helper

    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8  # readable by every onnxruntime this project allows (>= 1.18)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def split_weights(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """weights [d, M] -> int8 parts [d, 2M] and steps [2M] with (parts * steps) summed per word ~ weights:
    column j of the result is parts[:, j] * steps[j] + parts[:, M + j] * steps[M + j]."""
    weights = np.asarray(weights, dtype=np.float64)
    high_step = _step(weights)
    high = np.round(weights / high_step)
    rest = weights - high * high_step
    low_step = _step(rest)
    low = np.round(rest / low_step)
    parts = np.concatenate([high, low], axis=1).astype(np.int8)
    return parts, np.concatenate([high_step, low_step]).astype(np.float32)


@functools.cache
def _sum_parts(m: int) -> np.ndarray:
    """[2M, M]: column j adds part columns j and M + j (one MatMul after the GEMM, cached per M)."""
    return np.concatenate([np.eye(m), np.eye(m)]).astype(np.float32)


def _step(weights: np.ndarray) -> np.ndarray:
    """Per column, the step that maps its largest magnitude to BITS (1 for an all-zero column)."""
    top = np.abs(weights).max(axis=0) / BITS
    return np.where(top > 0, top, 1.0)


@functools.cache
def integer_scorer(threads: int = 1) -> IntegerScorer:
    """One scorer per thread count per process: an ORT session is safe to run from many threads at once."""
    return IntegerScorer(threads)
