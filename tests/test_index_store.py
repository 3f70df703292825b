"""The store: ids, upsert, delete, persistence, crash safety, corrupt files and rerank order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from index import CorruptStoreFile, Query, StoreConfig, StoreMismatch, UnknownItem, VectorStore
from index.cmli import rerank_cmli
from index.store import ItemInput
from tests.conftest import unit
from tests.reference import cmli_t2i_loop
from tests.server import read_only_view

D = 16
# Scores computed on SQ8/SQ4 codes go through the integer GEMM (index/integer_scoring.py): within
# ~1e-4 of decoding first and multiplying in float; the codec's own rounding is ~10x larger.
ON_CODES_ATOL = 3e-4


def item(rng: np.random.Generator, name: str, n: int = 12, meta: dict | None = None) -> ItemInput:
    return ItemInput(name, unit(rng.normal(size=D)), unit(rng.normal(size=(n, D))), meta or {"name": name})


def cfg(**kw) -> StoreConfig:
    return StoreConfig(dim=D, model="test-model", **kw)


def test_add_get_count_and_list(tmp_path, rng):
    store = VectorStore(tmp_path, cfg())
    assert store.add([item(rng, "a"), item(rng, "b", meta={"x": 1})]) == ["created", "created"]
    assert len(store) == 2 and "a" in store and "zzz" not in store
    assert store.get("b") == {"id": "b", "metadata": {"x": 1}, "n_vectors": 12}
    assert [r["id"] for r in store.list(limit=1, offset=1)] == ["b"]
    with pytest.raises(UnknownItem):
        store.get("nope")


def test_upsert_replaces_vectors_and_metadata(tmp_path, rng):
    store = VectorStore(tmp_path, cfg())
    first = item(rng, "a")
    store.add([first, item(rng, "b")])
    second = item(rng, "a", n=5, meta={"v": 2})
    assert store.add([second]) == ["updated"]
    assert len(store) == 2
    assert store.get("a")["metadata"] == {"v": 2}
    np.testing.assert_allclose(store.vectors("a"), second.vectors, atol=1e-3)
    hits = store.search(Query(second.cls), k=1, rerank=False)
    assert hits[0].id == "a" and hits[0].cls_score == pytest.approx(1.0, abs=1e-5)
    assert store.counts() == {"metadata": 2, "cls": 2, "patches": 2, "ids": 2}


def test_delete_removes_from_search(tmp_path, rng):
    store = VectorStore(tmp_path, cfg())
    items = [item(rng, f"i{n}") for n in range(20)]
    store.add(items)
    store.delete("i3")
    assert "i3" not in store
    assert all(h.id != "i3" for h in store.search(Query(items[3].cls), k=20, rerank=False))
    with pytest.raises(UnknownItem):
        store.delete("i3")
    assert store.counts()["cls"] == 19


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat"])
def test_persistence_across_restart(tmp_path, rng, factory):
    store = VectorStore(tmp_path, cfg(cls_factory=factory, snapshot_every=7))
    items = [item(rng, f"i{n}") for n in range(200)]
    for start in range(0, 200, 25):
        store.add(items[start : start + 25])
    store.delete("i10")
    store.add([item(rng, "i11", meta={"new": True})])
    before = [(h.id, round(h.score, 5)) for h in store.search(Query(items[50].cls), k=5, rerank=False)]
    store._db.close()  # no clean snapshot: the next open must replay the change log
    again = VectorStore(tmp_path, cfg(cls_factory=factory, snapshot_every=7))
    assert len(again) == 199 and "i10" not in again
    assert again.get("i11")["metadata"] == {"new": True}
    assert [(h.id, round(h.score, 5)) for h in again.search(Query(items[50].cls), k=5, rerank=False)] == before
    assert again.counts() == {"metadata": 199, "cls": 199, "patches": 199, "ids": 199}


def test_rerank_matches_bruteforce_cmli(tmp_path, rng):
    store = VectorStore(tmp_path, cfg(patch_codec="SQfp16"))
    items = [item(rng, f"i{n}", n=int(rng.integers(3, 20))) for n in range(40)]
    store.add(items)
    q_cls = unit(rng.normal(size=D))
    q_tok = unit(rng.normal(size=(7, D)))
    q_mask = np.array([0, 1, 1, 1, 1, 0, 0])
    hits = store.search(Query(q_cls, q_tok, q_mask), k=10, candidates=40, rerank=True, cls_weight=0.0, explain=True)
    ref = sorted(((cmli_t2i_loop(q_tok, q_mask, it.vectors), it.id) for it in items), reverse=True)[:10]
    assert [h.id for h in hits] == [name for _, name in ref]
    for h, (score, _) in zip(hits, ref, strict=True):
        assert h.cmli_score == pytest.approx(score, abs=2e-3)
        assert h.score == pytest.approx(h.cmli_score)
    best = hits[0]
    vecs = next(it.vectors for it in items if it.id == best.id)
    for row, j in enumerate((1, 2, 3, 4)):  # explain: each word's best stored vector and its map
        word = best.words[row]
        assert word.label == str(j) and word.best == int(np.argmax(vecs @ q_tok[j]))
        assert word.score == pytest.approx(float(np.max(vecs @ q_tok[j])), abs=2e-2)  # SQ8 codes
        assert int(best.similarities[row].argmax()) == word.best


@pytest.mark.parametrize("rerank", [True, False])
def test_explain_returns_each_words_similarities_over_the_items_vectors(tmp_path, rng, rerank):
    store = VectorStore(tmp_path, cfg(patch_codec="SQ8", codec_training_vectors=200))
    store.add([item(rng, f"i{n}", n=int(rng.integers(3, 20))) for n in range(40)])  # ragged, trained SQ8
    q_tok, q_mask = unit(rng.normal(size=(6, D))), np.array([0, 1, 1, 0, 1, 0])
    hits = store.search(Query(unit(rng.normal(size=D)), q_tok, q_mask), k=5, candidates=20, rerank=rerank, explain=True)
    for h in hits:  # from the codes the rerank already scored, equal to the decoded vectors' products
        np.testing.assert_allclose(h.similarities, q_tok[[1, 2, 4]] @ store.vectors(h.id).T, atol=ON_CODES_ATOL)
    assert all(h.similarities is None for h in store.search(Query(unit(rng.normal(size=D)), q_tok, q_mask), k=5))


def test_fusion_weight_one_is_cls_order(tmp_path, rng):
    store = VectorStore(tmp_path, cfg())
    store.add([item(rng, f"i{n}") for n in range(30)])
    q = unit(rng.normal(size=D))
    plain = [h.id for h in store.search(Query(q), k=10, candidates=30, rerank=False)]
    fused = store.search(Query(q, unit(rng.normal(size=(4, D))), np.ones(4)), k=10, candidates=30, cls_weight=1.0)
    assert [h.id for h in fused] == plain


def test_rerank_numpy_handles_padding(rng):
    a, b = unit(rng.normal(size=(3, D))), unit(rng.normal(size=(9, D)))
    cand = np.zeros((2, 9, D), dtype=np.float32)
    cand[0, :3], cand[1] = a, b
    valid = np.zeros((2, 9), dtype=bool)
    valid[0, :3], valid[1] = True, True
    tok = unit(rng.normal(size=(5, D)))
    mask = np.array([1, 1, 0, 1, 1])
    scores = rerank_cmli(tok, mask, cand, valid)
    assert scores[0] == pytest.approx(cmli_t2i_loop(tok, mask, a), abs=1e-5)
    assert scores[1] == pytest.approx(cmli_t2i_loop(tok, mask, b), abs=1e-5)


@pytest.mark.parametrize(("codec", "max_bytes", "min_overlap"), [("SQfp16", 2 * D * 12, 1.0), ("SQ8", D * 12, 0.9)])
def test_codecs_size_and_rerank_quality(tmp_path, rng, codec, max_bytes, min_overlap):
    exact = VectorStore(tmp_path / "exact", cfg(patch_codec="SQfp16"))
    coded = VectorStore(tmp_path / codec, cfg(patch_codec=codec, codec_training_vectors=500))
    items = [item(rng, f"i{n}") for n in range(60)]
    exact.add(items)
    coded.add(items)
    assert coded.bytes_per_item() <= max_bytes
    overlaps = []
    for _ in range(10):
        q, t = unit(rng.normal(size=D)), unit(rng.normal(size=(6, D)))
        a = {h.id for h in exact.search(Query(q, t, np.ones(6)), k=10, candidates=60)}
        b = {h.id for h in coded.search(Query(q, t, np.ones(6)), k=10, candidates=60)}
        overlaps.append(len(a & b) / 10)
    assert np.mean(overlaps) >= min_overlap


@pytest.mark.parametrize(("codec", "on_codes"), [("SQ8", True), ("SQ4", True), ("SQfp16", False), ("PQ4x8", False)])
def test_rerank_scores_on_codes_equal_scores_on_decoded_vectors(tmp_path, rng, codec, on_codes):
    """SQ8/SQ4 score candidates on their codes (the decode folded into the query): the result must be
    what decoding first gives, after a restart too (the codec read back from the database)."""
    store = VectorStore(tmp_path, cfg(patch_codec=codec, codec_training_vectors=100))
    if codec.startswith("PQ"):
        store.train_codec(unit(rng.normal(size=(10000, D))))
    items = [item(rng, f"i{n}", n=int(rng.integers(3, 20))) for n in range(30)]
    store.add(items)
    store.close()
    store = VectorStore(tmp_path, cfg(patch_codec=codec))
    assert store.codec.is_trained
    assert (store.codec._affine is not None) == on_codes
    words = unit(rng.normal(size=(5, D)))
    codes = np.concatenate([store.codec.encode(it.vectors) for it in items])
    decoded = store.codec.decode(codes) @ words.T
    np.testing.assert_allclose(store.codec.inner_products(codes, words, integer=False), decoded, atol=1e-5)
    np.testing.assert_allclose(store.codec.inner_products(codes, words), decoded, atol=ON_CODES_ATOL)
    mask = np.array([1, 1, 0, 1, 1])
    hits = store.search(Query(unit(rng.normal(size=D)), words, mask), k=30, candidates=30, cls_weight=0.0)
    for h in hits:
        assert h.cmli_score == pytest.approx(cmli_t2i_loop(words, mask, store.vectors(h.id)), abs=ON_CODES_ATOL)
    query = unit(rng.normal(size=D))
    assert [(h.id, h.score) for h in store.search(Query(query, words, mask), k=30, candidates=30, threads=2)] == [
        (h.id, h.score) for h in store.search(Query(query, words, mask), k=30, candidates=30, threads=1)
    ]


@pytest.mark.parametrize(("codec", "need", "per_item"), [("SQ8", 240, 12), ("PQ4x8", 10_000, 40)])
def test_codec_trains_once_enough_vectors_are_stored(tmp_path, rng, codec, need, per_item):
    """Items added one by one are kept in fp16 until the codec has enough vectors to learn from (PQ's
    k-means: 39 x 256); then it trains on all of them and every row is re-encoded, durably."""
    store = VectorStore(tmp_path, cfg(patch_codec=codec, codec_training_vectors=need))
    items = [item(rng, f"i{n}", n=per_item) for n in range(need // per_item)]
    q, t, mask = unit(rng.normal(size=D)), unit(rng.normal(size=(5, D))), np.ones(5)
    for it in items[:-1]:
        store.add([it])
    assert not store.codec.is_trained and store.bytes_per_item() == per_item * D * 2  # fp16 rows
    originals = {it.id: it.vectors for it in items}
    for h in store.search(Query(q, t, mask), k=10, candidates=len(items), cls_weight=0.0):
        assert h.cmli_score == pytest.approx(cmli_t2i_loop(t, mask, originals[h.id]), abs=2e-3)
    store.add([items[-1]])
    assert store.codec.is_trained and store.bytes_per_item() == per_item * store.codec.code_size < per_item * D * 2
    hits = store.search(Query(q, t, mask), k=10, candidates=len(items), cls_weight=0.0)
    for h in hits:
        assert h.cmli_score == pytest.approx(cmli_t2i_loop(t, mask, store.vectors(h.id)), abs=ON_CODES_ATOL)
    store.close()
    reopened = VectorStore(tmp_path, cfg(patch_codec=codec))
    assert reopened.codec.is_trained and len(reopened) == len(items)
    again = reopened.search(Query(q, t, mask), k=10, candidates=len(items), cls_weight=0.0)
    assert [(h.id, h.cmli_score) for h in again] == [(h.id, h.cmli_score) for h in hits]


def test_codec_can_be_trained_early_and_only_once(tmp_path, rng):
    store = VectorStore(tmp_path, cfg(patch_codec="SQ8"))
    store.add([item(rng, "a"), item(rng, "b")])
    store.train_codec()  # on the 24 vectors stored so far, instead of waiting for 65,536
    assert store.codec.is_trained and store.bytes_per_item() == 12 * D
    with pytest.raises(ValueError, match="already trained"):
        store.train_codec()
    with pytest.raises(ValueError, match="needs 9984 vectors"):
        VectorStore(tmp_path / "pq", cfg(patch_codec="PQ4x8")).train_codec(unit(rng.normal(size=(100, D))))


def test_mismatched_model_or_dim_is_refused(tmp_path, rng):
    VectorStore(tmp_path, cfg()).add([item(rng, "a")])
    with pytest.raises(StoreMismatch, match=r"items\.sqlite.*model"):
        VectorStore(tmp_path, StoreConfig(dim=D, model="other"))
    with pytest.raises(StoreMismatch, match="dim"):
        VectorStore(tmp_path, StoreConfig(dim=D * 2, model="test-model"))


def test_cls_vectors_wider_than_the_patch_vectors(tmp_path, rng):
    """A model whose served global vector joins two (model.json cls_dim = 2 x dim): the CLS index and
    its snapshots take the wider vectors, the patches and the rerank keep theirs."""
    wide = lambda **kw: StoreConfig(dim=D, cls_dim=2 * D, model="test-model", snapshot_every=3, **kw)  # noqa: E731
    items = [ItemInput(f"i{i}", unit(rng.normal(size=2 * D)), unit(rng.normal(size=(6, D))), {}) for i in range(8)]
    store = VectorStore(tmp_path, wide())
    store.add(items)
    with pytest.raises(ValueError, match=rf"expected cls \[{2 * D}\] and vectors \[n>0, {D}\]"):
        store.add([item(rng, "narrow")])  # a CLS of the patch width is refused, naming both widths
    words = Query(items[5].cls, items[5].vectors, np.ones(6))
    assert store.search(Query(items[5].cls), k=1, rerank=False)[0].id == "i5"
    assert store.search(words, k=1, cls_weight=0.5)[0].id == "i5"
    again = VectorStore(tmp_path, wide())  # from the snapshot (taken every 3 changes) and the log
    assert len(again) == 8 and again.search(Query(items[2].cls), k=1, rerank=False)[0].id == "i2"
    with pytest.raises(StoreMismatch, match="cls_dim"):
        VectorStore(tmp_path, cfg())  # the same model name and patch width, a narrower CLS


def test_a_directory_from_before_cls_dim_opens_as_cls_at_dim(tmp_path, rng):
    import sqlite3

    VectorStore(tmp_path, cfg()).add([item(rng, "a")])
    db = sqlite3.connect(tmp_path / "items.sqlite")
    stored = json.loads(db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()[0])
    del stored["cls_dim"]
    db.execute("UPDATE meta SET value = ? WHERE key = 'config'", (json.dumps(stored).encode(),))
    db.commit()
    db.close()
    assert len(VectorStore(tmp_path, cfg())) == 1
    with pytest.raises(StoreMismatch, match="cls_dim"):
        VectorStore(tmp_path, StoreConfig(dim=D, cls_dim=2 * D, model="test-model"))


def test_corrupt_database_is_refused_with_its_name(tmp_path):
    (tmp_path / "items.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(CorruptStoreFile, match=r"items\.sqlite"):
        VectorStore(tmp_path, cfg())


def test_corrupt_snapshot_is_rebuilt_from_the_database(tmp_path, rng):
    store = VectorStore(tmp_path, cfg())
    items = [item(rng, f"i{n}") for n in range(10)]
    store.add(items)
    store.close()
    data = bytearray((tmp_path / "cls.faiss").read_bytes())
    data[-20:] = b"\x00" * 20
    (tmp_path / "cls.faiss").write_bytes(bytes(data))
    again = VectorStore(tmp_path, cfg())
    assert "cls.faiss" in again.snapshot_warning
    assert again.search(Query(items[4].cls), k=1, rerank=False)[0].id == "i4"


CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from index import StoreConfig, VectorStore
    from index.store import ItemInput
    store = VectorStore(sys.argv[1], StoreConfig(dim=16, model="test-model", snapshot_every=13))
    rng = np.random.default_rng(1)
    n = 0
    while True:
        batch = []
        for _ in range(3):
            v = rng.normal(size=(8, 16)).astype(np.float32)
            c = rng.normal(size=16).astype(np.float32)
            batch.append(ItemInput(f"k{n}", c / np.linalg.norm(c), v, {"n": n}))
            n += 1
        store.add(batch)
        print("ACK", " ".join(it.id for it in batch), flush=True)
        if n % 7 == 0:
            store.delete(f"k{n - 5}")
            print("DEL", f"k{n - 5}", flush=True)
    """
)


