"""Fault injection with random timing (issue #15): kill -9 at a random moment of a write stream, a
disk that fills, a snapshot that is corrupt, stale or from another store, and requests naming an id
twice, each in a few seeded rounds bounded in count and time. After every fault the index's
invariant is checked through HTTP on a restarted server: every acknowledged item is returned by a
search with its own image, and nothing refused is listed. (A write in flight at the kill may land
or not: it was never acknowledged.)"""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import shutil
import threading
import time

import httpx
import pytest

from tests.images import jpeg
from tests.server import running_server, small_disk

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

ROUNDS = int(os.environ.get("EMKUM_FAULT_ROUNDS", "3"))


class Ledger:
    """What the clients were told: acknowledged ids with their image seeds, and refused ids."""

    def __init__(self) -> None:
        self.acked: dict[str, int] = {}
        self.refused: set[str] = set()
        self.statuses: list[int] = []
        self.lock = threading.Lock()

    def write(self, url: str, seeds: list[int], ids: list[str]) -> None:
        try:
            with httpx.Client(base_url=url, timeout=30) as c:
                files = [("files", (f"{s}.jpg", jpeg(s, 40), "image/jpeg")) for s in seeds]
                r = c.post("/items", files=files, data={"ids": ids})
        except httpx.TransportError:
            return  # in flight at the kill: neither acknowledged nor refused
        with self.lock:
            self.statuses.append(r.status_code)
            if r.status_code == 200:
                self.acked.update(zip(ids, seeds, strict=True))
            elif r.status_code in (422, 503, 507):  # a duplicate id, overloaded, a full disk: not written
                self.refused.update(i for i in ids if i not in self.acked)

    def check(self, c: httpx.Client) -> None:
        assert set(self.statuses) <= {200, 422, 503, 507}, sorted(set(self.statuses))
        listed = {x["id"] for x in c.get("/items", params={"limit": 1000}).json()["items"]}
        assert set(self.acked) <= listed, sorted(set(self.acked) - listed)[:10]
        assert not (self.refused & listed), sorted(self.refused & listed)[:10]
        for item_id, seed in self.acked.items():
            query = {"file": ("q.jpg", jpeg(seed, 40), "image/jpeg")}
            r = c.post("/search/image", files=query, data={"k": 3, "rerank": "false"})
            assert item_id in [h["id"] for h in r.json()["results"]], (item_id, r.text[:300])


def _stream(url: str, ledger: Ledger, rng: random.Random, start: int, n: int, stop: threading.Event) -> None:
    """n writes of 1-3 images from 3 clients; every fifth names one id twice (must be refused)."""

    def one(i: int) -> None:
        if stop.is_set():
            return
        k = rng.randint(1, 3)
        seeds = [start + 10 * i + j for j in range(k)]
        ids = [f"r{s}" for s in seeds]
        if i % 5 == 4 and k > 1:
            ids[-1] = ids[0]  # the same id twice in one request
        ledger.write(url, seeds, ids)

    with cf.ThreadPoolExecutor(3) as pool:
        list(pool.map(one, range(n)))


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_kill_9_at_a_random_moment_keeps_every_acknowledged_item(tiny_model_dir, tmp_path, round_):
    rng = random.Random(1000 + round_)
    data, ledger = tmp_path / "d", Ledger()
    for life in range(2):  # two kills per round, the second on a directory the first one left
        snapshot_every = rng.choice([1, 3, 50])  # snapshots racing the kill, or none at all
        with running_server(tiny_model_dir, data, tmp_path, snapshot_every=snapshot_every, quiet=True) as srv:
            stop = threading.Event()
            writer = threading.Thread(
                target=_stream, args=(srv.url, ledger, rng, 100_000 * life + 10_000 * round_, 60, stop)
            )
            writer.start()
            time.sleep(rng.uniform(0.3, 2.5))
            srv.kill()
            stop.set()
            writer.join(60)
    assert len(ledger.acked) >= 3, "the kills came before any write was acknowledged"
    with running_server(tiny_model_dir, data, tmp_path, quiet=True) as srv, srv.client() as c:
        ledger.check(c)


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_a_bad_snapshot_of_any_kind_is_rebuilt_from_the_database(tiny_model_dir, tmp_path, round_):
    rng = random.Random(2000 + round_)
    data, other, ledger = tmp_path / "d", tmp_path / "other", Ledger()
    with running_server(tiny_model_dir, other, tmp_path, quiet=True) as srv:  # another store's snapshot
        _stream(srv.url, Ledger(), rng, 900_000, 8, threading.Event())
    with running_server(tiny_model_dir, data, tmp_path, snapshot_every=5, quiet=True) as srv:
        _stream(srv.url, ledger, rng, 10_000 * round_, 10, threading.Event())
    stale = (data / "cls.faiss").read_bytes()
    with running_server(tiny_model_dir, data, tmp_path, snapshot_every=5, quiet=True) as srv:
        _stream(srv.url, ledger, rng, 500_000 + 10_000 * round_, 10, threading.Event())
    snapshot = data / "cls.faiss"
    good = snapshot.read_bytes()
    damage = rng.choice(["truncate", "flip", "stale", "foreign", "garbage", "delete"])
    if damage == "truncate":
        snapshot.write_bytes(good[: rng.randint(1, len(good) - 1)])
    elif damage == "flip":
        at = rng.randint(0, len(good) - 1)
        snapshot.write_bytes(good[:at] + bytes([good[at] ^ 0xFF]) + good[at + 1 :])
    elif damage == "stale":
        snapshot.write_bytes(stale)
    elif damage == "foreign":
        shutil.copy(other / "cls.faiss", snapshot)
    elif damage == "garbage":
        snapshot.write_bytes(os.urandom(rng.randint(1, 4096)))
    else:
        snapshot.unlink()
    with running_server(tiny_model_dir, data, tmp_path, quiet=True) as srv, srv.client() as c:
        assert c.get("/readyz").json()["items"] == len(ledger.acked), damage
        ledger.check(c)


@pytest.mark.parametrize("round_", range(min(ROUNDS, 2)))
def test_a_disk_that_fills_at_a_random_point_loses_nothing_acknowledged(tiny_model_dir, tmp_path, round_):
    """A real ENOSPC: a tmpfs of random size. The server stays up through it; a second server on
    the same full directory serves every acknowledged item."""
    rng = random.Random(3000 + round_)
    ledger = Ledger()
    settings = {"snapshot_every": rng.choice([2, 20]), "disk_reserve_bytes": 128 * 1024}
    with small_disk(tmp_path / "d", f"{rng.randint(1200, 2400)}k") as data:
        with running_server(tiny_model_dir, data, tmp_path, quiet=True, **settings) as srv, srv.client() as c:
            _stream(srv.url, ledger, rng, 10_000 * round_, 150, threading.Event())
            assert c.get("/healthz").status_code == 200
            assert any(status == 507 for status in ledger.statuses), "the disk never filled"
        with running_server(tiny_model_dir, data, tmp_path, quiet=True) as srv, srv.client() as c:
            ledger.check(c)
