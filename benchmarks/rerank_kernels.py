"""The pieces of one CMLI rerank at K = 100, on one core, in process, and the alternatives tried for
them: `python benchmarks/rerank_kernels.py` -> benchmarks/results/rerank_kernels.json.

Why: the rerank's cost decides whether it can stay on by default (docs/evidence.md). This times
what the store runs (`PatchCodec.inner_products` on SQ8 and SQ4 codes through ONNX Runtime's integer
GEMM, `cmli_from_similarities`) and, so the choices can be checked, the ways not taken: the same
products in float (numpy, the store's path until session 4), reducing over the strided middle axis,
one int8 weight matrix instead of two 7-bit ones (saturates MLAS's int16 pair sums on CPUs without
VNNI), session 4's unfused graph (MatMulInteger, then Cast, MatMul and Add as separate passes), and a
byte lookup table that unpacks SQ4 nibbles. The integer products are also timed on every core the
process has, as the service runs them for a search that is the only request in flight.
For SQ8 it also times copying the candidates' codes out of the store's per-item arrays, and the
alternative of two threads each copying and scoring half the candidates.

Codes are unit random vectors encoded by a codec trained on others like them: each error is
reported next to the codec's own (decoded vs original products), in units of the largest product.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.index_bench import unit  # noqa: E402
from benchmarks.machine import describe, record, write_report  # noqa: E402
from index import one_thread_per_search  # noqa: E402
from index.cmli import cmli_from_similarities  # noqa: E402
from index.codecs import PatchCodec  # noqa: E402
from index.integer_scoring import graph_session, split_weights  # noqa: E402

DIM, CANDIDATES, WORDS = 256, 100, 8


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1000, 3)


def single_int8_gemm(codes: np.ndarray, weights: np.ndarray) -> Callable[[], np.ndarray]:
    """uint8 codes x one int8 weight matrix (per-column scale to 127) -> float in ONNX Runtime (MLAS):
    the first attempt, before the 7-bit split of index/integer_scoring.py."""
    from onnx import TensorProto, helper

    inputs = [("c", TensorProto.UINT8, [None, codes.shape[1]]), ("w", TensorProto.INT8, [codes.shape[1], None])]
    inputs += [("a_scale", TensorProto.FLOAT, []), ("w_scale", TensorProto.FLOAT, [None])]
    inputs += [("a_zero", TensorProto.UINT8, []), ("w_zero", TensorProto.INT8, [None])]
    node = helper.make_node("MatMulIntegerToFloat", [n for n, _, _ in inputs], ["y"], domain="com.microsoft")
    graph = helper.make_graph(
        [node],
        "int8_gemm",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    session = graph_session(graph)
    scale = (np.abs(weights).max(axis=0) / 127).astype(np.float32)
    feed = {
        "c": codes,
        "w": np.round(weights / scale).astype(np.int8),
        "a_scale": np.array(1, np.float32),
        "w_scale": scale,
        "a_zero": np.array(0, np.uint8),
        "w_zero": np.zeros(len(scale), np.int8),
    }
    return lambda: session.run(None, feed)[0]


def unfused_integer_gemm(codes: np.ndarray, weights: np.ndarray, offset: np.ndarray) -> Callable[[], np.ndarray]:
    """Session 4's graph: the same two 7-bit parts, but MatMulInteger writes int32 products that Cast,
    MatMul (the parts' steps) and Add (the offset) each read again."""
    from onnx import TensorProto, helper

    inputs = [("codes", TensorProto.UINT8), ("parts", TensorProto.INT8), ("scales", TensorProto.FLOAT)]
    nodes = [
        helper.make_node("MatMulInteger", ["codes", "parts"], ["int_products"]),
        helper.make_node("Cast", ["int_products"], ["float_products"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["float_products", "scales"], ["scaled"]),
        helper.make_node("Add", ["scaled", "offset"], ["products"]),
    ]
    graph = helper.make_graph(
        nodes,
        "unfused",
        [helper.make_tensor_value_info(n, t, [None, None]) for n, t in inputs]
        + [helper.make_tensor_value_info("offset", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("products", TensorProto.FLOAT, None)],
    )
    session = graph_session(graph)

    def run() -> np.ndarray:
        parts, steps = split_weights(weights)
        m = weights.shape[1]
        scales = np.concatenate([np.diag(steps[:m]), np.diag(steps[m:])]).astype(np.float32)
        return session.run(None, {"codes": codes, "parts": parts, "scales": scales, "offset": offset})[0]

    return run


def gather_costs(codec: PatchCodec, codes: np.ndarray, words: np.ndarray, repeats: int, rng) -> dict:
    """What a lone query pays besides the products: copying its candidates' codes out of the store
    (one array per item, as `VectorStore` keeps them; 2,000 items, 131 MB, more than any cache) into
    one matrix, and whether two threads that each copy and score half the candidates beat one copy
    scored on two cores (`threads=2`, what the service does)."""
    from concurrent.futures import ThreadPoolExecutor

    per_item = len(codes) // CANDIDATES
    store = [codes[(i % CANDIDATES) * per_item : (i % CANDIDATES + 1) * per_item].copy() for i in range(2000)]
    picks = iter(np.tile(rng.permutation(2000), 2 * repeats + 10).reshape(-1, CANDIDATES))

    def gather() -> np.ndarray:
        return np.concatenate([store[i] for i in next(picks)])

    def score_half(chosen: np.ndarray) -> np.ndarray:
        return codec.inner_products(np.concatenate([store[i] for i in chosen]), words)

    helper_thread = ThreadPoolExecutor(1)

    def halves_on_two_threads() -> np.ndarray:
        chosen = next(picks)
        other = helper_thread.submit(score_half, chosen[CANDIDATES // 2 :])
        return np.concatenate([score_half(chosen[: CANDIDATES // 2]), other.result()])

    costs = {
        "gather_codes_ms": median_ms(gather, repeats),
        "gather_then_products_two_cores_ms": median_ms(
            lambda: codec.inner_products(gather(), words, threads=2), repeats
        ),
        "two_threads_each_gather_and_score_half_ms": median_ms(halves_on_two_threads, repeats),
    }
    helper_thread.shutdown()
    return costs


def measure(
    codec_name: str, vectors: int, words: np.ndarray, mask: np.ndarray, repeats: int, rng: np.random.Generator
) -> dict:
    cores = len(os.sched_getaffinity(0))
    codec = PatchCodec(codec_name, DIM)
    codec.train(unit(rng.standard_normal((20_000, DIM))))
    originals = unit(rng.standard_normal((CANDIDATES * vectors, DIM)))
    codes = codec.encode(originals)
    decoded = codec.decode(codes).astype(np.float64) @ words.T.astype(np.float64)
    largest = np.abs(decoded).max()

    def error(products: np.ndarray) -> float:
        return round(float(np.abs(products - decoded).max() / largest), 6)

    sim = codec.inner_products(codes, words).reshape(CANDIDATES, vectors, WORDS)
    row = {
        "codec": codec_name,
        "vectors_per_item": vectors,
        "codec_own_max_error_vs_largest": round(
            float(np.abs(decoded - originals.astype(np.float64) @ words.T).max() / largest), 6
        ),
        "inner_products_ms": median_ms(lambda: codec.inner_products(codes, words), repeats),
        "inner_products_max_error_vs_largest": error(codec.inner_products(codes, words)),
        "inner_products_all_cores": cores,
        "inner_products_all_cores_ms": median_ms(lambda: codec.inner_products(codes, words, threads=cores), repeats),
        "inner_products_float_ms": median_ms(lambda: codec.inner_products(codes, words, integer=False), repeats),
        "inner_products_float_max_error_vs_largest": error(codec.inner_products(codes, words, integer=False)),
        "cmli_max_contiguous_ms": median_ms(lambda: cmli_from_similarities(sim, mask), repeats),
        "cmli_max_strided_axis_ms": median_ms(lambda: sim.max(axis=1).mean(axis=1), repeats),
    }
    if codec_name == "SQ8":  # the decode's affine part folded into the weights, as the codec does
        _, weights, offset = codec.fold_queries(words)
        unfused = unfused_integer_gemm(codes, weights, offset)
        row["unfused_graph_ms"] = median_ms(unfused, repeats)
        row["unfused_graph_max_error_vs_largest"] = error(unfused())
        gemm = single_int8_gemm(codes, np.ascontiguousarray(weights))
        row["single_int8_weights_ms"] = median_ms(gemm, repeats)
        row["single_int8_weights_max_error_vs_largest"] = error(gemm() + offset)
        row.update(gather_costs(codec, codes, words, repeats, np.random.default_rng(1)))  # own draws: rows stay
    else:
        table = np.stack([np.arange(256) & 15, np.arange(256) >> 4], axis=1).astype(np.float32)
        weights = rng.standard_normal((DIM, WORDS)).astype(np.float32)
        row["sq4_nibble_lookup_table_ms"] = median_ms(
            lambda: np.take(table, codes, axis=0).reshape(len(codes), DIM) @ weights, repeats
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rerank_kernels.json")
    args = ap.parse_args()
    one_thread_per_search()  # as the service runs each search
    rng = np.random.default_rng(0)
    words = unit(rng.standard_normal((WORDS, DIM)))
    mask = np.array([0] + [1] * WORDS + [0])
    report: dict = {"machine": describe(), "candidates": CANDIDATES, "words": WORDS, "dim": DIM, "rows": []}
    for codec_name, vectors in (("SQ8", 256), ("SQ4", 64)):  # unpooled default; 2x2 pooled SQ4
        record(report, measure(codec_name, vectors, words, mask, args.repeats, rng))
    write_report(args.out, report)


if __name__ == "__main__":
    main()
