"""Regression tests for the store defects of issue #15: a write naming one id twice, snapshots that
do not belong to the table, and the invariant after each: every acknowledged item is returned by a
search with its own vector, and nothing unacknowledged is."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from index import DuplicateItem, Query, StoreConfig, VectorStore
from index.errors import ReadOnlyStore
from index.store import ItemInput
from tests.conftest import unit

D = 16


def cfg(**kw) -> StoreConfig:
    return StoreConfig(dim=D, model="test-model", **kw)


def item(rng, name: str) -> ItemInput:
    return ItemInput(name, unit(rng.normal(size=D)), unit(rng.normal(size=(6, D))), {"name": name})


def assert_findable_exactly(store: VectorStore, acknowledged: dict[str, np.ndarray]) -> None:
    """The index's invariant: each acknowledged item is the top hit for its own CLS vector, and the
    store holds nothing else."""
    assert {r["id"] for r in store.list(limit=100_000)} == set(acknowledged)
    counts = store.counts()
    assert counts["metadata"] == counts["cls"] == counts["patches"] == len(acknowledged)
    for name, cls in acknowledged.items():
        assert store.search(Query(cls), k=1, rerank=False)[0].id == name


def test_one_write_naming_an_id_twice_is_refused_and_leaves_the_store_writable(tmp_path, rng):
    store = VectorStore(tmp_path, cfg())
    a = item(rng, "a")
    store.add([a])
    dup1, dup2 = item(rng, "dup"), item(rng, "dup")
    with pytest.raises(DuplicateItem, match="dup"):
        store.add([dup1, dup2])
    assert "dup" not in store
    with pytest.raises(Exception, match="no item"):
        store.get("dup")  # nothing half-written is visible
    b = item(rng, "b")
    assert store.add([b]) == ["created"]  # the next write works (it used to fail: transaction left open)
    assert_findable_exactly(store, {"a": a.cls, "b": b.cls})


def test_a_failure_inside_a_write_rolls_back_whatever_its_type(tmp_path, rng, monkeypatch):
    store = VectorStore(tmp_path, cfg())
    monkeypatch.setattr(store, "_delete_row", lambda iid: (_ for _ in ()).throw(TypeError("boom")))
    a = item(rng, "a")
    store.add([a])
    with pytest.raises(TypeError):
        store.add([item(rng, "a")])  # an update calls _delete_row, which fails mid-transaction
    assert not store._db.in_transaction
    monkeypatch.undo()
    b = item(rng, "b")
    store.add([b])
    store.close()
    assert_findable_exactly(VectorStore(tmp_path, cfg()), {"a": a.cls, "b": b.cls})


VICTIM = textwrap.dedent(
    """
    import sys, numpy as np
    from index import StoreConfig, VectorStore
    from index.store import ItemInput
    store = VectorStore(sys.argv[1], StoreConfig(dim=16, model="test-model"))
    rng = np.random.default_rng(int(sys.argv[2]))
    c = rng.normal(size=16).astype(np.float32)
    store.add([ItemInput("victim", c / np.linalg.norm(c), rng.normal(size=(6, 16)).astype(np.float32))])
    print("ACK", flush=True)
    sys.stdin.readline()
    """
)


def test_issue_sequence_duplicate_sigterm_restart_add_kill9_keeps_the_item(tmp_path, rng):
    """Defect 1, a clean stop, a restart, an acknowledged add, kill -9, a restart: the item is found."""
    store = VectorStore(tmp_path, cfg())
    first = item(rng, "first")
    store.add([first])
    with pytest.raises(DuplicateItem):
        store.add([item(rng, "dup"), item(rng, "dup")])
    store.close()  # the clean stop writes the shutdown snapshot
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen(
        [sys.executable, "-c", VICTIM, str(tmp_path), "7"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    assert proc.stdout.readline().strip() == b"ACK"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = VectorStore(tmp_path, cfg())
    rng7 = np.random.default_rng(7)
    c = rng7.normal(size=16).astype(np.float32)
    assert_findable_exactly(again, {"first": first.cls, "victim": c / np.linalg.norm(c)})


def _store_with(tmp_path, rng, names) -> tuple[VectorStore, dict]:
    store = VectorStore(tmp_path, cfg())
    items = [item(rng, n) for n in names]
    store.add(items)
    return store, {it.id: it.cls for it in items}


def test_an_older_snapshot_of_the_same_store_is_not_trusted(tmp_path, rng, caplog):
    store, acked = _store_with(tmp_path, rng, ["a", "b"])
    store.snapshot()
    old = (tmp_path / "cls.faiss").read_bytes()
    more = [item(rng, n) for n in ("c", "d")]
    store.add(more)
    acked.update({it.id: it.cls for it in more})
    store.close()  # snapshot covering c and d; their change rows are dropped
    (tmp_path / "cls.faiss").write_bytes(old)
    with caplog.at_level(logging.WARNING, logger="emkum.index"):
        again = VectorStore(tmp_path, cfg())
    assert "rebuilt" in again.snapshot_warning and "seq" in again.snapshot_warning
    assert any("rebuilt" in r.message for r in caplog.records)  # logged, not only stored
    assert_findable_exactly(again, acked)


def test_a_snapshot_from_another_data_directory_is_not_trusted(tmp_path, rng):
    mine, acked = _store_with(tmp_path / "mine", rng, [f"m{i}" for i in range(30)])
    mine.close()
    theirs, _ = _store_with(tmp_path / "theirs", rng, [f"t{i}" for i in range(40)])
    theirs.close()
    shutil.copy(tmp_path / "theirs" / "cls.faiss", tmp_path / "mine" / "cls.faiss")
    again = VectorStore(tmp_path / "mine", cfg())
    assert "store_id" in again.snapshot_warning
    assert_findable_exactly(again, acked)


@pytest.mark.parametrize("bad", ['"seven"', "null", "1.5", "[1]"])
def test_a_snapshot_header_with_a_wrong_seq_is_rebuilt_not_fatal(tmp_path, rng, bad):
    store, acked = _store_with(tmp_path, rng, ["a", "b", "c"])
    store.close()
    data = (tmp_path / "cls.faiss").read_bytes()
    from index.snapshot import MAGIC

    hlen = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "little")
    header = json.loads(data[len(MAGIC) + 4 : len(MAGIC) + 4 + hlen])
    raw = json.dumps(header).replace(f'"seq": {header["seq"]}', f'"seq": {bad}').encode()
    body = data[len(MAGIC) + 4 + hlen :]
    (tmp_path / "cls.faiss").write_bytes(MAGIC + len(raw).to_bytes(4, "little") + raw + body)
    again = VectorStore(tmp_path, cfg())
    assert again.snapshot_warning is not None
    assert_findable_exactly(again, acked)


def test_changing_the_cls_factory_rebuilds_instead_of_refusing(tmp_path, rng):
    store, acked = _store_with(tmp_path, rng, [f"x{i}" for i in range(20)])
    store.close()
    again = VectorStore(tmp_path, cfg(cls_factory="HNSW16"))
    assert "factory" in again.snapshot_warning
    assert_findable_exactly(again, acked)
    again.close()
    assert VectorStore(tmp_path, cfg(cls_factory="HNSW16")).snapshot_warning is None  # its own snapshot now


def test_a_snapshot_that_misses_items_after_replay_is_rebuilt(tmp_path, rng):
    store, acked = _store_with(tmp_path, rng, ["a", "b"])
    store.close()
    # forge the case replay cannot detect by numbers: the table holds a row the change log lost
    db = VectorStore(tmp_path, cfg())
    extra = item(rng, "lost")
    db.add([extra])
    db._db.execute("DELETE FROM changes")  # as if the change numbers had been reused and skipped
    db._db.close()
    acked["lost"] = extra.cls
    again = VectorStore(tmp_path, cfg())
    assert "after replay" in again.snapshot_warning
    assert_findable_exactly(again, acked)


def test_the_disk_reserve_is_real_blocks_released_for_a_delete_and_made_again(tmp_path, rng, monkeypatch):
    """The reserve that lets DELETE commit on a full disk (the HTTP test fills a real tmpfs)."""
    store = VectorStore(tmp_path, cfg(disk_reserve_bytes=1 << 20))
    reserve = tmp_path / "space.reserve"
    assert reserve.stat().st_size == 1 << 20 and reserve.stat().st_blocks * 512 >= 1 << 20  # not sparse
    store.add([item(rng, "a"), item(rng, "b")])
    real = store._transaction
    calls = {"n": 0}

    def full_once():  # the first commit attempt meets a full disk, as SQLite reports it
        calls["n"] += 1
        if calls["n"] == 1:
            raise ReadOnlyStore("cannot write items.sqlite: database or disk is full")
        return real()

    monkeypatch.setattr(store, "_transaction", full_once)
    monkeypatch.setattr(store, "_ensure_reserve", lambda: None)  # the disk is "still full"
    store.delete("a")
    assert not reserve.exists() and "a" not in store
    monkeypatch.undo()
    store.delete("b")  # the disk has room again: the reserve comes back
    assert reserve.stat().st_size == 1 << 20
    assert not VectorStore(tmp_path / "none", cfg(disk_reserve_bytes=0)).reserve_path.exists()
