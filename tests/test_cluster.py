"""`emkum serve-cluster` on a real local multi-node Ray cluster (two raylets on this machine, from
ray.cluster_utils.Cluster): the HTTP API through Serve's proxy, two index shards, the tiny model.

Each shard has its writer and one read replica. Compared with the single-node service (`emkum
serve`) over the same items: the same ids and scores. Writes spread over the shards by the id's
hash; a killed shard writer is restarted by Serve, loses no acknowledged write, and its read replica
keeps the shard's searches whole meanwhile; a search while a whole shard is gone is flagged partial
and names it."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from index.sharding import shard_of
from service.settings import Settings
from tests.images import jpeg
from tests.server import free_port, running_server

pytestmark = pytest.mark.cluster

SHARDS = 2
KEY = "cluster-test-key"
QUERIES = ["a dog runs on the grass", "two people on a beach", "a red car"]


@dataclass
class RunningCluster:
    url: str
    settings: Settings
    pinned_node: str  # the raylet that offers the resource emkum-shard-1

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, headers={"X-API-Key": KEY})

    def shard_ids(self, shard: int) -> set[str]:
        """What shard i's own database holds, read beside the running shard (SQLite, read-only)."""
        path = Path(self.settings.data_dir) / f"shard-{shard:02d}" / "items.sqlite"
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return {row[0] for row in db.execute("SELECT id FROM items")}

    def wait_all_up(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                ready = httpx.get(f"{self.url}/readyz", timeout=15).json()
                if ready.get("shards") and all(s["state"] == "up" for s in ready["shards"]):
                    return ready
            except (httpx.TransportError, ValueError):
                pass
            assert time.monotonic() < deadline, "the shards never all came up"
            time.sleep(1)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory) -> Iterator[RunningCluster]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from service.cluster.app import start_cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    pinned = nodes.add_node(num_cpus=2, resources={"emkum-shard-1": 1})  # shard 1's disk is on this node
    ray.init(address=nodes.address, log_to_driver=False)
    data = tmp_path_factory.mktemp("cluster-data")
    # fp32: the int8 graphs quantize activations per batch, so an image's vectors depend on which
    # images share its encoder batch, and the two services batch differently (the tiny model's
    # export picks int8 when it timed faster on a busy machine)
    settings = Settings(
        model_dir=tiny_model_dir, data_dir=data, port=free_port(), api_key=KEY, shard_timeout_s=5, precision="fp32"
    )
    try:
        start_cluster(settings, SHARDS, shard_readers=1)
        running = RunningCluster(f"http://127.0.0.1:{settings.port}", settings, pinned.node_id)
        running.wait_all_up()
        yield running
    finally:
        serve.shutdown()
        ray.shutdown()
        nodes.shutdown()


def shard_replicas(shard: int) -> list[str]:
    """The names of shard i's live writer replicas (Serve names them after app, deployment and replica)."""
    import ray

    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::emkum-shard-{shard}#")
    )


def post(client: httpx.Client, ids: list[str], seed: int = 0) -> httpx.Response:
    files = [("files", (f"{i}.jpg", jpeg(seed + n), "image/jpeg")) for n, i in enumerate(ids)]
    return client.post("/items", files=files, data={"ids": ids})


def test_writes_land_on_the_shard_their_id_hashes_to(cluster):
    ids = [f"photo-{i}" for i in range(24)]
    with cluster.client() as c:
        r = post(c, ids)
        assert r.status_code == 200, r.text
        assert [it["status"] for it in r.json()["items"]] == ["created"] * len(ids)
        ready = c.get("/readyz").json()
    for shard in range(SHARDS):
        expected = {i for i in ids if shard_of(i, SHARDS) == shard}
        assert expected and cluster.shard_ids(shard) == expected  # exactly one shard each, none elsewhere
    assert ready["items"] == len(ids)
    assert ready["shards"][1]["node"] == cluster.pinned_node  # placed by its custom resource
    assert [s["items"] for s in ready["shards"]] == [sum(shard_of(i, SHARDS) == s for i in ids) for s in range(SHARDS)]


def test_same_api_errors_and_key_as_one_process(cluster):
    with httpx.Client(base_url=cluster.url, timeout=30) as anonymous:
        refused = post(anonymous, ["no-key"])
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        assert anonymous.post("/search/text", json={"query": ""}).json()["error"]["code"] == "empty_text"
        missing = anonymous.get("/items/never-added")
        assert missing.status_code == 404 and "never-added" in missing.json()["error"]["message"]
        assert "Traceback" not in missing.text
        assert "emkum_requests_total" in anonymous.get("/metrics").text


def test_search_equals_the_single_node_service_over_the_same_items(cluster, tiny_model_dir, tmp_path):
    ids = [f"same-{i}" for i in range(30)]
    with cluster.client() as c:
        assert post(c, ids, seed=500).status_code == 200
    single_node = running_server(tiny_model_dir, tmp_path / "single", tmp_path, precision="fp32")
    with single_node as single, single.client() as one:
        with cluster.client() as c:
            existing = [it["id"] for it in c.get("/items", params={"limit": 1000}).json()["items"]]
        assert set(ids) <= set(existing)
        # the single node gets every item the cluster holds, from the same bytes
        seeds = {i: 500 + n for n, i in enumerate(ids)} | {f"photo-{n}": n for n in range(24)}
        others = [i for i in existing if i not in seeds]
        assert not others, others
        for start in range(0, len(existing), 16):
            chunk = existing[start : start + 16]
            files = [("files", (f"{i}.jpg", jpeg(seeds[i]), "image/jpeg")) for i in chunk]
            assert one.post("/items", files=files, data={"ids": chunk}).status_code == 200
        for query in QUERIES:
            for body in ({"query": query, "k": 8, "candidates": 10}, {"query": query, "k": 5, "rerank": False}):
                with cluster.client() as c:
                    got = c.post("/search/text", json=body).json()
                want = one.post("/search/text", json=body).json()
                assert "partial" not in got
                assert [h["id"] for h in got["results"]] == [h["id"] for h in want["results"]], body
                for a, b in zip(got["results"], want["results"], strict=True):
                    assert a["score"] == pytest.approx(b["score"], abs=1e-5)
                    assert a["cls_score"] == pytest.approx(b["cls_score"], abs=1e-5)


