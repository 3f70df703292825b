"""`ClsIndex`: the FAISS index over the items' CLS vectors, keyed by the store's integer ids, with
the three things FAISS alone does not give the store:

- an index that needs training (IVF, PQ) holds its first vectors aside and searches them exactly
  until it has enough to train on, so a new collection is searchable from its first item;
- HNSW graphs cannot remove vectors (FAISS aborts rather than raising), so deleted ids are hidden
  (tombstones) until the index is next rebuilt from the item table;
- placement on a GPU when FAISS has one, staying on the CPU otherwise or for types without a GPU
  version.
"""

from __future__ import annotations

import re

import faiss
import numpy as np


class ClsIndex:
    def __init__(self, dim: int, factory: str, index: faiss.Index | None = None) -> None:
        """A new index for `factory`, or `index` as loaded from a snapshot."""
        self.factory = factory
        # IVF indexes carry ids themselves; IDMap2's removal assumes an order-preserving inner
        # index, which IVF is not (FAISS asserts), so only the others are wrapped.
        prefix = "" if factory.startswith("IVF") else "IDMap2,"
        self.index = (
            index if index is not None else faiss.index_factory(dim, prefix + factory, faiss.METRIC_INNER_PRODUCT)
        )
        self.pending: dict[int, np.ndarray] = {}  # vectors waiting for the index to be trained
        self.tombstones: set[int] = set()
        self.gpu = False

    def __len__(self) -> int:
        return int(self.index.ntotal + len(self.pending) - len(self.tombstones))

    def _training_size(self) -> int:
        m = re.search(r"IVF(\d+)", self.factory)
        need = 39 * int(m.group(1)) if m else 1
        return max(need, 256 * 39 if "PQ" in self.factory else 1)

    def add(self, rows: list[tuple[int, np.ndarray]]) -> None:
        if not rows:
            return
        if not self.index.is_trained:
            self.pending.update(rows)
            if len(self.pending) < self._training_size():
                return
            iids = np.fromiter(self.pending, dtype=np.int64)
            vecs = np.stack([self.pending[i] for i in iids]).astype(np.float32)
            self.index.train(vecs)
            self.pending.clear()
            self.index.add_with_ids(vecs, iids)
            return
        iids = np.array([r[0] for r in rows], dtype=np.int64)
        self.index.add_with_ids(np.stack([r[1] for r in rows]).astype(np.float32), iids)

    def remove(self, iid: int) -> None:
        if self.pending.pop(iid, None) is not None:
            return
        # HNSW graphs cannot remove vectors (FAISS aborts rather than raising): hide the id instead;
        # it disappears for good when the index is next rebuilt from the table.
        removed = 0 if "HNSW" in self.factory else self.index.remove_ids(np.array([iid], dtype=np.int64))
        if not removed:
            self.tombstones.add(iid)

    def hide_all_but(self, live: set[int]) -> None:
        """Tombstone every stored id not in `live` (a snapshot may hold ids deleted since)."""
        self.tombstones |= self._stored_ids() - live

    def _stored_ids(self) -> set[int]:
        if hasattr(self.index, "id_map"):
            return set(faiss.vector_to_array(self.index.id_map).tolist())
        ivf = faiss.extract_index_ivf(self.index)
        lists = ivf.invlists
        out: set[int] = set()
        for list_no in range(ivf.nlist):
            size = lists.list_size(list_no)
            if size:
                out.update(faiss.rev_swig_ptr(lists.get_ids(list_no), size).tolist())
        return out

    def place_on_gpu(self) -> None:
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            return
        try:
            self._gpu_res = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self.index)
        except RuntimeError:  # this index type has no GPU version: stay on the CPU
            return
        self.gpu = True

    def snapshot_view(self) -> faiss.Index | None:
        """A CPU index to serialise, or None while vectors wait for training (they are replayed
        from the change log instead)."""
        if self.pending:
            return None
        return faiss.index_gpu_to_cpu(self.index) if self.gpu else self.index

    def search(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, inner products) of the `n` best, best first."""
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        iids, scores = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        if self.index.ntotal:
            fetch = min(n + len(self.tombstones), self.index.ntotal)
            s, i = self.index.search(q, fetch)
            keep = i[0] >= 0  # -1 pads a short IVF result
            if self.tombstones:  # only HNSW deletions leave any
                keep &= ~np.isin(i[0], np.fromiter(self.tombstones, dtype=np.int64))
            iids, scores = i[0][keep], s[0][keep]
        if self.pending:  # not yet trained: exact search over the waiting vectors
            p_iids = np.fromiter(self.pending, dtype=np.int64)
            p_scores = np.stack([self.pending[x] for x in p_iids]) @ q[0]
            iids, scores = np.concatenate([iids, p_iids]), np.concatenate([scores, p_scores])
            order = np.argsort(-scores, kind="stable")
            iids, scores = iids[order], scores[order]
        return iids[:n], scores[:n].astype(np.float32)
