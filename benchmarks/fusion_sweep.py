"""How much can fusing CLS with the fine-grained CMLI score add, at any weight, normalisation and
rerank depth? On cached val-half features (training/feature_cache.py) with a checkpoint's heads:
the best Mean6 over fusion weights 0, 0.05, ... 1, for raw scores and per-query z-scored ones, and
K = 20, 50, 100 CLS candidates. docs/fine-grained.md cites it for why the rerank gain is small.

    python benchmarks/fusion_sweep.py --checkpoint model/weights/emkum-flickr8k.partial.safetensors \\
        --cache runs/fine-grained/cache/val-a
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from training.feature_cache import SplitFeatures  # noqa: E402
from training.fine_grained import load_cache, two_stage_scores  # noqa: E402
from training.metrics import i2t_recall, rerank, summarise, t2i_recall  # noqa: E402


def zscore(x: np.ndarray) -> np.ndarray:
    """Per query: scores minus their mean over the candidates, over their spread."""
    return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)


def best_fusion(t2i, i2t, owner: np.ndarray, norm: str, t2i_cmli: np.ndarray | None = None) -> dict:
    """The best Mean6 over fusion weights 0, 0.05, ... 1, and CMLI alone's (weight 0), from
    `Candidates` of both directions; `t2i_cmli` replaces the text queries' CMLI scores, to compare
    scoring variants on the same candidates."""
    f = zscore if norm == "zscore" else (lambda x: x)
    t2i_cmli = t2i.cmli if t2i_cmli is None else t2i_cmli
    best: dict = {}
    for w in np.round(np.linspace(0, 1, 21), 2):
        mean6 = summarise(
            i2t_recall(rerank(i2t.candidates, f(i2t.cls), f(i2t.cmli), w), owner),
            t2i_recall(rerank(t2i.candidates, f(t2i.cls), f(t2i_cmli), w), owner),
        )["mean6"]
        if w == 0:
            cmli_only = mean6
        if not best or mean6 > best["mean6"]:
            best = {"mean6": mean6, "cls_weight": float(w)}
    return best | {"cmli_only_mean6": cmli_only}


@torch.no_grad()
def main(
    checkpoint: Path = typer.Option(..., help="a checkpoint with a fine-grained head"),
    cache: Path = typer.Option(..., help="a cached val half (emkum train-fine-grained writes one)"),
    out: Path = typer.Option(ROOT / "benchmarks" / "results" / "fusion_sweep.json"),
) -> None:
    model, _ = load_checkpoint(checkpoint)
    feats = SplitFeatures.load(cache)
    arrays = load_cache(feats, model.cfg.fine_grained.vision_layers, model.cfg.fine_grained.cnn)
    rows = []
    cls_only = None
    for k in (20, 50, 100):
        stage = two_stage_scores(model.fg_image, model.fg_text, feats, arrays, k)
        t2i, i2t, owner = stage["t2i"], stage["i2t"], stage["caption_image"]
        cls_only = summarise(i2t_recall(i2t.candidates, owner), t2i_recall(t2i.candidates, owner))
        for norm in ("raw", "zscore"):
            rows.append({"candidates": k, "scores": norm, **best_fusion(t2i, i2t, owner, norm)})
            typer.echo(json.dumps(rows[-1]))
    report = {
        "machine": describe(),
        "checkpoint": str(checkpoint),
        "cache": str(cache),
        "cls_mean6": cls_only["mean6"],
        "rows": rows,
    }
    out.write_text(json.dumps(report, indent=2))
    typer.echo(f"CLS only {cls_only['mean6']}; wrote {out}")


if __name__ == "__main__":
    typer.run(main)
