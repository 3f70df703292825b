"""Inner products of uint8 codes with float weights on ONNX Runtime's integer matrix product (MLAS).

Why: the rerank's largest cost is scoring every candidate vector's scalar-quantiser codes against
the query words. In float, numpy first widens the codes to fp32 (4x the bytes) and then multiplies;
MLAS multiplies the bytes themselves (uint8 x int8 -> int32), about 1.5x faster for the unpooled
rerank at K = 100 (`benchmarks/rerank_kernels.py`).

Precision: the float weights are written as two int8 matrices, w ~ s_hi * hi + s_lo * lo, the second
holding what the first rounded away, so the result is within ~1e-4 of the largest product (the
codec's own rounding is larger). Both halves use 7 bits ([-63, 63]): on x86 CPUs without VNNI,
MLAS's uint8 x int8 kernel adds pairs of byte products in int16 with saturation, and 255 * 127 * 2
overflows it; a full int8 query error of 5% (measured) was that overflow, not rounding.
255 * 63 * 2 = 32,130 fits.

Runs on one thread per call, as every search does (`one_thread_per_search`). The codec keeps its
float path (`PatchCodec.inner_products(..., integer=False)`) as the reference the tests hold this to."""

from __future__ import annotations

import functools

import numpy as np

BITS = 63  # the largest |int8| that cannot saturate MLAS's int16 pair sums (see above)


class IntegerScorer:
    """codes [T, d] uint8 x weights [d, M] float (+ offset [M]) -> [T, M] float32, in one ORT run."""

    def __init__(self) -> None:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        inputs = [
            ("codes", TensorProto.UINT8, [None, None]),
            ("parts", TensorProto.INT8, [None, None]),  # [d, 2M]: the high and the low parts side by side
            ("scales", TensorProto.FLOAT, [None, None]),  # [2M, M]: each part's scale, summed per word
            ("offset", TensorProto.FLOAT, [None]),
        ]
        nodes = [
            helper.make_node("MatMulInteger", ["codes", "parts"], ["int_products"]),
            helper.make_node("Cast", ["int_products"], ["float_products"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["float_products", "scales"], ["scaled"]),
            helper.make_node("Add", ["scaled", "offset"], ["products"]),
        ]
        graph = helper.make_graph(
            nodes,
            "integer_inner_products",
            [helper.make_tensor_value_info(name, kind, shape) for name, kind, shape in inputs],
            [helper.make_tensor_value_info("products", TensorProto.FLOAT, [None, None])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8  # readable by every onnxruntime this project allows (>= 1.18)
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def __call__(self, codes: np.ndarray, weights: np.ndarray, offset: np.ndarray) -> np.ndarray:
        parts, scales = split_weights(weights)
        feed = {
            "codes": np.ascontiguousarray(codes, dtype=np.uint8),
            "parts": parts,
            "scales": scales,
            "offset": np.ascontiguousarray(offset, dtype=np.float32),
        }
        return self._session.run(None, feed)[0]


def split_weights(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """weights [d, M] -> int8 parts [d, 2M] and scales [2M, M] with parts @ scales ~ weights."""
    weights = np.asarray(weights, dtype=np.float64)
    high_scale = _scale(weights)
    high = np.round(weights / high_scale)
    rest = weights - high * high_scale
    low_scale = _scale(rest)
    low = np.round(rest / low_scale)
    m = weights.shape[1]
    scales = np.zeros((2 * m, m), dtype=np.float32)
    scales[np.arange(m), np.arange(m)] = high_scale
    scales[m + np.arange(m), np.arange(m)] = low_scale
    return np.concatenate([high, low], axis=1).astype(np.int8), scales


def _scale(weights: np.ndarray) -> np.ndarray:
    """Per column, the step that maps its largest magnitude to BITS (1 for an all-zero column)."""
    top = np.abs(weights).max(axis=0) / BITS
    return np.where(top > 0, top, 1.0)


@functools.cache
def integer_scorer() -> IntegerScorer:
    """One scorer per process: an ORT session is safe to run from many threads at once."""
    return IntegerScorer()
