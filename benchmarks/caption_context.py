"""How much of its caption should a word's vector carry? For a checkpoint's fine-grained head on a
cached val half: training/fine_grained.py's own evaluation (rerank Mean6 at its best fusion weight,
collage pointing, the swap choice) with each word's vector plus beta x its caption's mean word
vector (model/emkum.py FineGrainedHead `caption_context`), for several beta. No training: the
head's weights stay as they are. docs/fine-grained.md cites it for the default model's beta.

    python benchmarks/caption_context.py --checkpoint model/weights/emkum-flickr8k.partial.safetensors \\
        --cache runs/fine-grained/cache/val-a
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from training.feature_cache import SplitFeatures  # noqa: E402
from training.fine_grained import FineGrainedTrainConfig, Heads, evaluate_heads  # noqa: E402

KEYS = ("rerank_mean6", "cls_weight", "cmli_only_mean6", "pointing2", "pointing3", "choice_cmli", "choice_fused")


@torch.no_grad()
def main(
    checkpoint: Path = typer.Option(..., help="a checkpoint with a fine-grained head"),
    cache: Path = typer.Option(..., help="a cached val half (emkum train-fine-grained writes one)"),
    betas: str = typer.Option("0,0.25,0.5,1,1.5,2,3,5", help="comma-separated caption weights"),
    out: Path = typer.Option(ROOT / "benchmarks" / "results" / "caption_context.json"),
) -> None:
    model, _ = load_checkpoint(checkpoint)
    fg = model.cfg.fine_grained
    feats = SplitFeatures.load(cache)
    cfg = FineGrainedTrainConfig(
        layers=fg.vision_layers, hidden=fg.hidden, context=fg.context, attention=fg.attention, cnn=fg.cnn
    )
    widths = tuple(norm.normalized_shape[0] for norm in model.fg_image.norms)
    heads = Heads(widths, model.cfg.text.width, model.cfg.proj_dim, fg.hidden, fg.context, fg.attention)
    heads.image.load_state_dict(model.fg_image.state_dict())
    heads.text.load_state_dict(model.fg_text.state_dict())
    rows = []
    for beta in (float(b) for b in betas.split(",")):
        heads.text.caption_context = beta  # not a weight: the same head, its words given more caption
        result = evaluate_heads(heads, feats, cfg)
        rows.append({"caption_context": beta, **{k: result[k] for k in KEYS}})
        typer.echo(json.dumps(rows[-1]))
    report = {"machine": describe(), "checkpoint": str(checkpoint), "cache": str(cache), "rows": rows}
    out.write_text(json.dumps(report, indent=2))
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