def kill_a_writer(path, after_acks: int) -> tuple[set[str], set[str]]:
    """Run CHILD writing into `path`, SIGKILL it once it acknowledged `after_acks` items; returns
    (acknowledged adds, acknowledged deletes)."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    acked, deleted = set(), set()
    for line in proc.stdout:
        kind, *names = line.split()
        (acked if kind == "ACK" else deleted).update(names)
        if len(acked) >= after_acks:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return acked, deleted


def test_sigkill_mid_write_loses_no_acknowledged_item(tmp_path):
    acked, deleted = kill_a_writer(tmp_path, 300)
    store = VectorStore(tmp_path, StoreConfig(dim=16, model="test-model"))
    present = {r["id"] for r in store.list(limit=100000)}
    assert acked - deleted <= present
    assert not (deleted & present)
    counts = store.counts()
    assert counts["metadata"] == counts["cls"] == counts["patches"] == len(store)
    some = sorted(acked - deleted)[0]
    assert store.search(Query(_cls_of(store, some)), k=1, rerank=False)[0].id == some


def test_read_only_directory_left_by_a_killed_writer_shows_every_acknowledged_item(tmp_path):
    """A writer killed mid-stream leaves its last commits in the -wal file; opened read-only (a read-only
    mount) the store must read them, not serve the older main file."""
    acked, deleted = kill_a_writer(tmp_path, 100)
    assert (tmp_path / "items.sqlite-wal").stat().st_size > 0  # the case under test: commits in the WAL
    probe = (
        "import json, sys; from index import StoreConfig, VectorStore; "
        f"s = VectorStore({str(tmp_path)!r}, StoreConfig(dim=16, model='test-model')); "
        "print(json.dumps([s.read_only, [r['id'] for r in s.list(limit=100000)]]))"
    )
    wrap, restore = read_only_view(tmp_path)
    try:
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        out = subprocess.run([*(wrap or []), sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    finally:
        restore()
    assert out.returncode == 0, out.stderr
    read_only, present = json.loads(out.stdout)
    assert read_only and acked - deleted <= set(present) and not (deleted & set(present))


def _cls_of(store: VectorStore, name: str) -> np.ndarray:
    row = store._db.execute("SELECT cls FROM items WHERE id = ?", (name,)).fetchone()
    return np.frombuffer(row[0], dtype=np.float32)


def test_patch_pooling_averages_grid_cells_and_is_recorded(tmp_path, rng):
    from index.pooling import pool_patches

    grid = 4
    vectors = unit(rng.normal(size=(grid * grid, D)))
    pooled = pool_patches(vectors, grid, 2)
    assert pooled.shape == (4, D)
    cell = vectors.reshape(2, 2, 2, 2, D)[0, :, 1, :].reshape(4, D).mean(0)  # top-right 2x2 cell
    np.testing.assert_allclose(pooled[1], cell / np.linalg.norm(cell), atol=1e-6)
    store = VectorStore(tmp_path, cfg(patch_pool=2, patch_grid=grid))
    store.add([ItemInput("a", unit(rng.normal(size=D)), vectors)])
    assert store.get("a")["n_vectors"] == 4
    np.testing.assert_allclose(store.vectors("a"), pooled, atol=1e-3)
    store.close()
    with pytest.raises(StoreMismatch, match="patch_pool"):
        VectorStore(tmp_path, cfg(patch_pool=1))
    with pytest.raises(ValueError, match="cannot pool"):
        pool_patches(vectors[:15], grid, 2)


def test_codec_and_pooling_left_open_follow_the_directory(tmp_path, rng):
    new = VectorStore(tmp_path / "new", cfg())
    assert (new.config.patch_codec, new.config.patch_pool) == ("SQ8", 1)  # the defaults for a new directory
    old = VectorStore(tmp_path / "old", cfg(patch_codec="SQfp16"))
    old.add([item(rng, "a")])
    old.close()
    reopened = VectorStore(tmp_path / "old", cfg())  # settings say nothing: keep what it was written with
    assert reopened.config.patch_codec == "SQfp16" and "a" in reopened
    reopened.close()
    with pytest.raises(StoreMismatch, match="patch_codec='SQfp16'"):
        VectorStore(tmp_path / "old", cfg(patch_codec="SQ4"))


def test_cls_index_searches_before_training_and_hides_hnsw_deletions(rng):
    from index.cls_index import ClsIndex

    vecs = unit(rng.normal(size=(200, D))).astype(np.float32)
    ivf = ClsIndex(D, "IVF4,Flat")  # trains once it holds 4 x 39 vectors
    ivf.add([(i, vecs[i]) for i in range(100)])
    assert not ivf.index.is_trained and len(ivf) == 100 and ivf.snapshot_view() is None
    ids, scores = ivf.search(vecs[7], 3)
    assert ids[0] == 7 and scores[0] == pytest.approx(1.0, abs=1e-5)  # exact over the waiting vectors
    ivf.remove(7)
    assert 7 not in ivf.search(vecs[7], 3)[0]
    ivf.add([(i, vecs[i]) for i in range(100, 200)])
    assert ivf.index.is_trained and ivf.index.ntotal == 199 and not ivf.pending
    assert ivf.snapshot_view() is ivf.index

    hnsw = ClsIndex(D, "HNSW16")
    hnsw.add([(i, vecs[i]) for i in range(50)])
    hnsw.remove(3)  # HNSW cannot remove: the id is hidden instead
    assert hnsw.index.ntotal == 50 and len(hnsw) == 49
    assert 3 not in hnsw.search(vecs[3], 10)[0]
    hnsw.hide_all_but(set(range(40)) - {3})
    assert len(hnsw) == 39 and not set(hnsw.search(vecs[45], 50)[0]) & set(range(40, 50))
