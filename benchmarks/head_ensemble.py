"""Would a second fine-grained head add to the rerank? Two heads' CMLI scores averaged, against each
head alone, on the same CLS candidates of a cached val half (best fusion weight 0, 0.05, ... 1 for
each). docs/fine-grained.md cites it for why a second ConvNet head was not shipped (it would also
double the stored patch vectors).

    python benchmarks/head_ensemble.py --first runs/fg-cnn/context.safetensors \\
        --second runs/fg-lite2/context.safetensors --cache runs/fine-grained/cache/val-a
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.fusion_sweep import best_fusion  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from training.feature_cache import SplitFeatures  # noqa: E402
from training.fine_grained import load_cache, two_stage_scores  # noqa: E402
from training.metrics import i2t_recall, summarise, t2i_recall  # noqa: E402


def main(
    first: Path = typer.Option(..., help="a checkpoint with a fine-grained head"),
    second: Path = typer.Option(..., help="another one, over the same CLS path"),
    cache: Path = typer.Option(..., help="a cached val half (emkum train-fine-grained writes one)"),
    candidates: int = typer.Option(20, help="K: CLS candidates reranked"),
    out: Path = typer.Option(ROOT / "benchmarks" / "results" / "head_ensemble.json"),
) -> None:
    feats = SplitFeatures.load(cache)
    stages = []
    for checkpoint in (first, second):
        model, _ = load_checkpoint(checkpoint)
        fg = model.cfg.fine_grained
        stages.append(
            two_stage_scores(
                model.fg_image, model.fg_text, feats, load_cache(feats, fg.vision_layers, fg.cnn), candidates
            )
        )
    a, b = stages
    if not (a["t2i"].candidates == b["t2i"].candidates).all():
        raise typer.BadParameter("the two checkpoints' CLS candidates differ: they do not share a CLS path")
    owner = a["caption_image"]
    # the first head's candidates (the same as the second's) with the two heads' CMLI averaged
    mean_of_both = [dataclasses.replace(a[d], cmli=(a[d].cmli + b[d].cmli) / 2) for d in ("t2i", "i2t")]
    report = {
        "machine": describe(),
        "cache": str(cache),
        "candidates": candidates,
        "cls_mean6": summarise(i2t_recall(a["i2t"].candidates, owner), t2i_recall(a["t2i"].candidates, owner))["mean6"],
        "first": {"checkpoint": str(first), **best_fusion(a["t2i"], a["i2t"], owner, "raw")},
        "second": {"checkpoint": str(second), **best_fusion(b["t2i"], b["i2t"], owner, "raw")},
        "mean_of_both": best_fusion(*mean_of_both, owner, "raw"),
    }
    out.write_text(json.dumps(report, indent=2))
    typer.echo(json.dumps(report, indent=2))


if __name__ == "__main__":
    typer.run(main)
