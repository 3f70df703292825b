"""Deployment: docker-compose wiring, Prometheus config and rules (promtool), and a real Prometheus
scraping the real service on loopback, read back through Prometheus' HTTP query API."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.images import jpeg
from tests.server import free_port, running_server

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: install Debian's prometheus package (.ci/run does)"
    return path


def test_compose_wires_service_prometheus_and_grafana():
    services = COMPOSE["services"]
    assert {"emkum", "emkum-cpu", "prometheus", "grafana"} <= set(services)
    gpu = services["emkum"]
    assert "8000:8000" in gpu["ports"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert any(v.startswith("emkum-data:/data") for v in gpu["volumes"])
    assert any(v.startswith("emkum-models:") for v in gpu["volumes"])
    assert "readyz" in " ".join(gpu["healthcheck"]["test"]) and gpu["restart"] == "unless-stopped"
    assert gpu["environment"]["EMKUM_DATA_DIR"] == "/data"
    assert services["emkum-cpu"]["profiles"] == ["cpu"]
    assert "9090:9090" in services["prometheus"]["ports"]
    assert any(v.startswith("./docker/prometheus:/etc/prometheus") for v in services["prometheus"]["volumes"])
    assert "3000:3000" in services["grafana"]["ports"]
    assert all("healthcheck" in s for s in services.values())
    assert set(COMPOSE["volumes"]) >= {"emkum-data", "emkum-models", "prometheus-data", "grafana-data"}
    for f in ("docker/Dockerfile", "docker/Dockerfile.cpu"):
        text = (ROOT / f).read_text()
        assert "HEALTHCHECK" in text and "USER emkum" in text and "/readyz" in text


def test_prometheus_scrapes_the_service_and_has_rules():
    prom = yaml.safe_load((ROOT / "docker/prometheus/prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "emkum")
    assert "emkum:8000" in job["static_configs"][0]["targets"] and job["metrics_path"] == "/metrics"
    rules = yaml.safe_load((ROOT / "docker/prometheus/alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"EmkumHighErrorRate", "EmkumHighSearchLatency", "EmkumQueueFull"} <= names


def test_promtool_accepts_config_and_rules(tmp_path):
    config = (ROOT / "docker/prometheus/prometheus.yml").read_text()
    (tmp_path / "prometheus.yml").write_text(config.replace("/etc/prometheus/", f"{ROOT}/docker/prometheus/"))
    for args in (
        ["check", "config", str(tmp_path / "prometheus.yml")],
        ["check", "rules", str(ROOT / "docker/prometheus/alerts.yml")],
    ):
        result = subprocess.run([promtool(), *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_dashboard_covers_the_metrics():
    import json

    dash = json.loads((ROOT / "docker/grafana/dashboards/emkum.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in (
        "emkum_requests_total",
        "emkum_request_seconds_bucket",
        "emkum_stage_seconds_bucket",
        "emkum_batch_size",
        "emkum_queue_depth",
        "emkum_requests_in_flight",
        "emkum_index_items",
        "emkum_errors_total",
    ):
        assert metric in exprs, metric


@pytest.mark.e2e
def test_real_prometheus_scrapes_the_real_service(tiny_model_dir, tmp_path):
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus not found: install Debian's prometheus package (.ci/run does)"
    with running_server(tiny_model_dir, tmp_path / "d", tmp_path) as srv:
        port = free_port()
        target = srv.url.removeprefix("http://")
        (tmp_path / "prom.yml").write_text(
            f"global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: emkum\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n"
        )
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={tmp_path / 'prom.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            with srv.client() as c:
                c.post("/items", files=[("files", ("a.jpg", jpeg(1), "image/jpeg"))], data={"ids": ["a"]})
                for _ in range(5):
                    assert c.post("/search/text", json={"query": "a photo"}).status_code == 200
            query = 'sum(emkum_requests_total{route="/search/text",status="200"})'
            value, deadline = None, time.monotonic() + 45
            while time.monotonic() < deadline:
                try:
                    r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=5)
                    result = r.json()["data"]["result"]
                    if result:
                        value = float(result[0]["value"][1])
                        if value >= 5:
                            break
                except (httpx.TransportError, KeyError, ValueError):
                    pass
                time.sleep(1)
            assert value is not None and value >= 5, f"Prometheus saw {value}"
            items = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": "emkum_index_items"}).json()
            assert float(items["data"]["result"][0]["value"][1]) == 1.0
        finally:
            proc.terminate()
            proc.wait(timeout=15)


# -- the images, as far as this machine can go without a Docker engine ------------------------------
def runtime_stage(dockerfile: Path) -> list[str]:
    """The instructions of the last stage (the image that ships), continuation lines joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return lines[last_from:]


