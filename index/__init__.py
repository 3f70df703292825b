"""The store and search engine: CLS vectors in a FAISS index, patch vectors through a FAISS codec,
ids and metadata in SQLite, two-stage search with CMLI rerank. numpy and faiss only (no torch)."""

from index.errors import CorruptStoreFile, IndexError_, ReadOnlyStore, StoreMismatch, UnknownItem
from index.store import SearchHit, StoreConfig, VectorStore

__all__ = [
    "CorruptStoreFile",
    "IndexError_",
    "ReadOnlyStore",
    "SearchHit",
    "StoreConfig",
    "StoreMismatch",
    "UnknownItem",
    "VectorStore",
]
