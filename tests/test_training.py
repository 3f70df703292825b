"""Training on tiny random models and synthetic data: readers, losses, the loop, resume, eval."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.config import LossWeights, TrainConfig, load_train_config
from training.data import read_csv, read_karpathy, read_spec, read_webdataset
from training.losses import ContrastiveLoss, kd_loss, target_cmli_loss


def test_karpathy_reader_from_folder_and_shards(synthetic_data, tmp_path):
    folder = synthetic_data.parent / "images"
    pairs = read_karpathy(synthetic_data, str(folder), "train")
    assert len(pairs) == 48 and len(pairs[0].captions) == 2
    with tarfile.open(tmp_path / "shard-00.tar", "w") as tar:
        for p in sorted(folder.iterdir()):
            tar.add(p, arcname=f"images/{p.name}")
    shard_pairs = read_karpathy(synthetic_data, str(tmp_path / "shard-*.tar"), "val")
    assert len(shard_pairs) == 16
    assert shard_pairs[0].read() == (folder / shard_pairs[0].key).read_bytes()
    with pytest.raises(ValueError, match="empty"):
        read_karpathy(synthetic_data, str(folder), "test")


def test_csv_and_webdataset_readers(synthetic_data, tmp_path):
    folder = synthetic_data.parent / "images"
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerow([str(folder / "img0000.jpg"), "a red square"])
        w.writerow([str(folder / "img0000.jpg"), "red block"])
        w.writerow([str(folder / "img0001.jpg"), "a red stripe"])
    pairs = read_csv(tmp_path / "pairs.csv")
    assert [len(p.captions) for p in pairs] == [2, 1]
    with tarfile.open(tmp_path / "wds-00.tar", "w") as tar:
        for ext, payload in (("jpg", (folder / "img0002.jpg").read_bytes()), ("txt", b"a green square")):
            info = tarfile.TarInfo(f"s0.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        meta = json.dumps({"captions": ["one", "two"]}).encode()
        for name, payload in (("s1.jpg", (folder / "img0003.jpg").read_bytes()), ("s1.json", meta)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    wds = read_webdataset(str(tmp_path / "wds-*.tar"))
    assert [p.captions for p in wds] == [["a green square"], ["one", "two"]]
    assert [p.key for p in read_spec(f"wds:{tmp_path}/wds-*.tar")] == ["s0", "s1"]
    with pytest.raises(ValueError, match="unknown data spec"):
        read_spec("parquet:x")


def test_contrastive_loss_prefers_aligned_pairs():
    loss = ContrastiveLoss()
    x = F.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(np.log(1 / 0.07))
    aligned = loss(x, x, scale)
    shuffled = loss(x, x.roll(1, 0), scale)
    assert aligned < shuffled
    big = loss(x, x, torch.tensor(10.0))  # exp(10) is clamped to 100
    assert big == pytest.approx(float(loss(x, x, torch.tensor(np.log(100.0)))))


def test_kd_and_target_cmli_losses_are_zero_at_the_target():
    target = torch.randn(4, 12)
    std = F.layer_norm(target, (12,))
    assert kd_loss(std, std, target).item() == pytest.approx(0.0, abs=1e-6)
    teacher_patches = torch.randn(2, 5, 12)
    std_p = F.layer_norm(teacher_patches, (12,))
    tokens = std_p[:, [3, 1, 0]]  # each token equals one teacher patch, and the student agrees
    mask = torch.ones(2, 3)
    assert target_cmli_loss(std_p, tokens, mask, teacher_patches, tokens, std_p).item() == pytest.approx(0.0, abs=1e-5)
    # shifting every token by 1 costs MSE 1 on the text side, 0 on the image side: (0 + 1) / 2
    loss = target_cmli_loss(std_p, tokens + 1, mask, teacher_patches, tokens, std_p)
    assert loss.item() == pytest.approx(0.5, abs=1e-5)


def test_target_cmli_picks_the_patch_the_student_matches_not_the_one_nearest_the_prediction():
    """Seed 004 eq. 9: the target of token j is the teacher patch at m_j^{t2i}, the argmax over the
    student's patches of the student's similarity (eq. 2). The old code took the teacher patch nearest
    the token's prediction, which here is patch 0 while the student matches patch 2."""
    teacher = F.layer_norm(torch.randn(1, 3, 8), (8,))
    pred = teacher[:, :1] + 0.01  # the token's prediction sits on teacher patch 0
    student_patches = torch.eye(3, 4)[None]  # three orthogonal student patches
    student_token = student_patches[:, 2:3] * 5  # the student's token matches student patch 2
    mask = torch.ones(1, 1)
    loss = target_cmli_loss(teacher, pred, mask, teacher, student_token, student_patches)
    expected = ((pred[0, 0] - teacher[0, 2]) ** 2).mean() / 2  # image side is 0: patches = teacher
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    nearest = ((pred[0, 0] - teacher[0, 0]) ** 2).mean() / 2  # what the old rule would have given
    assert abs(loss.item() - nearest.item()) > 0.1


