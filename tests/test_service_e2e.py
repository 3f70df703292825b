"""The real service over HTTP on loopback with a tiny model: every endpoint, good and bad input,
batching, the queue limit, the API key, and /metrics in Prometheus' exposition format."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import re
import socket
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.deps import AppState, available_cores
from service.settings import Settings
from tests.images import bomb_png, encode, jpeg, photo
from tests.server import running_server

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("svc")
    with running_server(
        tiny_model_dir,
        root / "data",
        root,
        max_image_pixels=4_000_000,
        max_image_bytes=2_000_000,
        max_k=50,
        max_candidates=500,
        max_request_pixels=5_000_000,
        max_explain_values=2_000,  # the tiny model: 16 patches; an image query explains 256 per result
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def files(*blobs, name="img.jpg", ctype="image/jpeg"):
    return [("files", (f"{i}-{name}", b, ctype)) for i, b in enumerate(blobs)]


def error_of(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]["code"]


def metric_samples(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def test_health_ready_and_docs(client, tiny_model_dir):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["provider"] == "CPUExecutionProvider"
    assert ready["precision"] == json.loads((tiny_model_dir / "model.json").read_text())["cpu"]["precision"]
    assert ready["model"] == "emkum-tiny"
    assert client.get("/docs").status_code == 200
    assert "/search/text" in client.get("/openapi.json").json()["paths"]


def test_embed_image_and_text(client):
    r = client.post("/embed/image?patches=true", files=files(jpeg(1), encode(photo(2), "PNG")))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dim"] == 16 and len(body["embeddings"]) == 2
    assert len(body["embeddings"][0]["cls"]) == 16 and len(body["embeddings"][0]["patches"]) == 16
    r = client.post("/embed/text", json={"texts": ["a red square", "blue"], "tokens": True})
    emb = r.json()["embeddings"]
    assert emb[0]["words"] == ["a", "red", "square"] and len(emb[0]["tokens"]) == 3
    assert "tokens" not in client.post("/embed/text", json={"texts": ["x"]}).json()["embeddings"][0]


def test_items_lifecycle_and_search(client):
    blobs = [jpeg(10 + i) for i in range(5)]
    meta = [json.dumps({"caption": f"photo {i}"}) for i in range(5)]
    r = client.post("/items", files=files(*blobs), data={"ids": [f"p{i}" for i in range(5)], "metadata": meta})
    assert r.status_code == 200, r.text
    assert r.json()["items"] == [{"id": f"p{i}", "status": "created"} for i in range(5)]
    assert client.get("/items/p3").json()["metadata"]["caption"] == "photo 3"
    listed = client.get("/items", params={"limit": 2, "offset": 1}).json()
    assert [x["id"] for x in listed["items"]] == ["p1", "p2"] and listed["total"] >= 5
    assert client.get("/thumbnails/p3").headers["content-type"] == "image/jpeg"
    # upsert
    r = client.post("/items", files=files(jpeg(99)), data={"ids": ["p4"], "metadata": ['{"caption": "new"}']})
    assert r.json()["items"] == [{"id": "p4", "status": "updated"}]
    # image search finds the same picture first, with cls score ~1
    r = client.post("/search/image", files={"file": ("q.jpg", blobs[2], "image/jpeg")}, data={"k": 3})
    top = r.json()["results"][0]
    assert top["id"] == "p2" and top["cls_score"] == pytest.approx(1.0, abs=1e-3)
    # text search with explain
    r = client.post("/search/text", json={"query": "a red square", "k": 3, "candidates": 5, "explain": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 3 and {"encode", "ann", "rerank", "total"} <= set(body["timings_ms"])
    first = body["results"][0]
    assert {"id", "score", "cls_score", "cmli_score", "metadata"} <= set(first)
    assert [m["token"] for m in first["matches"]] == ["a", "red", "square"]
    assert len(first["matches"][0]["heatmap"]) == 16 and first["grid"] == 4
    scores = [x["score"] for x in body["results"]]
    assert scores == sorted(scores, reverse=True)
    plain = client.post("/search/text", json={"query": "a red square", "k": 3, "rerank": False}).json()
    assert all(x["cmli_score"] is None for x in plain["results"])
    # delete
    assert client.delete("/items/p0").json() == {"id": "p0", "status": "deleted"}
    assert error_of(client.get("/items/p0")) == "unknown_id"
    assert error_of(client.delete("/items/p0")) == "unknown_id"


BAD_REQUESTS = [
    ("post", "/items", {"files": files(b"\xff\xd8\xff\xe0 not really a jpeg")}, 400, "invalid_image"),
    (
        "post",
        "/items",
        {"files": files(b"hello, I am text", name="a.txt", ctype="text/plain")},
        400,
        "invalid_image",
    ),
    ("post", "/items", {"files": files(b"")}, 400, "empty_file"),
    ("post", "/items", {"files": files(bomb_png())}, 413, "too_many_pixels"),
    ("post", "/items", {"files": files(b"\x00" * 2_000_001)}, 413, "image_too_large"),
    (
        "post",
        "/items",
        {"files": files(encode(photo(3), "PDF"), ctype="application/pdf")},
        400,
        "invalid_image",
    ),
    (
        "post",
        "/items",
        {"files": files(jpeg(4)), "data": {"metadata": ["{not json"]}},
        422,
        "invalid_metadata",
    ),
    ("post", "/items", {"files": files(jpeg(4)), "data": {"metadata": ["[1, 2]"]}}, 422, "invalid_metadata"),
    ("post", "/items", {"files": files(jpeg(4)), "data": {"ids": ["a", "b"]}}, 422, "ids_mismatch"),
    ("post", "/items", {"data": {"ids": ["a"]}}, 422, "invalid_request"),
    ("post", "/search/text", {"json": {"query": ""}}, 422, "empty_text"),
    ("post", "/search/text", {"json": {"query": "   "}}, 422, "empty_text"),
    ("post", "/search/text", {"json": {"query": "x" * 1001}}, 413, "text_too_long"),
    ("post", "/search/text", {"json": {"query": "dog", "k": 0}}, 422, "k_out_of_range"),
    ("post", "/search/text", {"json": {"query": "dog", "k": 51}}, 422, "k_out_of_range"),
    ("post", "/search/text", {"json": {"query": "dog", "candidates": 501}}, 422, "candidates_out_of_range"),
    ("post", "/search/text", {"json": {"query": "dog", "k": "ten"}}, 422, "invalid_request"),
    (
        "post",
        "/search/text",
        {"content": b"{broken", "headers": {"content-type": "application/json"}},
        422,
        "invalid_request",
    ),
    ("post", "/search/image", {"files": {"file": ("x.jpg", b"garbage", "image/jpeg")}}, 400, "invalid_image"),
    ("post", "/embed/text", {"json": {"texts": []}}, 422, "invalid_request"),
    ("get", "/items/does-not-exist", {}, 404, "unknown_id"),
    # issue #15: lone UTF-16 surrogates, metadata no later read could return, one id twice
    *[
        ("post", path, {"content": body, "headers": {"content-type": "application/json"}}, 422, "invalid_text")
        for path, body in (
            ("/search/text", b'{"query": "a \\ud800"}'),
            ("/embed/text", b'{"texts": ["\\udc80"]}'),
        )
    ],
    *[
        ("post", "/items", {"files": files(jpeg(4)), "data": {"metadata": [meta]}}, 422, "invalid_metadata")
        for meta in ('{"x": "\\ud800"}', '{"x": NaN}', '{"x": Infinity}', '{"x": ' * 5000 + "1" + "}" * 5000)
    ],
    ("post", "/items", {"files": files(jpeg(4), jpeg(5)), "data": {"ids": ["dup", "dup"]}}, 422, "duplicate_id"),
    ("post", "/items", {"files": files(jpeg(6), jpeg(6))}, 422, "duplicate_id"),  # same bytes, same derived id
    ("get", "/items", {"params": {"limit": 0}}, 422, "invalid_request"),
    ("get", "/no/such/route", {}, 404, "not_found"),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "code"), BAD_REQUESTS)
def test_bad_input_gets_a_named_4xx_and_loses_nothing(client, method, path, kwargs, status, code):
    before = client.get("/items", params={"limit": 1000}).json()["items"]
    r = getattr(client, method)(path, **kwargs)
    assert r.status_code == status, r.text
    assert error_of(r) == code
    assert client.get("/healthz").status_code == 200
    assert client.get("/items", params={"limit": 1000}).json()["items"] == before


def test_formats_exif_and_modes_are_accepted(client):
    from PIL import Image

    im = photo(5, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the decoder must apply it
    cases = [
        encode(im, "JPEG", exif=exif),
        encode(im.convert("L"), "PNG"),
        encode(im.convert("RGBA"), "PNG"),
        encode(im.convert("CMYK"), "JPEG"),
        encode(im.convert("P"), "GIF"),
        encode(im, "WEBP"),
    ]
    r = client.post("/embed/image", files=files(*cases))
    assert r.status_code == 200, r.text
    assert len(r.json()["embeddings"]) == len(cases)


def test_text_over_the_token_limit_is_truncated_and_flagged(client):
    long = " ".join(["dog"] * 40)  # the tiny model takes 16 tokens
    r = client.post("/search/text", json={"query": long})
    assert r.status_code == 200 and r.json()["truncated"] is True
    assert client.post("/search/text", json={"query": "dog"}).json()["truncated"] is False


def test_concurrent_requests_are_batched(server, client):
    def one(i):
        with httpx.Client(base_url=server.url, timeout=30) as c:
            return c.post("/embed/text", json={"texts": [f"query number {i}"]}).status_code

    with cf.ThreadPoolExecutor(32) as pool:
        assert set(pool.map(one, range(96))) == {200}
    fam = metric_samples(client)["emkum_batch_size"]
    text_samples = {
        s.labels.get("le"): s.value
        for s in fam.samples
        if s.labels.get("encoder") == "text" and s.name.endswith("_bucket")
    }
    assert text_samples["1.0"] < text_samples["+Inf"], "no text batch held more than one query"


def batches(client, encoder: str) -> tuple[float, float]:
    """(batches run, inputs embedded) so far by one encoder, from /metrics."""
    fam = metric_samples(client)["emkum_batch_size"]
    values = {s.name: s.value for s in fam.samples if s.labels.get("encoder") == encoder and "le" not in s.labels}
    return values["emkum_batch_size_count"], values["emkum_batch_size_sum"]


def test_the_files_of_one_request_are_embedded_as_one_batch(client):
    count, total = batches(client, "image")
    r = client.post("/embed/image", files=files(*[jpeg(40 + i) for i in range(6)]))
    assert r.status_code == 200 and len(r.json()["embeddings"]) == 6
    count2, total2 = batches(client, "image")
    assert total2 - total == 6 and count2 - count < 6  # not six batches of one


def test_texts_of_one_request_batch_together_and_rerank_depth_defaults_to_the_models(client):
    count, total = batches(client, "text")
    assert client.post("/embed/text", json={"texts": [f"text {i}" for i in range(6)]}).status_code == 200
    count2, total2 = batches(client, "text")
    assert total2 - total == 6 and count2 - count < 6
    assert client.post("/search/text", json={"query": "a dog"}).json()["candidates"] == 20  # model.json's
    assert client.post("/search/text", json={"query": "a dog", "candidates": 50}).json()["candidates"] == 50
    assert client.post("/search/text", json={"query": "a dog", "k": 30}).json()["candidates"] == 30  # >= k


def test_readme_lists_exactly_the_metrics_the_service_exposes(client):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    documented = set(re.findall(r"^\| `(emkum_[a-z_]+)` \|", readme, flags=re.M))
    text = client.get("/metrics").text  # TYPE lines: every family, observed yet or not
    exposed = {n for n in re.findall(r"^# TYPE (emkum_[a-z_]+) ", text, flags=re.M) if not n.endswith("_created")}
    assert documented == exposed


def test_metrics_are_valid_exposition(client):
    # An item to rerank, so the test does not depend on others having filled the shared index.
    assert client.post("/items", files=files(jpeg(77)), data={"ids": ["metrics-item"]}).status_code == 200
    client.post("/search/text", json={"query": "a dog"})
    fams = metric_samples(client)
    for name in (
        "emkum_requests",
        "emkum_request_seconds",
        "emkum_stage_seconds",
        "emkum_queue_depth",
        "emkum_requests_in_flight",
        "emkum_index_items",
        "emkum_errors",
        "emkum_model_info",
    ):
        assert name in fams, name
    stages = {s.labels["stage"] for s in fams["emkum_stage_seconds"].samples}
    assert {"tokenize", "encode_text", "ann", "rerank"} <= stages
    routes = {s.labels["route"] for s in fams["emkum_requests"].samples}
    assert "/search/text" in routes
    info = next(s for s in fams["emkum_model_info"].samples)
    assert info.labels["provider"] == "CPUExecutionProvider"


def test_full_queue_answers_503_with_retry_after(tiny_model_dir, tmp_path):
    with running_server(tiny_model_dir, tmp_path / "d", tmp_path, queue_size=1, max_batch=1) as srv:
        big = jpeg(7, size=256)

        def one(_):
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                r = c.post("/embed/image?patches=true", files=files(*[big] * 8))
                return r.status_code, r.headers.get("retry-after"), r.json()

        with cf.ThreadPoolExecutor(24) as pool:
            results = list(pool.map(one, range(48)))
        codes = {c for c, _, _ in results}
        assert codes <= {200, 503} and 503 in codes and 200 in codes
        refused = next(r for r in results if r[0] == 503)
        assert refused[1] == "1" and refused[2]["error"]["code"] == "overloaded"
        with srv.client() as c:
            assert c.get("/readyz").status_code == 200


def test_api_key_guards_writes(tiny_model_dir, tmp_path):
    with (
        running_server(tiny_model_dir, tmp_path / "d", tmp_path, api_key="s3cret-key") as srv,
        srv.client() as c,
    ):
        assert error_of(c.post("/items", files=files(jpeg(1)))) == "unauthorized"
        r = c.post("/items", files=files(jpeg(1)), headers={"X-API-Key": "s3cret-kez"})
        assert r.status_code == 401
        r = c.post("/items", files=files(jpeg(1)), data={"ids": ["k"]}, headers={"X-API-Key": "s3cret-key"})
        assert r.status_code == 200
        assert c.delete("/items/k").status_code == 401
        assert c.post("/search/text", json={"query": "x"}).status_code == 200  # reads stay open
        assert c.delete("/items/k", headers={"X-API-Key": "s3cret-key"}).status_code == 200


def test_kill_9_during_indexing_keeps_every_acknowledged_item(tiny_model_dir, tmp_path):
    data = tmp_path / "d"
    acked = []
    with running_server(tiny_model_dir, data, tmp_path, snapshot_every=10) as srv:

        def add(i):
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                r = c.post("/items", files=files(jpeg(1000 + i), jpeg(2000 + i)), data={"ids": [f"a{i}", f"b{i}"]})
                return [x["id"] for x in r.json()["items"]] if r.status_code == 200 else []

        with cf.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(add, i) for i in range(200)]
            for n, f in enumerate(cf.as_completed(futures)):
                acked.extend(f.result())
                if n == 40:
                    srv.kill()  # SIGKILL mid-stream: some requests are in flight
                    break
            for f in futures:
                with contextlib.suppress(Exception):
                    acked.extend(f.result())
    assert len(acked) >= 80
    with running_server(tiny_model_dir, data, tmp_path) as srv, srv.client() as c:
        present = {x["id"] for x in c.get("/items", params={"limit": 1000}).json()["items"]}
        assert set(acked) <= present
        ready = c.get("/readyz").json()
        assert ready["items"] == len(present)
        r = c.post("/search/image", files={"file": ("q.jpg", jpeg(1000), "image/jpeg")}, data={"k": 1})
        assert r.json()["results"][0]["id"] == "a0" or "a0" not in acked


def in_flight(c: httpx.Client) -> float:
    """The server's own count of requests being served (this /metrics request included)."""
    return metric_samples(c)["emkum_requests_in_flight"].samples[0].value


