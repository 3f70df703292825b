"""The CLS index snapshot file, `cls.faiss`: a cache of the item table, tagged with the last change
it contains so that a start loads it and replays only the changes after it.

Layout: magic, header length (uint32 LE), a JSON header, then FAISS's serialisation of the index.
The header names what the snapshot belongs to (the store's id, the change number it contains, the
FAISS factory, the dimension, the vector count) and a crc32 of the body. Written to a temporary name,
fsynced and renamed, so a crash leaves the old snapshot or the new one, never half of one.

A snapshot is only a cache, so anything wrong with it (damaged, from another data directory, older
or newer than the one the table last recorded, built for another factory) is a reason to rebuild
from the table, never to refuse to start or to serve an index that misses items."""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

MAGIC = b"EMKUMCLS2"


class UnreadableSnapshot(ValueError):
    """The file is damaged, not a snapshot, or not this store's current one: rebuild from the table."""


@dataclass(frozen=True)
class SnapshotIdentity:
    """What a snapshot must match to be used: written into the file, checked on load."""

    store_id: str
    seq: int
    dim: int
    factory: str


def write_snapshot(path: Path, index: faiss.Index, identity: SnapshotIdentity) -> None:
    """Atomic by rename; OSError when the disk refuses."""
    body = faiss.serialize_index(index).tobytes()
    header = {
        "store_id": identity.store_id,
        "seq": identity.seq,
        "dim": identity.dim,
        "factory": identity.factory,
        "count": int(index.ntotal),
        "crc32": zlib.crc32(body),
    }
    encoded = json.dumps(header).encode()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(encoded)) + encoded + body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_snapshot(path: Path, expected: SnapshotIdentity) -> faiss.Index:
    """The index, when the file is intact and is exactly the snapshot `expected` describes (this
    store, the change number the table recorded for its last snapshot, this factory and dimension).
    UnreadableSnapshot, saying which, otherwise."""
    data = path.read_bytes()
    try:
        if not data.startswith(MAGIC):
            raise ValueError("not an EMKUM CLS snapshot (bad magic)")
        (hlen,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
        start = len(MAGIC) + 4
        header = json.loads(data[start : start + hlen])
        if not isinstance(header, dict):
            raise TypeError("header is not a JSON object")
        body = data[start + hlen :]
        if zlib.crc32(body) != header["crc32"]:
            raise ValueError("checksum mismatch")
        for key in ("store_id", "seq", "dim", "factory"):
            if header[key] != getattr(expected, key):
                raise ValueError(f"{key} is {header[key]!r}, this store's is {getattr(expected, key)!r}")
        index = faiss.deserialize_index(np.frombuffer(body, dtype=np.uint8))
        if index.ntotal != header["count"] or index.d != expected.dim:
            raise ValueError(f"holds {index.ntotal} vectors of {index.d} dims, its header says {header['count']}")
    except (ValueError, KeyError, TypeError, RuntimeError, struct.error) as exc:
        raise UnreadableSnapshot(str(exc)) from exc
    return index
