"""Deployment: docker-compose wiring, Prometheus config and rules (promtool), and a real Prometheus
scraping the real service on loopback, read back through Prometheus' HTTP query API."""

from __future__ import annotations

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