@contextlib.contextmanager
def half_sent_upload(url: str):
    """An upload whose body never finishes arriving: the server counts it as in flight, so the batchers
    expect company and hold a lone input for up to max_wait_ms."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /embed/image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\n"
        )
        yield


def test_request_timeout_answers_504_and_the_server_recovers(tiny_model_dir, tmp_path):
    # The encoder answers only after max_wait_ms (3 s) while another request is in flight; the timeout is 0.5 s.
    settings = {"request_timeout_s": 0.5, "max_wait_ms": 3000}
    with running_server(tiny_model_dir, tmp_path / "d", tmp_path, **settings) as srv, srv.client() as c:
        with half_sent_upload(srv.url):
            deadline = time.monotonic() + 10
            while in_flight(c) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert in_flight(c) == 2
            submitted = time.monotonic()
            r = c.post("/embed/text", json={"texts": ["a dog"]})
            assert r.status_code == 504 and error_of(r) == "timeout"
            assert "0.5 s" in r.json()["error"]["message"]
            assert c.get("/healthz").status_code == 200
        # The held batch (its only input abandoned) runs after max_wait_ms and is dropped; the closed
        # upload ends with its connection.
        time.sleep(max(0.0, submitted + 3.5 - time.monotonic()))
        deadline = time.monotonic() + 10
        while in_flight(c) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert in_flight(c) == 1
        r = c.post("/embed/text", json={"texts": ["a dog"]})  # alone now: encoded at once, well inside 0.5 s
        assert r.status_code == 200 and len(r.json()["embeddings"]) == 1
        assert c.get("/readyz").status_code == 200


def test_codec_training_threshold_is_a_setting(tiny_model_dir, tmp_path):
    from index import StoreConfig, VectorStore

    with running_server(tiny_model_dir, tmp_path / "d", tmp_path, codec_training_vectors=32) as srv, srv.client() as c:
        for i in range(2):  # 16 patch vectors per image with the tiny model: trained after the second
            r = c.post("/items", files=files(jpeg(60 + i)), data={"ids": [f"t{i}"]})
            assert r.status_code == 200
        assert c.get("/readyz").json()["patch_codec"] == "SQ8"
    store = VectorStore(tmp_path / "d", StoreConfig(dim=16, model="emkum-tiny"))
    assert store.codec.is_trained and store.bytes_per_item() == 16 * 16  # one byte per dimension


def test_a_lone_search_reranks_on_every_core_and_searches_side_by_side_on_one(tmp_path):
    """The rerank's cores follow the load: the only request in flight has the machine to itself."""
    state = AppState(Settings(data_dir=tmp_path))
    state.active_requests = 1
    assert state.rerank_threads() == available_cores()
    state.active_requests = 2
    assert state.rerank_threads() == 1
    state = AppState(Settings(data_dir=tmp_path, lone_search_threads=3))
    state.active_requests = 1
    assert state.rerank_threads() == 3


