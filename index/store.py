"""`VectorStore`: items keyed by the user's string id, each with a CLS vector, a set of patch
vectors and JSON metadata; two-stage search (ANN over CLS, then CMLI rerank of the candidates).

Durability. SQLite in WAL mode with `synchronous=FULL` is the source of truth: an add or delete is
acknowledged only after its transaction commits, so a crash at any instant loses no acknowledged
write and leaves no half-written item. The FAISS CLS index is a cache of that table: it is
snapshotted to one file (written to a temp name, fsynced, renamed) tagged with the change sequence
it contains, and on start the store loads the snapshot and replays the change log after it. A
missing or unreadable snapshot is rebuilt from the table; a database for another model or dimension
is refused, naming the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.cls_index import ClsIndex
from index.cmli import cmli_from_similarities, split_similarities
from index.codecs import PatchCodec
from index.database import is_write_refusal, open_database, open_read_only
from index.errors import CorruptStoreFile, DuplicateItem, ReadOnlyStore, StoreMismatch, UnknownItem
from index.pooling import pool_patches
from index.snapshot import SnapshotIdentity, UnreadableSnapshot, read_snapshot, write_snapshot

DEFAULT_PATCH_CODEC = "SQ8"
log = logging.getLogger("emkum.index")


@dataclass
class StoreConfig:
    dim: int
    model: str
    cls_factory: str = "Flat"  # FAISS factory for the CLS index: Flat, HNSW32, IVF1024,Flat, ...
    # SQ8 (default: 0.997 of the exact top 10 at half SQfp16's bytes), SQfp16 (exact to fp16), SQ4,
    # PQ32x8, ... None: whatever the data directory was written with, SQ8 for a new one.
    patch_codec: str | None = None
    use_gpu: bool = True  # move the CLS index to the GPU when this faiss build has one
    snapshot_every: int = 5000  # changes between CLS snapshots (the log covers the rest)
    patch_pool: int | None = None  # average factor x factor grid cells before storing; None: as stored, else 1
    patch_grid: int | None = None  # the model's patch grid (model.json image.grid), needed to pool
    # A codec that learns from data (SQ8/SQ4 ranges, PQ centroids) trains once this many patch
    # vectors are stored (kept as fp16 until then, then re-encoded): trained on a first upload of
    # one image, SQ8 kept 0.74 of the exact top 10 on real vectors instead of 0.9985.
    codec_training_vectors: int = 65_536
    # Space held back in `space.reserve` so that a DELETE can still commit on a full disk (SQLite
    # needs room in its WAL to delete): released when a delete finds the disk full, made again once
    # the disk has twice this much free. 0: no reserve.
    disk_reserve_bytes: int = 8 * 2**20
    # The CLS vectors' width where it is not the patch vectors' (model.json `cls_dim`: a served global
    # vector that joins two global vectors, docs/model-card.md); None: `dim`.
    cls_dim: int | None = None

    @property
    def global_dim(self) -> int:
        """The CLS vectors' width: what the CLS index and its snapshots hold."""
        return self.cls_dim or self.dim


@dataclass
class Query:
    """What a search asks with: the CLS vector and, for the rerank and `explain`, the query's token
    vectors (a text's tokens, or an image's patches), which of them are words, and their labels."""

    cls: np.ndarray  # [P]
    vectors: np.ndarray | None = None  # [L, P]
    mask: np.ndarray | None = None  # [L] 1 for the vectors that take part (words; every patch)
    labels: list[str] | None = None  # [L] the tokens' strings (None: their positions)

    def words(self) -> tuple[np.ndarray, list[str]] | None:
        """The taking-part vectors [W, P] and their labels, or None for a CLS-only query."""
        if self.vectors is None or self.mask is None:
            return None
        keep = np.asarray(self.mask).astype(bool)
        labels = self.labels if self.labels is not None else [str(i) for i in range(len(keep))]
        return np.asarray(self.vectors, dtype=np.float32)[keep], [w for w, k in zip(labels, keep, strict=False) if k]


