"""Deployment: docker-compose wiring, Prometheus config and rules (promtool), and a real Prometheus
scraping the real service on loopback, read back through Prometheus' HTTP query API."""

from __future__ import annotations

import json
import shutil
import subprocess
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
    """The wiring the `docker` tests (tests/test_docker.py) cannot see from one CPU profile run: the
    GPU service's device reservation, the same volume and healthcheck on both services, and every
    port published on loopback unless EMKUM_BIND says otherwise."""
    services = COMPOSE["services"]
    assert {"emkum", "emkum-cpu", "prometheus", "grafana"} <= set(services)
    gpu, cpu = services["emkum"], services["emkum-cpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for service in (gpu, cpu):
        assert service["ports"] == ["${EMKUM_BIND:-127.0.0.1}:${EMKUM_HTTP_PORT:-8000}:8000"]
        assert service["volumes"] == ["emkum-data:/data"] and service["environment"]["EMKUM_DATA_DIR"] == "/data"
        assert service["healthcheck"]["test"] == ["CMD", "emkum", "healthcheck"]
        assert service["restart"] == "unless-stopped"
        assert service["build"]["args"]["BASE_IMAGE"] == "${EMKUM_BASE_IMAGE:-python:3.11-slim-bookworm}"
    assert cpu["profiles"] == ["cpu"] and cpu["networks"]["default"]["aliases"] == ["emkum"]
    assert services["prometheus"]["image"].startswith("${EMKUM_PROMETHEUS_IMAGE:-prom/prometheus:")
    assert any(v.startswith("./docker/prometheus:/etc/prometheus") for v in services["prometheus"]["volumes"])
    assert all(p.startswith("${EMKUM_BIND:-127.0.0.1}:") for s in services.values() for p in s["ports"])
    assert all("healthcheck" in s for s in services.values())
    assert set(COMPOSE["volumes"]) == {"emkum-data", "prometheus-data", "grafana-data"}
    for f in ("docker/Dockerfile", "docker/Dockerfile.cpu"):
        text = (ROOT / f).read_text()
        assert 'CMD ["emkum", "healthcheck"]' in text and "USER 10001:10001" in text
        assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in text


def test_prometheus_scrapes_the_service_and_has_rules():
    prom = yaml.safe_load((ROOT / "docker/prometheus/prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "emkum")
    assert job["static_configs"][0]["targets"] == ["emkum:8000"] and job["metrics_path"] == "/metrics"
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
