"""The `emkum` command line: bulk indexing (resumable, bad files reported) and search."""

from __future__ import annotations

import json
import re
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from tests.images import jpeg


def last_json(output: str) -> dict:
    """The report a command printed last (libraries may log other lines with braces before it)."""
    return json.JSONDecoder().raw_decode(output[output.rfind('{\n  "') :])[0]


def test_index_folder_is_resumable_and_reports_bad_files(tiny_model_dir, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for i in range(5):
        (photos / f"p{i}.jpg").write_bytes(jpeg(i, 40))
    (photos / "sub" / "deep.jpg").write_bytes(jpeg(9, 40))
    (photos / "broken.jpg").write_bytes(b"not an image at all")
    (photos / "notes.txt").write_text("ignored: not an image suffix")
    monkeypatch.setenv("EMKUM_MODEL_DIR", str(tiny_model_dir))
    monkeypatch.setenv("EMKUM_DATA_DIR", str(tmp_path / "index"))
    runner = CliRunner()
    first = runner.invoke(app, ["index", str(photos), "--batch", "4"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.output[first.output.index("{") :])
    assert report["indexed"] == 6 and report["skipped_existing"] == 0
    assert len(report["bad_files"]) == 1 and "broken.jpg" in report["bad_files"][0]
    (photos / "p5.jpg").write_bytes(jpeg(5, 40))
    second = runner.invoke(app, ["index", str(photos)])
    report = json.loads(second.output[second.output.index("{") :])
    assert report["indexed"] == 1 and report["skipped_existing"] == 6  # resumes: only the new file
    found = runner.invoke(app, ["search", "a red square", "-k", "3"])
    assert found.exit_code == 0, found.output
    lines = [x for x in found.output.splitlines() if x.strip()]
    assert len(lines) == 3 and all(line.split()[1].endswith(".jpg") for line in lines)


def test_settings_from_a_toml_file_and_the_environment(tmp_path, monkeypatch):
    from service.settings import Settings

    path = tmp_path / "emkum.toml"
    path.write_text('port = 9001\nmax_batch = 7\npatch_codec = "SQ8"\n')
    monkeypatch.setenv("EMKUM_CONFIG_FILE", str(path))
    monkeypatch.setenv("EMKUM_MAX_BATCH", "9")  # the environment wins over the file
    s = Settings()
    assert (s.port, s.max_batch, s.patch_codec) == (9001, 9, "SQ8")


def test_bulk_index_on_a_local_ray_cluster(tiny_model_dir, tmp_path):
    """Ray Data: decode tasks, an encoder actor, two shards; bad files reported; a rerun resumes;
    each shard is a data directory the service can open."""
    import ray  # a dev dependency: this test runs in CI

    from index import StoreConfig, VectorStore
    from index.sharding import shard_of
    from runtime.modelcard import load_model_card

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(24):
        (photos / f"p{i}.jpg").write_bytes(jpeg(i, 40))
    (photos / "bad.png").write_bytes(b"\x89PNG broken")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        runner = CliRunner()
        args = [
            "bulk-index",
            str(photos),
            str(tmp_path / "shards"),
            "--model-dir",
            str(tiny_model_dir),
            "--shards",
            "2",
            "--batch",
            "8",
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        report = last_json(result.output)
        assert report["indexed"] == 24 and len(report["bad_files"]) == 1 and "bad.png" in report["bad_files"][0]
        assert sum(report["shards"].values()) == 24 and min(report["shards"].values()) > 0
        again = last_json(runner.invoke(app, args).output)
        assert again["skipped_existing"] == 24 and again["indexed"] == 0
    finally:
        ray.shutdown()
    card = load_model_card(tiny_model_dir)
    for shard in (0, 1):
        store = VectorStore(tmp_path / "shards" / f"shard-{shard:02d}", StoreConfig(card["dim"], card["name"]))
        ids = {x["id"] for x in store.list(limit=100)}
        assert ids and all(shard_of(i, 2) == shard for i in ids)


def test_export_help_states_the_tolerances_the_export_applies():
    """The CLI leaves unset tolerances to training/export.py; its help must quote those values."""
    from training.export import FP16_TOLERANCE, FP32_TOLERANCE

    result = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    for option, value in (("--tolerance", FP32_TOLERANCE), ("--fp16-tolerance", FP16_TOLERANCE)):
        line = next(x for x in result.output.splitlines() if f"{option} " in x)
        assert re.search(rf"\[default: \(?{re.escape(f'{value:g}')}\)?\]", line), line


def test_healthcheck_passes_only_while_the_service_is_ready(tiny_model_dir, tmp_path):
    """The images' HEALTHCHECK: exit 1 with nothing listening, 0 once the real server is ready."""
    from tests.server import free_port, running_server

    assert CliRunner().invoke(app, ["healthcheck", "--port", str(free_port())]).exit_code == 1
    with running_server(tiny_model_dir, tmp_path / "data", tmp_path) as srv:
        port = srv.url.rsplit(":", 1)[1]
        result = CliRunner().invoke(app, ["healthcheck", "--port", port])
        assert result.exit_code == 0 and json.loads(result.stdout)["status"] == "ready"


def test_serve_cluster_command_serves_and_stops_on_sigterm(tiny_model_dir, tmp_path):
    """The runbook's first command as a user runs it: a local Ray cluster, one shard, the HTTP API on
    the port asked for; SIGTERM (docker stop, systemd) shuts Serve and Ray down."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx

    from tests.server import free_port

    port = free_port()
    env = {**os.environ, "EMKUM_MODEL_DIR": str(tiny_model_dir), "EMKUM_PRECISION": "fp32"}
    cmd = [sys.executable, "-m", "service.cli", "serve-cluster", "--shards", "1", "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--data-dir", str(tmp_path / "cluster")], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline, ready = time.monotonic() + 180, None
        while ready is None:
            assert proc.poll() is None and time.monotonic() < deadline, "serve-cluster never became ready"
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                ready = r.json() if r.status_code == 200 else None
            except httpx.TransportError:
                time.sleep(1)
        assert [s["state"] for s in ready["shards"]] == ["up"]
        assert (tmp_path / "cluster" / "shard-00" / "items.sqlite").is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_training_commands_come_from_the_installed_plugin():
    """`emkum train`, `export`, ... are training's, registered through the entry point group; the
    listing shows them after the serving commands, each once."""
    from service.cli import PLUGIN_GROUP, plugin_commands
    from training.cli import app as training_app

    (ep,) = [e for e in entry_points(group=PLUGIN_GROUP) if e.name == "training"]
    assert ep.load() is training_app
    assert {"train", "train-fine-grained", "export", "build-default", "eval"} <= set(plugin_commands())
    listed = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}).output
    names = re.findall(r"^│ ([a-z-]+) ", listed, re.M)
    assert names.index("serve") < names.index("train") and len(names) == len(set(names)), names


def _with_plugins(monkeypatch, root: Path, plugins: dict[str, str]) -> None:
    """Make each plugin a package under `root` (name -> its cli.py; None: not installed) and list
    them, alone, as the installed `emkum.commands` entry points."""
    import service.cli as cli

    for name, body in plugins.items():
        if body is not None:
            (root / name).mkdir()
            (root / name / "__init__.py").write_text("")
            (root / name / "cli.py").write_text(body)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(cli, "entry_points", lambda group: [EntryPoint(n, f"{n}.cli:app", group) for n in plugins])
    cli.plugin_commands.cache_clear()


@pytest.fixture
def fresh_plugins():
    """plugin_commands() caches what it found: start from and leave behind the real plugins."""
    import service.cli as cli

    cli.plugin_commands.cache_clear()
    yield
    cli.plugin_commands.cache_clear()


HELLO = "import typer\napp = typer.Typer()\n\n@app.command()\ndef hello():\n    print('hi')\n"


def test_a_plugin_whose_package_is_gone_is_skipped(tmp_path, monkeypatch, fresh_plugins):
    """The serving image keeps the package metadata (so training's entry point) without training/:
    `emkum` skips that plugin and runs the others."""
    _with_plugins(monkeypatch, tmp_path, {"hello_plugin": HELLO, "not_installed_plugin": None})
    result = CliRunner().invoke(app, ["hello"])
    assert result.exit_code == 0 and result.output == "hi\n", result.output
    assert CliRunner().invoke(app, ["train"]).exit_code == 2  # no such command: training is not listed here


def test_a_plugin_broken_by_its_own_missing_import_raises(tmp_path, monkeypatch, fresh_plugins):
    """A plugin that is installed but fails on a module it imports is a bug to show, not to hide."""
    import service.cli as cli

    _with_plugins(monkeypatch, tmp_path, {"broken_plugin": "import a_module_nobody_installed\n"})
    with pytest.raises(ModuleNotFoundError, match="a_module_nobody_installed"):
        cli.plugin_commands()
