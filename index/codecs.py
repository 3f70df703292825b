"""Patch-vector codecs: FAISS standalone codecs (`sa_encode` / `sa_decode`) chosen by factory string.

- "SQfp16": exact to fp16, 2 bytes per dimension (512 B per 256-d vector).
- "SQ8": 8-bit scalar quantiser, 1 byte per dimension.
- "PQ32x8" etc.: product quantiser, one byte per sub-vector (32 B per vector at PQ32).
The caller never branches on the codec: it encodes, stores bytes, and scores rerank candidates with
`inner_products`, which for the scalar quantisers works on the codes themselves.

Why `inner_products` exists: CMLI needs every query word against every candidate vector, and
materialising the decoded fp32 vectors of 100 candidates (26 MB at 256 x 256-d) cost more than the
rerank's arithmetic. An SQ8/SQ4 code decodes per dimension as vmin + (c + 0.5) / levels * vdiff, so
q . x = sum_d c_d * (q_d * vdiff_d / levels) + q . (vmin + 0.5 * vdiff / levels): the affine part
folds into the query once, and the codes need no decode: ONNX Runtime multiplies the bytes
themselves (`index/integer_scoring.py`), or numpy after a cast to float.
FAISS's own code-domain paths are slower from Python for this (range_search over the 25,600
candidate codes of K = 100 took 93 ms, search with k = 100 6 ms, this fold 3.7 ms in float, one thread).
Timings through the service: docs/evidence.md."""

from __future__ import annotations

import functools

import faiss
import numpy as np

from index.errors import CorruptStoreFile
from index.integer_scoring import integer_scorer


class PatchCodec:
    def __init__(self, factory: str, dim: int) -> None:
        self.factory = factory
        self.dim = dim
        self.index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    @property
    def code_size(self) -> int:
        return int(self.index.sa_code_size())

    def min_training_vectors(self) -> int:
        """PQ's k-means needs at least 2^nbits points per sub-quantiser; SQ only a range."""
        return 256 * 39 if "PQ" in self.factory else 1

    def train(self, sample: np.ndarray) -> None:
        self.index.train(np.ascontiguousarray(sample, dtype=np.float32))
        self.__dict__.pop("_affine", None)  # the cached ranges are the untrained ones

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        return self.index.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.index.sa_decode(np.ascontiguousarray(codes, dtype=np.uint8))

    def inner_products(
        self, codes: np.ndarray, queries: np.ndarray, integer: bool = True, threads: int = 1, chunk: int = 4096
    ) -> np.ndarray:
        """codes [T, code_size] -> [T, M]: the inner product of each decoded vector with each of the
        queries [M, d], equal to `decode(codes) @ queries.T` up to float rounding (integer=False) or
        to ~1e-4 of the largest product (integer=True: the bytes multiplied by ONNX Runtime's
        integer GEMM, `index/integer_scoring.py`; the default, ~1.5x faster on SQ8). `threads` cores
        share the integer GEMM; the other paths run on one."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        folded = self.fold_queries(queries)
        if folded is None:  # SQfp16, PQ: decode all candidates in one call, then one product
            return self.decode(codes) @ queries.T
        levels, weights, offset = folded
        if integer:
            return integer_scorer(threads)(codes if levels == 255 else _nibbles(codes), weights, offset)
        out = np.empty((len(codes), len(queries)), dtype=np.float32)
        for s in range(0, len(codes), chunk):  # chunks keep the float copy of the codes in cache
            part = codes[s : s + chunk] if levels == 255 else _nibbles(codes[s : s + chunk])
            out[s : s + chunk] = part.astype(np.float32) @ weights + offset
        return out

    def fold_queries(self, queries: np.ndarray) -> tuple[int, np.ndarray, np.ndarray] | None:
        """For a trained SQ8/SQ4 codec, (levels, weights [d, M], offset [M]) such that one byte per
        dimension (`_nibbles` order for SQ4) @ weights + offset = decode(codes) @ queries.T; else None."""
        if self._affine is None:
            return None
        levels, vmin, vdiff = self._affine
        weights = (vdiff / levels)[:, None] * queries.T  # [d, M]
        offset = queries @ (vmin + 0.5 * vdiff / levels)  # [M]
        if levels == 15:  # 4 bits: even dimensions in the low nibble, odd ones in the high nibble
            weights = np.concatenate([weights[0::2], weights[1::2]])  # the order of `_nibbles`
        return levels, weights, offset

    @functools.cached_property
    def _affine(self) -> tuple[int, np.ndarray, np.ndarray] | None:
        """(levels, vmin [d], vdiff [d]) for a trained 8- or 4-bit scalar quantiser, else None."""
        index = faiss.downcast_index(self.index)
        if not (isinstance(index, faiss.IndexScalarQuantizer) and self.is_trained):
            return None
        qt = faiss.ScalarQuantizer
        levels = {qt.QT_8bit: 255, qt.QT_8bit_uniform: 255, qt.QT_4bit: 15, qt.QT_4bit_uniform: 15}
        if index.sq.qtype not in levels:
            return None
        trained = faiss.vector_to_array(index.sq.trained).astype(np.float32)
        half = len(trained) // 2  # [vmin, vdiff], per dimension or one of each (uniform)
        vmin = np.broadcast_to(trained[:half], (self.dim,)).astype(np.float32)
        vdiff = np.broadcast_to(trained[half:], (self.dim,)).astype(np.float32)
        return levels[index.sq.qtype], vmin, vdiff

    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, factory: str, dim: int, blob: bytes, name: str) -> PatchCodec:
        codec = cls.__new__(cls)
        codec.factory, codec.dim = factory, dim
        try:
            codec.index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
        except RuntimeError as exc:
            raise CorruptStoreFile(f"{name}: the stored patch codec cannot be read ({exc})") from exc
        return codec


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """SQ4 codes [T, d/2] -> one byte per dimension [T, d]: low nibbles (even dimensions) first,
    then high nibbles (odd ones)."""
    half = codes.shape[1]
    out = np.empty((len(codes), 2 * half), dtype=np.uint8)
    np.bitwise_and(codes, 0x0F, out=out[:, :half])
    np.right_shift(codes, 4, out=out[:, half:])
    return out