def test_a_refused_duplicate_write_leaves_no_trace_and_the_next_write_works(client):
    """Issue #15 defect 1: it answered 500, left the transaction open (GET /items/dup answered 200 for an
    uncommitted item) and every later write failed."""
    r = client.post("/items", files=files(jpeg(21), jpeg(22)), data={"ids": ["dup-x", "dup-x"]})
    assert r.status_code == 422 and error_of(r) == "duplicate_id"
    assert client.get("/items/dup-x").status_code == 404
    r = client.post("/items", files=files(jpeg(23)), data={"ids": ["after-dup"]})
    assert r.status_code == 200, r.text
    assert client.get("/thumbnails/after-dup").status_code == 200


def test_delete_removes_the_thumbnail_and_a_refused_write_leaves_none(server, client):
    """Issue #15 defect 6: thumbnails outlived their items and failed writes."""
    thumbs = Path(server.data_dir) / "thumbnails"
    before = set(thumbs.iterdir())
    r = client.post("/items", files=files(jpeg(31)), data={"ids": ["thumbed"]})
    assert r.status_code == 200
    assert len(set(thumbs.iterdir()) - before) == 1
    assert client.delete("/items/thumbed").status_code == 200
    assert set(thumbs.iterdir()) == before
    r = client.post("/items", files=files(jpeg(32), jpeg(32)))  # refused: the same derived id twice
    assert r.status_code == 422 and set(thumbs.iterdir()) == before


