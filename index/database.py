"""Opening `items.sqlite`, the store's source of truth: writable and durable when the directory
allows it, read-only (serving what it holds) when a mount or permissions refuse writes."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from index.errors import CorruptStoreFile

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB);
CREATE TABLE IF NOT EXISTS items (
    iid INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    metadata TEXT NOT NULL,
    cls BLOB NOT NULL,
    codes BLOB NOT NULL,
    n_vectors INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, iid INTEGER NOT NULL);
"""


def is_write_refusal(exc: sqlite3.OperationalError) -> bool:
    """SQLite's ways of saying the disk will not take a write (full, read-only, gone)."""
    text = str(exc).lower()
    return any(s in text for s in ("readonly", "read-only", "disk is full", "disk i/o", "unable to open"))


def open_database(db_path: Path) -> tuple[sqlite3.Connection, str | None]:
    """The connection, and why it is read-only (None when writable). WAL with synchronous=FULL:
    a commit is on disk before it is acknowledged."""
    directory = db_path.parent
    writable = os.access(directory, os.W_OK) and (not db_path.exists() or os.access(db_path, os.W_OK))
    if db_path.is_file() and not writable:  # a read-only mount or permissions
        why = f"{directory} is not writable"
        return open_read_only(db_path, why), why
    try:
        db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(SCHEMA)
    except sqlite3.OperationalError as exc:
        if db_path.is_file() and is_write_refusal(exc):  # a refusal os.access did not foresee
            return open_read_only(db_path, exc), str(exc)
        raise CorruptStoreFile(f"{db_path}: cannot open the item database ({exc})") from exc
    except sqlite3.DatabaseError as exc:
        raise CorruptStoreFile(f"{db_path}: cannot open the item database ({exc})") from exc
    return db, None


def open_read_only(db_path: Path, why: object) -> sqlite3.Connection:
    """`mode=ro` reads the WAL too, which a writer that died leaves behind with its -shm file. After a
    clean shutdown both are gone and everything is in the main file; then only `immutable=1` opens a
    WAL database in a directory SQLite may not create its -shm file in. immutable ignores any WAL, so
    it is used only when there is none: otherwise acknowledged writes would be silently missing."""
    uri = db_path.resolve().as_uri()
    wal = db_path.with_name(db_path.name + "-wal")
    modes = ["mode=ro"] + ([] if wal.exists() and wal.stat().st_size else ["immutable=1"])
    errors = []
    for mode in modes:
        try:
            db = sqlite3.connect(f"{uri}?{mode}", uri=True, check_same_thread=False, isolation_level=None)
            db.execute("SELECT COUNT(*) FROM items").fetchone()
            return db
        except sqlite3.DatabaseError as exc:
            errors.append(f"{mode}: {exc}")
    raise CorruptStoreFile(f"{db_path}: cannot open the item database read-only ({why}; {'; '.join(errors)})")
