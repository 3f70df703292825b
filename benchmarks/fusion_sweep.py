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
from model.cmli import cmli_i2t_candidates, cmli_t2i_candidates  # noqa: E402
from training.feature_cache import SplitFeatures  # noqa: E402
from training.fine_grained import _rows, _texts, load_cache  # noqa: E402
from training.metrics import i2t_recall, summarise, t2i_recall  # noqa: E402


def zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)


@torch.no_grad()
def main(
    checkpoint: Path = typer.Option(..., help="a checkpoint with a fine-grained head"),
    cache: Path = typer.Option(..., help="a cached val half (emkum train-fine-grained writes one)"),
    out: Path = typer.Option(ROOT / "benchmarks" / "results" / "fusion_sweep.json"),
) -> None:
    model, _ = load_checkpoint(checkpoint)
    feats = SplitFeatures.load(cache)
    arrays = load_cache(feats, model.cfg.fine_grained.vision_layers)
    img_cls = torch.from_numpy(np.array(feats.array("single_cls")))
    txt_cls = torch.from_numpy(np.array(feats.array("text_cls")))
    owner = np.array(feats.array("caption_image"))
    patches = torch.cat(
        [model.fg_image(*(_rows(a, slice(s, s + 256)) for a in arrays["single"])) for s in range(0, len(img_cls), 256)]
    )
    tok, word, _ = _texts(np.arange(len(txt_cls)), arrays["tokens"], arrays["word"], arrays["content"])
    tokens = model.fg_text(tok)
    sim = txt_cls @ img_cls.T
    cls_only = summarise(i2t_recall(sim.T.topk(10, 1)[1].numpy(), owner), t2i_recall(sim.topk(10, 1)[1].numpy(), owner))
    rows = []
    for k in (20, 50, 100):
        t_s, t_c = sim.topk(k, 1)
        i_s, i_c = sim.T.topk(k, 1)
        t_m = torch.cat(
            [
                cmli_t2i_candidates(tokens[s : s + 32], word[s : s + 32], patches[t_c[s : s + 32]])[0]
                for s in range(0, len(tokens), 32)
            ]
        )
        i_m = torch.cat(
            [
                cmli_i2t_candidates(patches[s : s + 32], tokens[i_c[s : s + 32]], word[i_c[s : s + 32]])
                for s in range(0, len(patches), 32)
            ]
        )
        for norm in ("raw", "zscore"):
            f = zscore if norm == "zscore" else (lambda x: x)
            best = None
            for w in np.round(np.linspace(0, 1, 21), 2):
                t_order = torch.argsort(-(w * f(t_s) + (1 - w) * f(t_m)), 1).numpy()
                i_order = torch.argsort(-(w * f(i_s) + (1 - w) * f(i_m)), 1).numpy()
                mean6 = summarise(
                    i2t_recall(np.take_along_axis(i_c.numpy(), i_order, 1), owner),
                    t2i_recall(np.take_along_axis(t_c.numpy(), t_order, 1), owner),
                )["mean6"]
                if best is None or mean6 > best["mean6"]:
                    best = {"mean6": mean6, "cls_weight": float(w)}
            rows.append({"candidates": k, "scores": norm, **best})
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
