"""The `emkum` command line: bulk indexing (resumable, bad files reported) and search."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from service.cli import app
from tests.images import jpeg


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