def _config(data, out, **kw) -> TrainConfig:
    return TrainConfig(
        model="emkum-tiny",
        init_vision="random",
        init_text="random",
        teacher="random:24",
        train_data=f"karpathy:{data}:{data.parent / 'images'}:train",
        val_data=f"karpathy:{data}:{data.parent / 'images'}:val",
        out_dir=str(out),
        batch_size=16,
        lr=2e-3,
        eval_candidates=8,
        **kw,
    )


def test_training_learns_and_resumes_exactly(synthetic_data, tmp_path):
    from training.loop import train

    weights = LossWeights(kd=1.0, target_cmli=0.5, cmli_contrastive=0.5)
    summary = train(_config(synthetic_data, tmp_path / "a", epochs=6, loss=weights))
    history = [h["cls"]["mean6"] for h in summary["history"]]
    assert history[-1] > history[0]  # it learns the colour/shape captions
    assert summary["best"]["rerank"]["mean6"] >= summary["best"]["cls"]["mean6"]
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert {"contrastive", "kd", "target_cmli", "cmli_contrastive", "lr"} <= set(rows[0])
    # resume: stop after 3 of 6 epochs, then continue from last.pt: must equal 6 straight
    stopped = train(_config(synthetic_data, tmp_path / "b", epochs=6, stop_after=3, loss=weights))
    assert len(stopped["history"]) == 3
    resumed = train(_config(synthetic_data, tmp_path / "b", epochs=6, loss=weights))
    assert [h["cls"]["mean6"] for h in resumed["history"]] == history


def test_config_file_and_cli_overrides(tmp_path):
    from training.cli import _merge, parse_overrides

    path = tmp_path / "c.toml"
    path.write_text('model = "emkum-tiny"\nepochs = 2\n[loss]\nkd = 0.5\n')
    cfg = load_train_config(path)
    assert cfg.epochs == 2 and cfg.loss.kd == 0.5
    merged = TrainConfig.model_validate(_merge(cfg.model_dump(), parse_overrides(["loss.kd=0", "epochs=4"])))
    assert merged.loss.kd == 0 and merged.epochs == 4 and merged.model == "emkum-tiny"
    with pytest.raises(ValueError):
        TrainConfig.model_validate({"not_a_key": 1})