def test_a_request_cannot_decode_more_pixels_than_its_budget(client):
    """Issue #15 defect 7: 64 large PNGs in one request took 29.5 s of CPU. Each image is within its
    own limit (4 MP here); together they exceed the request's (5 MP): refused, nothing written."""
    from PIL import Image

    big = encode(Image.new("RGB", (1500, 1500), (200, 30, 30)), "PNG")  # 2.25 MP each, a few KB
    before = client.get("/items", params={"limit": 1000}).json()["total"]
    for path in ("/embed/image", "/items"):
        r = client.post(path, files=files(big, big, big, name="big.png", ctype="image/png"))
        assert r.status_code == 413 and error_of(r) == "request_too_many_pixels", r.text
    assert client.post("/embed/image", files=files(big, big, name="big.png", ctype="image/png")).status_code == 200
    assert client.get("/items", params={"limit": 1000}).json()["total"] == before


def test_explain_refuses_a_response_beyond_its_bound_and_names_the_k_that_fits(client):
    """Issue #15 defect 7: explain with k=1000 on an image query returned 1.35 GB."""
    client.post("/items", files=files(jpeg(41), jpeg(42), jpeg(43)))
    query = ("file", ("q.jpg", jpeg(41), "image/jpeg"))
    r = client.post("/search/image", files=[query], data={"k": 10, "explain": "true"})
    assert r.status_code == 413 and error_of(r) == "explain_too_large"
    assert "k <= 7" in r.json()["error"]["message"]  # 2,000 // (16 query patches x 16 patches)
    ok = client.post("/search/image", files=[query], data={"k": 7, "explain": "true"})
    assert ok.status_code == 200 and all("matches" in h for h in ok.json()["results"])
    assert client.post("/search/image", files=[query], data={"k": 10}).status_code == 200  # no explain: fine