def test_a_killed_shard_replica_is_restarted_and_keeps_every_acknowledged_write(cluster):
    import ray

    acknowledged: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        with cluster.client() as c:
            n = 0
            while not stop.is_set():
                item = f"kill-{n}"
                n += 1
                try:
                    if post(c, [item], seed=2000 + n).status_code == 200:
                        acknowledged.append(item)
                except httpx.TransportError:
                    pass

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 5:
        assert time.monotonic() < deadline, "no writes acknowledged"
        time.sleep(0.1)
    replicas = shard_replicas(0)
    assert len(replicas) == 1
    before_kill = [i for i in acknowledged if shard_of(i, SHARDS) == 0]
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
    with cluster.client() as c:  # the read replica keeps shard 0 in every search meanwhile
        for _ in range(5):
            answer = c.post("/search/text", json={"query": QUERIES[1], "k": 1000, "candidates": 1000}).json()
            assert "partial" not in answer, answer.get("missing_shards")
            assert set(before_kill) <= {h["id"] for h in answer["results"]}
            time.sleep(0.5)
    stop.set()
    thread.join(timeout=60)
    cluster.wait_all_up()
    again = shard_replicas(0)
    assert again and again != replicas, "Serve did not start a new replica"
    on_shard_0 = [i for i in acknowledged if shard_of(i, SHARDS) == 0]
    assert on_shard_0, "no acknowledged write went to the killed shard"
    with cluster.client() as c:
        for item in acknowledged:
            assert c.get(f"/items/{item}").status_code == 200, f"acknowledged {item} lost"
    assert set(on_shard_0) <= cluster.shard_ids(0)


def test_a_search_without_a_shard_is_flagged_partial_and_names_it(cluster):
    from ray import serve

    from service.cluster.app import deploy_shard

    with cluster.client() as c:
        full = c.post("/search/text", json={"query": QUERIES[0], "k": 50, "candidates": 50}).json()
    serve.delete("emkum-shard-1-read")
    with cluster.client() as c:  # the writer alone still answers for its shard
        assert "partial" not in c.post("/search/text", json={"query": QUERIES[0]}).json()
    serve.delete("emkum-shard-1")
    try:
        with cluster.client() as c:
            r = c.post("/search/text", json={"query": QUERIES[0], "k": 50, "candidates": 50})
            assert r.status_code == 200
            answer = r.json()
            assert answer["partial"] is True and answer["missing_shards"] == [1]
            assert answer["results"] and all(shard_of(h["id"], SHARDS) == 0 for h in answer["results"])
            # with k = candidates, shard 0's answer is its whole top 50 by CLS, so it holds every
            # shard-0 item of the complete answer (the global top 50 meets shard 0 inside it)
            from_shard_0 = {h["id"] for h in full["results"] if shard_of(h["id"], SHARDS) == 0}
            assert from_shard_0 and from_shard_0 <= {h["id"] for h in answer["results"]}
            ready = c.get("/readyz").json()
            assert [s["state"] for s in ready["shards"]] == ["up", "down"]
            owned_by_1 = next(f"w{i}" for i in range(100) if shard_of(f"w{i}", SHARDS) == 1)
            refused = post(c, [owned_by_1])
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shard_unavailable"
            assert refused.headers["Retry-After"]
    finally:
        deploy_shard(cluster.settings, 1, readers=1)
    cluster.wait_all_up()
    with cluster.client() as c:
        back = c.post("/search/text", json={"query": QUERIES[0], "k": 50, "candidates": 50}).json()
    assert "partial" not in back and [h["id"] for h in back["results"]] == [h["id"] for h in full["results"]]


def test_partial_results_off_refuses_a_search_without_a_shard(cluster):
    """EMKUM_PARTIAL_RESULTS=false: a missing shard is a 503, never a silently smaller answer."""
    from ray import serve

    from index import Query
    from service.cluster.app import deploy_shard
    from service.cluster.deployments import shard_app_name
    from service.cluster.remote import ShardedStore
    from service.errors import ApiError

    dim = json.loads((Path(cluster.settings.model_dir) / "model.json").read_text())["dim"]
    query = Query(np.ones(dim, dtype=np.float32))
    strict = ShardedStore([serve.get_app_handle(shard_app_name(s)) for s in range(SHARDS)], 5, partial_results=False)
    try:
        complete = strict.search(query, k=3, candidates=3, rerank=False)
        assert len(complete) == 3 and complete.missing_shards == []
        serve.delete(shard_app_name(0))  # no readers given to this store: its writer is the shard
        with pytest.raises(ApiError) as refused:
            strict.search(query, k=3, candidates=3, rerank=False)
        assert refused.value.status == 503 and refused.value.code == "shards_unavailable"
    finally:
        deploy_shard(cluster.settings, 0, readers=1)
        strict.close()
    cluster.wait_all_up()
