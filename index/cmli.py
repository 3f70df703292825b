"""CMLI rerank over numpy arrays (seed 004, eq. 2 and 4): for each query token, the max cosine over a
candidate's vectors, averaged over the query's tokens. A pure function; the torch twin used in
training is `model/cmli.py`, and both are tested against one brute-force loop."""

from __future__ import annotations

import numpy as np


def pad_candidates(vectors: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack candidates with different vector counts into [K, Nmax, d] and a validity mask [K, Nmax]."""
    k = len(vectors)
    d = vectors[0].shape[1]
    n_max = max(v.shape[0] for v in vectors)
    out = np.zeros((k, n_max, d), dtype=np.float32)
    valid = np.zeros((k, n_max), dtype=bool)
    for i, v in enumerate(vectors):
        out[i, : v.shape[0]] = v
        valid[i, : v.shape[0]] = True
    return out, valid


def rerank_cmli(
    query_tokens: np.ndarray, query_mask: np.ndarray, candidates: np.ndarray, valid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """query_tokens [M, d], query_mask [M] (1 = a word), candidates [K, N, d] (valid [K, N]).

    Returns the CMLI score of each candidate [K] and, per candidate, the index of the vector that
    each query token matched best [K, M]."""
    words = query_tokens[query_mask.astype(bool)].astype(np.float32)
    k, n, d = candidates.shape
    if len(words) == 0:
        return np.zeros(k, dtype=np.float32), np.zeros((k, len(query_mask)), dtype=np.int64)
    sim = (candidates.reshape(k * n, d) @ words.T).reshape(k, n, -1)  # [K, N, M']
    if valid is not None:
        sim = np.where(valid[:, :, None], sim, -np.inf)
    best = sim.max(axis=1)  # [K, M']
    best_idx = np.zeros((k, len(query_mask)), dtype=np.int64)
    best_idx[:, query_mask.astype(bool)] = sim.argmax(axis=1)
    return best.mean(axis=1).astype(np.float32), best_idx