def _multipart(fields: list[tuple[str, bytes]], image: bytes) -> tuple[bytes, str]:
    """A multipart body built by hand, so a field can hold bytes no HTTP client library would send."""
    boundary = "emkum-test-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + image
        + b"\r\n"
    ]
    for name, value in fields:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_an_id_that_is_not_utf8_is_refused_and_a_unicode_id_round_trips(client):
    """Issue #15 defect 4: an id of invalid UTF-8 bytes was stored as its Latin-1 reading, a different
    text from the one the client sent."""
    body, ctype = _multipart([("ids", b"caf\xe9-raw")], jpeg(51))
    r = client.post("/items", content=body, headers={"content-type": ctype})
    assert r.status_code == 400 and error_of(r) == "invalid_body" and "'ids'" in r.json()["error"]["message"]
    assert client.get("/items/caf\u00e9-raw").status_code == 404
    body, ctype = _multipart([("ids", "caf\u00e9-\u732b".encode())], jpeg(51))  # valid UTF-8: kept as sent
    r = client.post("/items", content=body, headers={"content-type": ctype})
    assert r.status_code == 200 and r.json()["items"][0]["id"] == "caf\u00e9-\u732b"
    assert client.get("/items/caf\u00e9-\u732b").status_code == 200
    body, ctype = _multipart([("k", b"\xff")], jpeg(51))
    r = client.post(
        "/search/image", content=body.replace(b'name="files"', b'name="file"'), headers={"content-type": ctype}
    )
    assert r.status_code == 400 and "'k'" in r.json()["error"]["message"]


