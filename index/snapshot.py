"""The CLS index snapshot file, `cls.faiss`: a cache of the item table, tagged with the last change
it contains so that a start loads it and replays only the changes after it.

Layout: magic, header length (uint32 LE), a JSON header (seq, dim, factory, crc32 of the body), then
FAISS's serialisation of the index. Written to a temporary name, fsynced and renamed, so a crash
leaves the old snapshot or the new one, never half of one."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import faiss
import numpy as np

from index.errors import StoreMismatch

MAGIC = b"EMKUMCLS1"


class UnreadableSnapshot(ValueError):
    """The file is damaged or not a snapshot: rebuild the index from the table."""


def write_snapshot(path: Path, index: faiss.Index, seq: int, dim: int, factory: str) -> None:
    """Atomic by rename; OSError when the disk refuses."""
    body = faiss.serialize_index(index).tobytes()
    header = json.dumps({"seq": seq, "dim": dim, "factory": factory, "crc32": zlib.crc32(body)}).encode()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(header)) + header + body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_snapshot(path: Path, dim: int, factory: str) -> tuple[int, faiss.Index]:
    """(change sequence, index). StoreMismatch for another dimension or factory (a configuration
    error to report), UnreadableSnapshot for a damaged file (a cache to rebuild)."""
    data = path.read_bytes()
    try:
        if not data.startswith(MAGIC):
            raise ValueError("bad magic")
        (hlen,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
        start = len(MAGIC) + 4
        header = json.loads(data[start : start + hlen])
        body = data[start + hlen :]
        if zlib.crc32(body) != header["crc32"]:
            raise ValueError("checksum mismatch")
        if header["dim"] != dim or header["factory"] != factory:
            raise StoreMismatch(
                f"{path}: snapshot for dim={header['dim']} factory={header['factory']!r}, "
                f"this store has dim={dim} factory={factory!r}"
            )
        index = faiss.deserialize_index(np.frombuffer(body, dtype=np.uint8))
    except StoreMismatch:
        raise
    except (ValueError, KeyError, TypeError, RuntimeError, struct.error) as exc:
        raise UnreadableSnapshot(str(exc)) from exc
    return int(header["seq"]), index