@dataclass
class WordMatch:
    """One query word against one hit: its best stored vector, that similarity, and its
    similarity to every stored vector (the heatmap, row-major on the item's grid)."""

    label: str
    best: int
    score: float
    heatmap: np.ndarray  # [item vectors]


@dataclass
class SearchHit:
    id: str
    score: float
    cls_score: float
    cmli_score: float | None
    metadata: dict[str, Any]
    words: list[WordMatch] | None = None  # with explain: one per query word

    @property
    def similarities(self) -> np.ndarray | None:
        """[words, item vectors]: every word's heatmap, stacked."""
        return None if self.words is None else np.stack([w.heatmap for w in self.words])


@dataclass
class ItemInput:
    id: str
    cls: np.ndarray
    vectors: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)


class VectorStore:
    def __init__(self, path: str | Path, config: StoreConfig, follow: bool = False) -> None:
        """`follow`: open another process's directory read-only and keep up with its writer's commits
        (`catch_up`, called before each search): a read replica of a shard."""
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.config = replace(config)  # codec and pool are resolved against the directory below
        self.db_path = self.path / "items.sqlite"
        self.snapshot_path = self.path / "cls.faiss"
        self.reserve_path = self.path / "space.reserve"
        self._lock = threading.RLock()
        self.snapshot_warning: str | None = None  # why the CLS snapshot was not used, when it was not
        self.follower = follow
        if follow:
            self.read_only_reason: str | None = "a read replica: its writer is another process"
            self._db = open_read_only(self.db_path, self.read_only_reason)
        else:
            # A directory that refuses writes opens read-only: search serves what it holds.
            self._db, self.read_only_reason = open_database(self.db_path)
        self.read_only = self.read_only_reason is not None
        self._check_meta()
        self._load_state()
        self._changes_since_snapshot = 0
        self._ensure_reserve()

    def _load_state(self) -> None:
        """Everything in memory from the table: codec, codes, id maps, the CLS index; for a follower
        also where in the writer's history that view stands."""
        self._seen = self._history_position()
        self.codec = self._load_codec()
        self._staging = PatchCodec("SQfp16", self.config.dim)  # rows are fp16 until `codec` is trained
        self._iid_of: dict[str, int] = {}
        self._id_of: dict[int, str] = {}
        self._codes: dict[int, np.ndarray] = {}
        self._load_items()
        self._cls = self._load_cls_index()

    def _history_position(self) -> tuple[int, int]:
        """(SQLite's data_version, the last change number): what `catch_up` compares against."""
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
        return version, max(seq, self._recorded_snapshot_seq())

    def catch_up(self) -> bool:
        """A follower applies the writer's commits since it last looked; True when anything changed.

        Costs one PRAGMA when nothing did. Adds and deletes come from the change log; when the writer
        has since snapshotted past this view (the log before the snapshot is dropped) or trained its
        codec (every row re-encoded, not logged), the whole state is read again."""
        if not self.follower:
            return False
        with self._lock:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version == self._seen[0]:
                return False
            _, seen_seq = self._seen
            trained = self._meta("codec") is not None
            if trained != self.codec.is_trained or self._recorded_snapshot_seq() > seen_seq:
                self._load_state()
                return True
            changes = self._db.execute(
                "SELECT seq, op, iid FROM changes WHERE seq > ? ORDER BY seq", (seen_seq,)
            ).fetchall()
            for seq, op, iid in changes:
                seen_seq = seq
                if op == "del":
                    item_id = self._id_of.get(iid)
                    if item_id is not None:
                        self._forget(iid)
                        if self._iid_of.get(item_id) == iid:
                            del self._iid_of[item_id]
                    continue
                row = self._db.execute("SELECT id, cls, codes, n_vectors FROM items WHERE iid = ?", (iid,)).fetchone()
                if row is None or iid in self._id_of:  # deleted again since, or already here
                    continue
                item_id, cls, codes, n = row
                self._iid_of[item_id] = iid
                self._id_of[iid] = item_id
                self._codes[iid] = np.frombuffer(codes, dtype=np.uint8).reshape(n, -1)
                self._cls.add([(iid, np.frombuffer(cls, dtype=np.float32))])
            self._seen = (version, seen_seq)
            return True

    def check_writable(self) -> None:
        """Refuse a write up front (ReadOnlyStore) when the store was opened read-only."""
        if self.read_only:
            raise ReadOnlyStore(f"the data directory {self.path} is read-only ({self.read_only_reason})")

    def _meta(self, key: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _check_meta(self) -> None:
        """Resolve the codec and pooling left open (None) to what the directory was written with, then
        refuse a directory written for another model, dimension, codec or pooling."""
        stored = self._meta("config")
        try:
            theirs = json.loads(stored) if stored is not None else {}
            if not isinstance(theirs, dict):
                raise TypeError("not a JSON object")
        except (ValueError, TypeError) as exc:
            raise CorruptStoreFile(f"{self.db_path}: unreadable store config ({exc})") from exc
        if self.config.patch_codec is None:
            self.config.patch_codec = theirs.get("patch_codec", DEFAULT_PATCH_CODEC)
        if self.config.patch_pool is None:
            self.config.patch_pool = theirs.get("patch_pool", 1)
        mine = {
            "dim": self.config.dim,
            "cls_dim": self.config.global_dim,
            "model": self.config.model,
            "patch_codec": self.config.patch_codec,
            "patch_pool": self.config.patch_pool,
        }
        if self._meta("store_id") is None and not self.read_only:  # names this directory in its snapshots
            self._db.execute("INSERT INTO meta VALUES ('store_id', ?)", (uuid.uuid4().hex.encode(),))
        if stored is None:
            self.check_writable()
            self._db.execute("INSERT INTO meta VALUES ('config', ?)", (json.dumps(mine),))
            return
        for key, value in mine.items():
            # directories written before a key existed hold its old meaning: no pooling, CLS at `dim`
            before = {"patch_pool": 1, "cls_dim": theirs.get("dim")}.get(key)
            if theirs.get(key, before) != value:
                raise StoreMismatch(
                    f"{self.db_path} was written with {key}={theirs.get(key)!r}, this service has {value!r}; "
                    "use another data directory or re-index with this model"
                )

    def _load_codec(self) -> PatchCodec:
        blob = self._meta("codec")
        if blob is None:
            return PatchCodec(self.config.patch_codec, self.config.dim)
        return PatchCodec.from_bytes(self.config.patch_codec, self.config.dim, blob, str(self.db_path))

    @property
    def _active(self) -> PatchCodec:
        """The codec the stored rows are in: the configured one once trained, fp16 before."""
        return self.codec if self.codec.is_trained else self._staging

    def _load_items(self) -> None:
        code_size = self._active.code_size
        for iid, item_id, codes, n in self._db.execute("SELECT iid, id, codes, n_vectors FROM items"):
            self._iid_of[item_id] = iid
            self._id_of[iid] = item_id
            arr = np.frombuffer(codes, dtype=np.uint8)
            if arr.size != n * code_size:
                raise CorruptStoreFile(
                    f"{self.db_path}: item {item_id!r} has {arr.size} code bytes, expected {n * code_size}"
                )
            self._codes[iid] = arr.reshape(n, code_size)

    def _load_cls_index(self) -> ClsIndex:
        """The snapshot plus the changes after it, or, when there is no usable snapshot or the result
        does not hold exactly the table's items, the whole index rebuilt from the table."""
        cls = self._cls_from_snapshot()
        if cls is not None and len(cls) != len(self._codes):
            self._warn_rebuild(f"holds {len(cls)} items after replay, the table {len(self._codes)}")
            cls = None
        if cls is None:
            cls = ClsIndex(self.config.global_dim, self.config.cls_factory)
            rows = self._db.execute("SELECT iid, cls FROM items ORDER BY iid")
            cls.add([(iid, np.frombuffer(c, dtype=np.float32)) for iid, c in rows])
        if self.config.use_gpu:
            cls.place_on_gpu()
        return cls

    def _cls_from_snapshot(self) -> ClsIndex | None:
        if not self.snapshot_path.is_file():
            return None
        identity = self._snapshot_identity(self._recorded_snapshot_seq())
        try:
            index = read_snapshot(self.snapshot_path, identity)
        except UnreadableSnapshot as exc:
            self._warn_rebuild(str(exc))
            return None
        cls = ClsIndex(self.config.global_dim, self.config.cls_factory, index)
        for op, iid in self._db.execute("SELECT op, iid FROM changes WHERE seq > ? ORDER BY seq", (identity.seq,)):
            if op == "del":
                cls.remove(iid)
            else:
                row = self._db.execute("SELECT cls FROM items WHERE iid = ?", (iid,)).fetchone()
                if row is not None:
                    cls.add([(iid, np.frombuffer(row[0], dtype=np.float32))])
        cls.hide_all_but(set(self._codes))
        return cls

    def _warn_rebuild(self, why: str) -> None:
        self.snapshot_warning = f"{self.snapshot_path.name} not used ({why}); rebuilt from {self.db_path.name}"
        log.warning("%s: %s", self.path, self.snapshot_warning)

    def _snapshot_identity(self, seq: int) -> SnapshotIdentity:
        store_id = (self._meta("store_id") or b"").decode()
        return SnapshotIdentity(store_id, seq, self.config.global_dim, self.config.cls_factory)

    def _recorded_snapshot_seq(self) -> int:
        """The change number of the last snapshot this table recorded (-1: none recorded), so an older
        or newer file, or one copied from elsewhere, is told apart from the current one."""
        raw = self._meta("snapshot_seq")
        return int(raw) if raw is not None else -1

    @property
    def gpu(self) -> bool:
        return self._cls.gpu

    # -- snapshots ------------------------------------------------------------------------------
    def snapshot(self) -> None:
        """Write the CLS index with the change number it contains (atomic by rename), then record that
        number in the table in the same transaction that drops the changes it covers. A crash between
        the two leaves a file the table does not name: the next start rebuilds instead of trusting it."""
        with self._lock:
            self.check_writable()
            index = self._cls.snapshot_view()
            if index is None:  # untrained index: the pending vectors are replayed from the log
                return
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
            seq = max(seq, self._recorded_snapshot_seq())
            try:
                write_snapshot(self.snapshot_path, index, self._snapshot_identity(seq))
            except OSError as exc:
                raise ReadOnlyStore(f"cannot write {self.snapshot_path.name}: {exc.strerror}") from exc
            with self._transaction():
                self._db.execute("DELETE FROM changes WHERE seq <= ?", (seq,))
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('snapshot_seq', ?)", (str(seq).encode(),))
            self._changes_since_snapshot = 0

    # -- writes ---------------------------------------------------------------------------------
    def add(self, items: Iterable[ItemInput]) -> list[str]:
        """Insert or replace items; returns 'created' or 'updated' per item once durable on disk."""
        self.check_writable()
        items = [self._pooled(it) for it in items]
        seen: set[str] = set()
        for it in items:
            self._validate(it)
            if it.id in seen:
                raise DuplicateItem(f"item id {it.id!r} appears more than once in one write")
            seen.add(it.id)
        with self._lock:
            encoded = [self._active.encode(it.vectors) for it in items]
            statuses, added, removed = [], [], []
            with self._transaction():
                for it, codes in zip(items, encoded, strict=True):
                    old = self._iid_of.get(it.id)
                    if old is not None:
                        self._delete_row(old)
                        removed.append(old)
                    cur = self._db.execute(
                        "INSERT INTO items (id, metadata, cls, codes, n_vectors) VALUES (?, ?, ?, ?, ?)",
                        (
                            it.id,
                            json.dumps(it.metadata),
                            it.cls.astype(np.float32).tobytes(),
                            codes.tobytes(),
                            len(codes),
                        ),
                    )
                    iid = cur.lastrowid
                    self._db.execute("INSERT INTO changes (op, iid) VALUES ('add', ?)", (iid,))
                    added.append((it.id, iid, codes, it.cls.astype(np.float32)))
                    statuses.append("updated" if old is not None else "created")
            for iid in removed:  # the commit is durable: now mirror it in memory
                self._forget(iid)
            for item_id, iid, codes, _cls in added:
                self._iid_of[item_id] = iid
                self._id_of[iid] = item_id
                self._codes[iid] = codes
            self._cls.add([(iid, cls) for _, iid, _, cls in added])
            self._after_change(len(items))
            if not self.codec.is_trained and self._staged_vectors() >= self._training_need():
                self._train_and_reencode()
            return statuses

    def delete(self, item_id: str) -> None:
        self.check_writable()
        with self._lock:
            iid = self._iid_of.get(item_id)
            if iid is None:
                raise UnknownItem(f"no item with id {item_id!r}")
            try:
                with self._transaction():
                    self._delete_row(iid)
            except ReadOnlyStore:
                if not self._release_reserve():
                    raise
                with self._transaction():  # the reserve's space lets the WAL take the delete
                    self._delete_row(iid)
            self._forget(iid)
            del self._iid_of[item_id]
            self._after_change(1)

    def _ensure_reserve(self) -> None:
        """Make the reserve file when it is missing and the disk can spare it twice over (so that
        making it never takes the last free space that writes need)."""
        size = self.config.disk_reserve_bytes
        if self.read_only or size <= 0 or self.reserve_path.exists():
            return
        try:
            if shutil.disk_usage(self.path).free < 2 * size:
                return
            tmp = self.reserve_path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, size)  # real blocks, not a sparse file
            tmp.replace(self.reserve_path)
        except OSError:
            with contextlib.suppress(OSError):
                self.reserve_path.with_suffix(".tmp").unlink(missing_ok=True)

    def _release_reserve(self) -> bool:
        """Give the reserve's space back to the disk; False when there was none to give."""
        try:
            self.reserve_path.unlink()
        except OSError:
            return False
        log.warning("the disk is full: released %s to let a delete commit", self.reserve_path.name)
        return True

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One durable SQLite transaction; a full or read-only disk becomes ReadOnlyStore.

        Any failure inside rolls back, whatever its type: a transaction left open would let reads see
        rows never committed and a later snapshot record change numbers that the rollback then frees
        for reuse (the replay after a crash skipped the acknowledged item that reused one)."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if is_write_refusal(exc):
                raise ReadOnlyStore(f"cannot write {self.db_path}: {exc}") from exc
            raise

    def _delete_row(self, iid: int) -> None:
        self._db.execute("DELETE FROM items WHERE iid = ?", (iid,))
        self._db.execute("INSERT INTO changes (op, iid) VALUES ('del', ?)", (iid,))

    def _forget(self, iid: int) -> None:
        self._codes.pop(iid, None)
        self._id_of.pop(iid, None)
        self._cls.remove(iid)

    def _after_change(self, n: int) -> None:
        self._changes_since_snapshot += n
        self._ensure_reserve()
        if self._changes_since_snapshot >= self.config.snapshot_every:
            # the change log still holds everything if this fails; try again at the next change
            with contextlib.suppress(ReadOnlyStore):
                self.snapshot()

    def _pooled(self, it: ItemInput) -> ItemInput:
        if self.config.patch_pool == 1:
            return it
        if self.config.patch_grid is None:
            raise ValueError("patch_pool needs patch_grid (the model's patch grid)")
        vectors = pool_patches(np.asarray(it.vectors, dtype=np.float32), self.config.patch_grid, self.config.patch_pool)
        return ItemInput(it.id, it.cls, vectors, it.metadata)

    def _validate(self, it: ItemInput) -> None:
        d, g = self.config.dim, self.config.global_dim
        if not it.id or len(it.id) > 512:
            raise ValueError("item ids must be 1 to 512 characters")
        if it.cls.shape != (g,) or it.vectors.ndim != 2 or it.vectors.shape[1] != d or len(it.vectors) == 0:
            raise ValueError(f"item {it.id!r}: expected cls [{g}] and vectors [n>0, {d}]")
        if not (np.isfinite(it.cls).all() and np.isfinite(it.vectors).all()):
            raise ValueError(f"item {it.id!r}: vectors contain NaN or infinity")

    def _training_need(self) -> int:
        return max(self.config.codec_training_vectors, self.codec.min_training_vectors())

    def _staged_vectors(self) -> int:
        return sum(len(c) for c in self._codes.values())

    def train_codec(self, sample: np.ndarray | None = None) -> None:
        """Train the patch codec now (SQ8 ranges, PQ centroids) on `sample`, or on the vectors stored
        so far, instead of waiting for `codec_training_vectors`; stored rows are re-encoded."""
        self.check_writable()
        with self._lock:
            if self.codec.is_trained:
                raise ValueError(f"the {self.config.patch_codec} codec is already trained")
            self._train_and_reencode(sample)

    def _train_and_reencode(self, sample: np.ndarray | None = None) -> None:
        """Train on the staged fp16 rows (or `sample`) and rewrite every row in the trained codec, in
        one transaction: a crash leaves either all rows fp16 with no codec, or all re-encoded."""
        staged = {iid: self._staging.decode(codes) for iid, codes in self._codes.items()}
        if sample is None:
            sample = np.concatenate(list(staged.values())) if staged else np.zeros((0, self.config.dim))
        need = self.codec.min_training_vectors()
        if len(sample) < need:
            raise ValueError(f"the {self.config.patch_codec} codec needs {need} vectors to train, got {len(sample)}")
        codec = PatchCodec(self.config.patch_codec, self.config.dim)
        codec.train(sample)
        recoded = {iid: codec.encode(vectors) for iid, vectors in staged.items()}
        with self._transaction():
            for iid, codes in recoded.items():
                self._db.execute("UPDATE items SET codes = ? WHERE iid = ?", (codes.tobytes(), iid))
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('codec', ?)", (codec.to_bytes(),))
        self.codec = codec
        self._codes.update(recoded)

    # -- reads ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._iid_of)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._iid_of

    def counts(self) -> dict[str, int]:
        """Items in each structure; equal in a consistent store."""
        with self._lock:
            rows = self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            return {
                "metadata": rows,
                "cls": len(self._cls),
                "patches": len(self._codes),
                "ids": len(self._iid_of),
            }

    def get(self, item_id: str) -> dict[str, Any]:
        with self._lock:
            row = self._db.execute("SELECT metadata, n_vectors FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise UnknownItem(f"no item with id {item_id!r}")
        return {"id": item_id, "metadata": json.loads(row[0]), "n_vectors": row[1]}

    def list(self, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, metadata FROM items ORDER BY iid LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
        return [{"id": r[0], "metadata": json.loads(r[1])} for r in rows]

    def vectors(self, item_id: str) -> np.ndarray:
        with self._lock:
            iid = self._iid_of.get(item_id)
            if iid is None:
                raise UnknownItem(f"no item with id {item_id!r}")
            codes, codec = self._codes[iid], self._active
        return codec.decode(codes)

    def bytes_per_item(self) -> float:
        if not self._codes:
            return 0.0
        return float(np.mean([c.nbytes for c in self._codes.values()]))

    def search(
        self,
        query: Query,
        k: int = 10,
        candidates: int = 100,
        rerank: bool = True,
        explain: bool = False,
        cls_weight: float = 0.0,
        timings: dict[str, float] | None = None,
        threads: int = 1,
    ) -> list[SearchHit]:
        """Stage 1: top `candidates` by CLS inner product. Stage 2 (rerank): CMLI of the query's
        words against each candidate's stored vectors (seed 004, eq. 4); the final score is
        cls_weight * cls + (1 - cls_weight) * cmli, sorted, top k. `explain`: each hit carries, per
        query word, its best vector and its similarity to all of them (reused from the rerank).

        `threads`: cores for the rerank's products. One when searches run side by side (each has a
        core); more when this search has the machine to itself (the service decides: it knows how many
        requests are in flight)."""
        candidates = max(candidates, k)
        timings = {} if timings is None else timings
        start = time.perf_counter()
        self.catch_up()  # a follower sees every write its writer acknowledged before this search
        with self._lock:
            iids, cls_scores = self._cls.search(query.cls, candidates)
            codes = [self._codes[i] for i in iids]
            codec = self._active  # the codec these codes are in, even if a re-encode follows
            names = [self._id_of[int(i)] for i in iids]
        timings["ann"] = time.perf_counter() - start
        if len(iids) == 0:
            return []
        start = time.perf_counter()
        cmli = sim = None
        final = cls_scores.copy()
        words = query.words()
        if rerank and words is not None:
            flat = codec.inner_products(np.concatenate(codes), words[0], threads=threads)  # on the codes, no decode
            sim, valid = split_similarities(flat, [len(c) for c in codes])
            cmli = cmli_from_similarities(sim, query.mask, valid)
            final = cls_weight * cls_scores + (1 - cls_weight) * cmli
        order = np.argsort(-final, kind="stable")[:k]
        if cmli is not None:
            timings["rerank"] = time.perf_counter() - start
        explained: dict[int, list[WordMatch]] = {}
        if explain and words is not None:
            vectors, labels = words
            for i in order:
                rows = sim[i, : len(codes[i])] if sim is not None else codec.inner_products(codes[i], vectors)
                maps = np.ascontiguousarray(rows.T)  # [words, item vectors]
                explained[int(i)] = [
                    WordMatch(label, int(m.argmax()), float(m.max()), m) for label, m in zip(labels, maps, strict=True)
                ]
        meta = self._metadata([int(iids[i]) for i in order])
        return [
            SearchHit(
                id=names[i],
                score=float(final[i]),
                cls_score=float(cls_scores[i]),
                cmli_score=None if cmli is None else float(cmli[i]),
                metadata=meta.get(int(iids[i]), {}),
                words=explained.get(int(i)),
            )
            for i in order
        ]

    @property
    def grid(self) -> int | None:
        """Stored vectors per side of an item's grid (the model's patch grid over the pooling)."""
        return None if self.config.patch_grid is None else self.config.patch_grid // self.config.patch_pool

    def _metadata(self, iids: list[int]) -> dict[int, dict]:
        if not iids:
            return {}
        marks = ",".join("?" * len(iids))
        with self._lock:
            rows = self._db.execute(f"SELECT iid, metadata FROM items WHERE iid IN ({marks})", iids).fetchall()
        return {r[0]: json.loads(r[1]) for r in rows}

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(ReadOnlyStore):
                self.snapshot()
            self._db.close()


def one_thread_per_search() -> None:
    """Run each search on one core: FAISS's OpenMP and numpy's BLAS single-threaded.

    A service runs several searches at once; each fanning out over every core oversubscribes them
    (on 2 cores, 8 concurrent reranks at K = 100 went from 127 to 203 searches/s this way, with the
    same latency for one client). Call it from each search worker thread: FAISS's thread count is
    per thread, BLAS's is per process."""
    from threadpoolctl import threadpool_limits

    faiss.omp_set_num_threads(1)
    threadpool_limits(1, user_api="blas")
