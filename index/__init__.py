"""The store and search engine: CLS vectors in a FAISS index, patch vectors through a FAISS codec,
ids and metadata in SQLite, two-stage search with CMLI rerank. numpy and faiss only (no torch).

FAISS's OpenMP threads spin for a while after each search by default; the CMLI rerank that follows
runs numpy's BLAS threads on the same cores, and the spinning made it 1.6x slower (SQ8, K = 100:
7.5 ms vs 4.6 ms on 2 cores). Passive waiting is the default here unless the user set it."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before faiss (and its libgomp) is loaded

from index.errors import CorruptStoreFile, DuplicateItem, IndexError_, ReadOnlyStore, StoreMismatch, UnknownItem
from index.store import Query, SearchHit, StoreConfig, VectorStore, WordMatch, one_thread_per_search

__all__ = [
    "CorruptStoreFile",
    "DuplicateItem",
    "IndexError_",
    "Query",
    "ReadOnlyStore",
    "SearchHit",
    "StoreConfig",
    "StoreMismatch",
    "UnknownItem",
    "VectorStore",
    "WordMatch",
    "one_thread_per_search",
]
