"""Items spread over shards by a stable hash of their id, and one search over all shards that returns
what a single store holding every item would.

Why the merge takes the candidates' CLS scores and not each shard's top k: a single store reranks the
global top `candidates` by CLS, then keeps the top k by the fused score. A shard that only sent its
own top k by fused score could send an item that is in its local top `candidates` but not in the
global one (another shard has `candidates` items with higher CLS scores), and leave out none that
matter - so the merged top k could hold an item the single store never reranked. Each shard sends
its whole top `candidates`, reranked: the merge keeps the global top `candidates` by CLS score (every
item of the global set is in its own shard's local set), then the top k by fused score. Both scores
depend only on the query and the item, so the ids and scores are the single store's. That holds for
exact CLS indexes (Flat). With IVF or HNSW each shard searches its own smaller index approximately:
results stay good (a smaller index is searched with the same nprobe/efSearch, so recall per shard is
usually higher) but are no longer the single store's.
"""

from __future__ import annotations

import heapq
import zlib
from collections.abc import Sequence

from index.store import SearchHit


def shard_of(item_id: str, shards: int) -> int:
    """The shard an id lives on: crc32 of its UTF-8 bytes modulo the shard count (also what
    `emkum bulk-index` writes by, so its output directories are the cluster's shards)."""
    return zlib.crc32(item_id.encode()) % shards


def shard_candidates(k: int, candidates: int) -> int:
    """How many reranked hits each shard returns for a search of top k out of `candidates`."""
    return max(k, candidates)


def merge_shard_hits(per_shard: Sequence[Sequence[SearchHit]], k: int, candidates: int) -> list[SearchHit]:
    """The global top `candidates` by CLS score over every shard's reranked candidates, then its top k
    by final score, ties broken by CLS score then id (a single store breaks them by its index order)."""
    pool = heapq.nlargest(shard_candidates(k, candidates), (h for hits in per_shard for h in hits), key=_by_cls)
    return sorted(pool, key=lambda h: (-h.score, -h.cls_score, h.id))[:k]


def _by_cls(hit: SearchHit) -> tuple[float, str]:
    return hit.cls_score, hit.id
