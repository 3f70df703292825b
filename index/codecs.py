"""Patch-vector codecs: FAISS standalone codecs (`sa_encode` / `sa_decode`) chosen by factory string.

- "SQfp16": exact to fp16, 2 bytes per dimension (512 B per 256-d vector).
- "SQ8": 8-bit scalar quantiser, 1 byte per dimension.
- "PQ32x8" etc.: product quantiser, one byte per sub-vector (32 B per vector at PQ32).
The caller never branches on the codec: it encodes, stores bytes, decodes only rerank candidates."""

from __future__ import annotations

import faiss
import numpy as np

from index.errors import CorruptStoreFile


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

    def encode(self, vectors: np.ndarray) -> np.ndarray:
        return self.index.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        return self.index.sa_decode(np.ascontiguousarray(codes, dtype=np.uint8))

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