def test_eval_exported_reports_the_contract(tiny_model_dir, synthetic_data):
    from typer.testing import CliRunner

    from service.cli import app

    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--data",
            f"karpathy:{synthetic_data}:{synthetic_data.parent / 'images'}",
            "--split",
            "val",
            "--candidates",
            "8",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{") :])
    for mode in ("cls", "rerank"):
        assert set(out[mode]) == {"i2t", "t2i", "mean6"}
        assert set(out[mode]["t2i"]) == {"r1", "r5", "r10"}
        assert 0 <= out[mode]["mean6"] <= 100
    assert out["images"] == 16 and out["captions"] == 32
    gain = out["rerank_gain"]  # the difference of the two Mean6s, inside its own interval
    assert gain["gain"] == pytest.approx(out["rerank"]["mean6"] - out["cls"]["mean6"], abs=0.02)
    assert gain["low"] <= gain["gain"] <= gain["high"] and gain["confidence"] == 0.95


def _ranked(n_images: int, per_image: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random i2t and t2i top-10 lists over `n_images` images with `per_image` captions each."""
    rng = np.random.default_rng(seed)
    owner = np.repeat(np.arange(n_images), per_image)
    i2t = np.stack([rng.permutation(len(owner))[:10] for _ in range(n_images)])
    t2i = np.stack([rng.permutation(n_images)[:10] for _ in owner])
    return i2t, t2i, owner


def test_mean6_gain_interval_has_known_answers():
    """training/metrics.py mean6_gain_interval: the same rankings gain exactly 0 with no spread; a
    ranking that puts every image first gains 100 minus the random one's Mean6, and no resampling
    takes it above 100; fixing some queries gives the exact Mean6 difference inside an interval that is
    wider than a point and narrows with more images."""
    from training.metrics import i2t_recall, mean6_gain_interval, summarise, t2i_recall

    i2t, t2i, owner = _ranked(40, 5, 0)
    same = mean6_gain_interval((i2t, t2i), (i2t.copy(), t2i.copy()), owner, resamples=200)
    assert same["gain"] == same["low"] == same["high"] == 0
    # every caption's image and every image's first caption at rank 1: Mean6 = 100 however resampled
    perfect_t2i = np.concatenate([owner[:, None], t2i[:, 1:]], axis=1)
    perfect_i2t = np.concatenate([(np.arange(40) * 5)[:, None], i2t[:, 1:]], axis=1)
    base = summarise(i2t_recall(i2t, owner), t2i_recall(t2i, owner))["mean6"]
    full = mean6_gain_interval((i2t, t2i), (perfect_i2t, perfect_t2i), owner, resamples=200)
    assert full["gain"] == pytest.approx(100 - base, abs=0.02) and full["low"] < full["gain"] < full["high"] <= 100
    widths = []
    for n in (60, 600):
        i2t, t2i, owner = _ranked(n, 5, 1)
        fixed = t2i.copy()
        fixed[: len(owner) // 3, 0] = owner[: len(owner) // 3]  # a third of the text queries fixed at R@1
        got = mean6_gain_interval((i2t, t2i), (i2t, fixed), owner, resamples=500)
        exact = summarise(i2t_recall(i2t, owner), t2i_recall(fixed, owner))["mean6"]
        exact -= summarise(i2t_recall(i2t, owner), t2i_recall(t2i, owner))["mean6"]
        assert got["gain"] == pytest.approx(exact, abs=0.02) and got["low"] < got["gain"] < got["high"]
        widths.append(got["high"] - got["low"])
    assert widths[1] < widths[0] / 2  # ten times the images: about a third of the width


def test_ddp_training_under_torchrun_keeps_replicas_in_sync(synthetic_data, tmp_path):
    """Two CPU processes (gloo) through `torchrun`: negatives gathered across ranks, gradients
    synchronised by DDP (the loop checks that both replicas end with the same weights)."""
    import os
    import subprocess
    import sys

    from tests.server import free_port

    config = tmp_path / "ddp.toml"
    images = synthetic_data.parent / "images"
    config.write_text(
        f'model = "emkum-tiny"\ninit_vision = "random"\ninit_text = "random"\nteacher = "random:24"\n'
        f'train_data = "karpathy:{synthetic_data}:{images}:train"\n'
        f'val_data = "karpathy:{synthetic_data}:{images}:val"\n'
        f'out_dir = "{tmp_path / "run"}"\nepochs = 2\nbatch_size = 16\nlr = 0.002\neval_candidates = 8\n'
        "[loss]\nkd = 1.0\ncmli_contrastive = 0.5\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "service.cli",
            "train",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["replicas_in_sync"] == 2
    assert len(summary["history"]) == 2