@pytest.mark.e2e
def test_cpu_runtime_stage_rehearsed_serves_with_what_it_copies(tiny_model_dir, tmp_path):
    """No Docker engine runs here, so the CPU image's runtime stage is rehearsed instead: a fresh
    virtual environment, only the files the stage COPYs, its own pip command, its environment, its
    CMD, then its HEALTHCHECK command. A module the service needs but the stage leaves out, a missing
    dependency, or torch creeping into the serving path fails here as it would in the image."""
    stage = runtime_stage(ROOT / "docker" / "Dockerfile.cpu")
    app = tmp_path / "app"
    app.mkdir()
    for line in stage:
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _dest = line.split()[1:]
            for src in sources:
                target = app / src if _dest.endswith("/") or _dest == "./" else app / _dest
                if (ROOT / src).is_dir():
                    shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(ROOT / src, target)
    pip_line = next(line for line in stage if line.startswith("RUN pip install"))
    assert pip_line == "RUN pip install --no-cache-dir ."
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin" / "pip", "install", "-q", "."], cwd=app, check=True, timeout=900)
    probe = "import importlib.util as u; print(u.find_spec('torch') is None and u.find_spec('model') is None)"
    assert (
        subprocess.run(
            [venv / "bin" / "python", "-c", probe], cwd=tmp_path, capture_output=True, text=True
        ).stdout.strip()
        == "True"
    )

    env = {}
    for line in stage:
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in line.split()[1:])
    port = free_port()
    env.update(EMKUM_MODEL_DIR=str(tiny_model_dir), EMKUM_DATA_DIR=str(tmp_path / "data"), EMKUM_PORT=str(port))
    env.update(EMKUM_HOST="127.0.0.1", PATH=f"{venv / 'bin'}:/usr/bin:/bin")
    cmd = json.loads(next(line for line in stage if line.startswith("CMD ")).removeprefix("CMD "))
    health = next(line for line in stage if line.startswith("HEALTHCHECK ")).split(" CMD ", 1)[1]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            check = subprocess.run(["sh", "-c", health.replace("8000", str(port))], capture_output=True)
            if check.returncode == 0:
                break
            assert proc.poll() is None, "the image's CMD exited"
            assert time.monotonic() < deadline, "the HEALTHCHECK never passed"
            time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/search/text", json={"query": "a dog"}, timeout=30)
        assert r.status_code == 200 and r.json()["results"] == []
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.mark.e2e
def test_gpu_image_pins_resolve_for_its_python(tmp_path):
    """The GPU image swaps in onnxruntime-gpu and faiss-gpu-cu12 on its own Python: pip must resolve
    them, with the rest of the serving dependencies, for that Python on manylinux x86_64, and bring
    the CUDA 12 runtime and cuBLAS that faiss-gpu-cu12 needs beside the base image's CUDA 13."""
    import tomllib

    stage = runtime_stage(ROOT / "docker" / "Dockerfile")
    python = re.search(r"python3\.(\d+)-venv", " ".join(stage)).group(1)
    pins = re.findall(r"([a-z0-9-]+==[0-9][^\s]*)", next(line for line in stage if "onnxruntime-gpu==" in line))
    swapped = {"faiss-cpu", "onnxruntime"}
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    deps = [d for d in deps if re.split(r"[<>=!~ ]", d)[0] not in swapped]
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--only-binary=:all:"]
    cmd += ["--python-version", f"3.{python}", "--implementation", "cp", "--target", str(tmp_path / "t")]
    cmd += [f"--platform={p}" for p in platforms] + ["--report", str(tmp_path / "r.json"), "-q", *deps, *pins]
    subprocess.run(cmd, check=True, timeout=600, capture_output=True)
    resolved = {
        i["metadata"]["name"].lower(): i["metadata"]["version"]
        for i in json.loads((tmp_path / "r.json").read_text())["install"]
    }
    for pin in pins:
        name, version = pin.split("==")
        assert resolved[name] == version
    assert {"nvidia-cublas-cu12", "nvidia-cuda-runtime-cu12", "fastapi", "uvicorn"} <= set(resolved)
    assert not swapped & set(resolved) and "torch" not in resolved
