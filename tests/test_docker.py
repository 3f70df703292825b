"""The images and docker-compose.yml on a real Docker engine, driven the way the README's deployment
section says: local bases (docker/local_bases.sh), the default model exported on the host, `compose
build`, `compose up` of the CPU profile with Prometheus, and every request through the published
loopback ports.

The engine must answer (`docker/engine.sh` installs and starts one; `make test` and .ci/run call it).
The GPU image's test is marked `docker_gpu` as well: building it downloads about 3 GB of CUDA wheels
(two minutes here), so `-m "not docker_gpu"` leaves it out of a quick run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.cli import demo_images
from tests.images import jpeg
from tests.server import free_port

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[1]
CPU_IMAGE = "emkum-retrieval:cpu"
GPU_IMAGE = "emkum-retrieval:gpu"
PHOTOS = ["rocket.jpg", "motorcycle_left.png", "chelsea.png", "coffee.png", "astronaut.png", "camera.png"]
ALERTS = {"EmkumHighErrorRate", "EmkumHighSearchLatency", "EmkumQueueFull", "EmkumDown"}


def run(cmd: list[str], timeout: float = 600, env: dict | None = None, check: bool = True) -> str:
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def compose_command() -> list[str]:
    """Compose v1 where it is installed (the only one Debian packages), else the v2 plugin."""
    return ["docker-compose"] if shutil.which("docker-compose") else ["docker", "compose"]


def local_bases_env() -> dict[str, str]:
    """docker/local_bases.sh makes the bases (once; it skips those that exist) and says their names."""
    run(["bash", "docker/local_bases.sh"], timeout=900)
    lines = run(["bash", "docker/local_bases.sh", "--env"]).split()
    return dict(pair.split("=", 1) for pair in lines if "=" in pair)


def wait_ready(url: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(f"{url}/readyz", timeout=5)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} never became ready"
        time.sleep(1)


@dataclass
class Stack:
    """One compose project of the CPU profile with Prometheus, on free loopback ports."""

    project: str
    env: dict[str, str]
    url: str
    prometheus: str

    def compose(self, *args: str, timeout: float = 600) -> str:
        return run([*compose_command(), "-p", self.project, "--profile", "cpu", *args], timeout, self.env)

    def container(self, service: str = "emkum-cpu") -> str:
        cid = self.compose("ps", "-q", service).strip()
        assert cid, f"{service} has no container"
        return cid

    def health(self, service: str) -> str:
        return run(["docker", "inspect", "-f", "{{.State.Health.Status}}", self.container(service)]).strip()

    def wait_healthy(self, *services: str, timeout: float = 180) -> None:
        """What `docker ps` shows as (healthy): the images' and compose's own healthchecks passed."""
        deadline = time.monotonic() + timeout
        for service in services:
            while (status := self.health(service)) != "healthy":
                assert time.monotonic() < deadline, f"{service} is {status}: {self.compose('logs', service)[-3000:]}"
                time.sleep(1)

    def up(self) -> None:
        self.compose("up", "-d", "emkum-cpu", "prometheus")
        self.wait_healthy("emkum-cpu", "prometheus")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("no Docker engine answers: run docker/engine.sh (make test and .ci/run do)")
    env = {**os.environ, **local_bases_env()}
    run([sys.executable, "-m", "service.cli", "build-default"], timeout=900)  # the host export the images copy
    http, prom = free_port(), free_port()
    env.update(EMKUM_BIND="127.0.0.1", EMKUM_HTTP_PORT=str(http), EMKUM_PROMETHEUS_PORT=str(prom))
    s = Stack(f"emkumtest{uuid.uuid4().hex[:8]}", env, f"http://127.0.0.1:{http}", f"http://127.0.0.1:{prom}")
    s.compose("build", "emkum-cpu", timeout=1200)
    try:
        s.up()
        yield s
    finally:
        s.compose("down", "-v", "--remove-orphans")


def served_cpu_precision() -> str:
    """What `auto` serves on this machine's CPU from the host export the images copy: int8 where the
    export timed it faster and this CPU runs its weights exactly (runtime/cpu.py), else fp32."""
    from runtime.encoders import choose_precision

    card = json.loads((ROOT / "artifacts/emkum-flickr8k/model.json").read_text())
    return choose_precision(card, "auto", "CPUExecutionProvider")


def post_items(client: httpx.Client, items: dict[str, bytes]) -> httpx.Response:
    files = [("files", (name, data, "application/octet-stream")) for name, data in items.items()]
    return client.post("/items", files=files, data={"ids": list(items)})


def photo_bytes(name: str) -> bytes:
    return (demo_images() / name).read_bytes()


def test_the_cpu_image_carries_no_torch_cuda_or_build_ca(stack):
    probe = (
        "import importlib.metadata as m, importlib.util as u, onnxruntime as ort, json;"
        "print(json.dumps({'torch': u.find_spec('torch') is not None,"
        " 'nvidia': sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].startswith('nvidia')),"
        " 'providers': ort.get_available_providers()}))"
    )
    found = json.loads(run(["docker", "run", "--rm", CPU_IMAGE, "python", "-c", probe]))
    assert found["torch"] is False and found["nvidia"] == [], found
    assert "CUDAExecutionProvider" not in found["providers"], found
    env = run(["docker", "image", "inspect", "-f", "{{json .Config.Env}}", CPU_IMAGE])
    assert "PIP_CERT" not in env and "SSL_CERT_FILE" not in env
    host_bundle = Path(stack.env.get("EMKUM_BUILD_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"))
    shipped = run(["docker", "run", "--rm", CPU_IMAGE, "cat", "/etc/ssl/certs/ca-certificates.crt"], check=False)
    if "EMKUM_BUILD_BASE_IMAGE" in stack.env and host_bundle.is_file():
        assert shipped != host_bundle.read_text(), "the build stage's CA bundle reached the image"


def test_the_cpu_image_cli_has_the_serving_commands_only(stack):
    """The image installs the package's metadata (and so the training plugin's entry point) but not
    training/: `emkum` must skip the plugin, not fail, and offer no command it cannot run."""
    listed = run(["docker", "run", "--rm", "-e", "COLUMNS=200", CPU_IMAGE, "emkum", "--help"])
    assert "serve" in listed and "healthcheck" in listed and "index" in listed, listed
    assert " train " not in listed and "build-default" not in listed, listed
    refused = subprocess.run(
        ["docker", "run", "--rm", CPU_IMAGE, "emkum", "train"], capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2 and "No such command" in refused.stdout + refused.stderr


def test_the_service_runs_as_a_non_root_user(stack):
    assert run(["docker", "exec", stack.container(), "id", "-u"]).strip() == "10001"
    ps = run(["docker", "top", stack.container(), "-o", "pid,uid,args"])
    serving = [line for line in ps.splitlines() if "emkum serve" in line]
    assert serving and all(line.split()[1] == "10001" for line in serving), ps


def test_real_photos_indexed_and_found_by_text_through_the_published_port(stack):
    with stack.client() as c:
        r = post_items(c, {name: photo_bytes(name) for name in PHOTOS})
        assert r.status_code == 200, r.text
        ready = c.get("/readyz").json()
        assert ready["items"] >= len(PHOTOS) and ready["provider"] == "CPUExecutionProvider"
        assert ready["precision"] == served_cpu_precision()
        for query, expected in {
            "a rocket launching into the sky": "rocket.jpg",
            "a man riding a motorcycle": "motorcycle_left.png",
        }.items():
            r = c.post("/search/text", json={"query": query, "k": 3, "explain": True})
            assert r.status_code == 200, r.text
            results = r.json()["results"]
            assert results[0]["id"] == expected, (query, [h["id"] for h in results])
            top = results[0]
            assert [m["token"] for m in top["matches"]] == query.split(), top["matches"]
            assert all(len(m["heatmap"]) == top["grid"] ** 2 for m in top["matches"])
        assert c.post("/search/text", json={"query": ""}).status_code == 422


def test_prometheus_scrapes_the_service_and_loaded_the_alert_rules(stack):
    deadline = time.monotonic() + 90
    while True:
        targets = httpx.get(f"{stack.prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        ours = [t for t in targets if t["labels"]["job"] == "emkum"]
        if ours and all(t["health"] == "up" for t in ours):
            break
        assert time.monotonic() < deadline, f"targets never up: {ours}"
        time.sleep(2)
    assert [t["scrapeUrl"] for t in ours] == ["http://emkum:8000/metrics"]
    groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"]}
    assert loaded >= ALERTS, loaded
    deadline = time.monotonic() + 60
    while True:  # a value only the service can have reported: its item count
        result = httpx.get(
            f"{stack.prometheus}/api/v1/query", params={"query": "emkum_index_items"}, timeout=10
        ).json()["data"]["result"]
        if result and float(result[0]["value"][1]) >= len(PHOTOS):
            break
        assert time.monotonic() < deadline, f"Prometheus has emkum_index_items = {result}"
        time.sleep(2)


def exposed_metric_names(text: str) -> set[str]:
    """Every series name /metrics can carry, including those of labelled metrics that have seen no
    event yet (prometheus-client writes their TYPE line with no samples)."""
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"]}
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names |= {name, *(name + s for s in suffixes.get(kind, []))}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_grafana_panel_names_metrics_the_service_exposes(stack):
    exposed = exposed_metric_names(httpx.get(f"{stack.url}/metrics", timeout=10).text)
    dashboard = json.loads((ROOT / "docker/grafana/dashboards/emkum.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            named = set(re.findall(r"\bemkum_[a-z_]+", target["expr"]))
            assert named, f"panel {panel['title']!r} names no emkum metric: {target['expr']}"
            assert named <= exposed, f"panel {panel['title']!r}: {sorted(named - exposed)} not in /metrics"


def test_docker_kill_while_writing_loses_no_acknowledged_item(stack):
    acknowledged: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        with httpx.Client(base_url=stack.url, timeout=10) as c:
            for i in range(10_000):
                if stop.is_set():
                    return
                item = f"kill-{i}"
                try:
                    if post_items(c, {item: jpeg(1000 + i)}).status_code == 200:
                        acknowledged.append(item)
                except httpx.TransportError:
                    time.sleep(0.05)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while len(acknowledged) < 8:
        assert time.monotonic() < deadline and thread.is_alive(), f"only {len(acknowledged)} writes acknowledged"
        time.sleep(0.1)
    run(["docker", "kill", stack.container()])  # SIGKILL, mid-stream
    time.sleep(1)
    stop.set()
    thread.join(timeout=30)
    acked = list(acknowledged)
    stack.up()
    with stack.client() as c:
        for item in acked:
            assert c.get(f"/items/{item}").status_code == 200, f"acknowledged {item} lost"
        for item in acked[-3:]:
            files = {"file": (f"{item}.jpg", jpeg(1000 + int(item.split("-")[1])), "image/jpeg")}
            hits = c.post("/search/image", files=files, data={"k": "5"}).json()["results"]
            assert item in [h["id"] for h in hits], f"{item} not found by its own image"


def test_the_data_volume_survives_down_and_up(stack):
    with stack.client() as c:
        assert post_items(c, {"before-down": jpeg(7)}).status_code == 200
        count = c.get("/readyz").json()["items"]
    stack.compose("down")  # containers and network go; named volumes stay
    assert stack.project.lower() + "_emkum-data" in run(["docker", "volume", "ls", "-q"]).split()
    stack.up()
    with stack.client() as c:
        assert c.get("/readyz").json()["items"] == count
        assert c.get("/items/before-down").status_code == 200


def test_a_read_only_data_volume_serves_search_and_refuses_writes(stack):
    with stack.client() as c:
        assert post_items(c, {"ro-seen": photo_bytes("rocket.jpg")}).status_code == 200
    stack.compose("stop", "emkum-cpu")  # one writer: the read-only replica serves a stopped volume
    port = free_port()
    volume = f"{stack.project.lower()}_emkum-data"
    name = f"{stack.project}-ro"
    publish, mount = f"127.0.0.1:{port}:8000", f"{volume}:/data:ro"
    run(["docker", "run", "-d", "--rm", "--name", name, "-p", publish, "-v", mount, CPU_IMAGE])
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_ready(url)["read_only"] is True
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/search/text", json={"query": "a rocket launching into the sky", "k": 3})
            assert r.status_code == 200 and r.json()["results"][0]["id"] in {"ro-seen", "rocket.jpg"}, r.text
            refused = post_items(c, {"ro-new": jpeg(3)})
            assert refused.status_code == 507 and refused.json()["error"]["code"], refused.text
            assert c.delete("/items/ro-seen").status_code == 507
            assert c.get("/items/ro-seen").status_code == 200
    finally:
        run(["docker", "rm", "-f", "-v", name], check=False)
        stack.up()


# -- the GPU image, without a GPU ------------------------------------------------------------------
@pytest.mark.docker_gpu
def test_the_gpu_image_builds_and_falls_back_to_the_cpu_without_a_gpu(stack):
    """Built as compose builds it; started with no GPU (and no NVIDIA runtime) it must serve on the
    CPU with the CPU's graphs, say so in /readyz and its log, and find a photo."""
    stack.compose("build", "emkum", timeout=1800)
    sizes = run(["docker", "image", "inspect", "-f", "{{.Size}}", GPU_IMAGE])
    assert int(sizes) > 0
    probe = "import onnxruntime as o, faiss; print(o.get_available_providers(), faiss.get_num_gpus())"
    listed = run(["docker", "run", "--rm", GPU_IMAGE, "python", "-c", probe])
    assert "CUDAExecutionProvider" in listed and listed.strip().endswith(" 0"), listed
    port, name = free_port(), f"{stack.project}-gpu"
    run(["docker", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", GPU_IMAGE])
    try:
        url = f"http://127.0.0.1:{port}"
        ready = wait_ready(url, timeout=240)
        assert ready["provider"] == "CPUExecutionProvider" and ready["precision"] == served_cpu_precision(), ready
        assert ready["index_on_gpu"] is False
        with httpx.Client(base_url=url, timeout=60) as c:
            assert post_items(c, {"rocket.jpg": photo_bytes("rocket.jpg")}).status_code == 200
            r = c.post("/search/text", json={"query": "a rocket launching into the sky"})
            assert r.status_code == 200 and r.json()["results"][0]["id"] == "rocket.jpg"
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
        assert "serving on the CPU" in logs.stdout + logs.stderr
    finally:
        run(["docker", "rm", "-f", "-v", name], check=False)