def test_a_cross_site_form_cannot_write_even_with_no_key_set(server, client):
    """Issue #15 defect 8: with no key set, a form on any site could POST /items."""
    host = server.url.split("//", 1)[1]
    form = {"files": ("a.jpg", jpeg(61), "image/jpeg")}
    for headers in (
        {"Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "null"},  # a sandboxed frame or a file:// page
    ):
        r = client.post("/items", files=form, headers=headers)
        assert r.status_code == 403 and error_of(r) == "cross_site_request", (headers, r.text)
        assert client.delete("/items/anything", headers=headers).status_code == 403
    for headers in ({}, {"Origin": f"http://{host}"}, {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}):
        r = client.post("/items", files=form, data={"ids": ["same-site-ok"]}, headers=headers)
        assert r.status_code == 200, (headers, r.text)
    assert client.get("/items/same-site-ok", headers={"Origin": "https://evil.example"}).status_code == 200  # reads


def test_host_allow_list_trusted_origins_and_protected_reads(tiny_model_dir, tmp_path):
    """Issue #15 defect 8: no Host check (DNS rebinding), and no way to keep reads private."""
    settings = {
        "api_key": "s3cret-key",
        "protect_reads": "true",
        "allowed_hosts": json.dumps(["127.0.0.1", "*.example.org"]),
        "trusted_origins": json.dumps(["https://app.example.org"]),
    }
    key = {"X-API-Key": "s3cret-key"}
    with running_server(tiny_model_dir, tmp_path / "d", tmp_path, **settings) as srv, srv.client() as c:
        r = c.get("/healthz", headers={"Host": "rebound.attacker.test"})
        assert r.status_code == 400 and error_of(r) == "invalid_host"
        assert c.get("/healthz", headers={"Host": "search.example.org"}).status_code == 200
        assert c.get("/healthz", headers={"Host": "example.org.attacker.test"}).status_code == 400
        for path in ("/healthz", "/readyz", "/metrics"):  # orchestrators and Prometheus need no key
            assert c.get(path).status_code == 200
        r = c.post("/search/text", json={"query": "x"})
        assert r.status_code == 401 and error_of(r) == "unauthorized"
        assert c.get("/items").status_code == 401
        assert c.post("/search/text", json={"query": "x"}, headers=key).status_code == 200
        form = {"files": ("a.jpg", jpeg(62), "image/jpeg")}
        trusted = {**key, "Origin": "https://app.example.org", "Sec-Fetch-Site": "cross-site"}
        assert c.post("/items", files=form, headers=trusted).status_code == 200
        r = c.post("/items", files=form, headers={**key, "Origin": "https://other.example.org"})
        assert r.status_code == 403


def test_a_405_names_every_method_the_path_serves(client):
    """RFC 9110: Allow lists the path's methods across all its routes (GET and POST /items are two)."""
    for method, path, allowed in (("TRACE", "/items", "GET, POST"), ("PUT", "/items/x", "GET, DELETE")):
        r = client.request(method, path)
        assert r.status_code == 405 and error_of(r) == "method_not_allowed"
        assert r.headers["allow"] == allowed
