"""How much a caption-context weight makes a caption's words point at one spot: for each weight, the
share of pairs of content words in one caption whose best patch on the caption's own photo is the
same (cached val features, the checkpoint's own head). 0 is each word on its own; a weight where
nearly all pairs agree makes `explain` show one spot for every word.

    python benchmarks/word_collapse.py --checkpoint model/weights/emkum-flickr8k.partial.safetensors \\
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
from training.fine_grained import _texts, head_patches, load_cache  # noqa: E402


@torch.no_grad()
def main(
    checkpoint: Path = typer.Option(..., help="a checkpoint with a fine-grained head"),
    cache: Path = typer.Option(..., help="a cached val half (emkum train-fine-grained writes one)"),
    betas: str = typer.Option("0,0.5,1,2,3,5,8", help="comma-separated caption weights"),
    out: Path = typer.Option(ROOT / "benchmarks" / "results" / "word_collapse.json"),
) -> None:
    model, _ = load_checkpoint(checkpoint)
    fg = model.cfg.fine_grained
    feats = SplitFeatures.load(cache)
    arrays = load_cache(feats, fg.vision_layers, fg.cnn)
    patches = head_patches(model.fg_image, arrays)
    rows = np.arange(len(arrays["word"]))
    owner = np.load(feats.folder / "caption_image.npy")
    tokens, word, content = _texts(rows, arrays["tokens"], arrays["word"], arrays["content"])
    results = []
    for beta in (float(b) for b in betas.split(",")):
        model.fg_text.caption_context = beta  # not a weight: the same head, its words given more caption
        vectors = model.fg_text(tokens, words=word)
        shares = []
        for r in rows:
            mine = vectors[r, content[r].bool()]
            if len(mine) < 2:
                continue
            best = (mine @ patches[owner[r]].T).argmax(-1)
            same = (best[:, None] == best[None, :]).float()
            shares.append(float((same.sum() - len(mine)) / (len(mine) * (len(mine) - 1))))
        results.append(
            {
                "caption_context": beta,
                "same_best_patch": round(100 * float(np.mean(shares)), 1),
                "captions": len(shares),
            }
        )
        typer.echo(json.dumps(results[-1]))
    report = {"machine": describe(), "checkpoint": str(checkpoint), "cache": str(cache), "rows": results}
    out.write_text(json.dumps(report, indent=2))
    typer.echo(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
