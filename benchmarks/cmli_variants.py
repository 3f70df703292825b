"""Would another way of scoring a text against an image's patches make the rerank add more? On
cached val-half features with a checkpoint's heads and the CLS top 20: the text queries' CMLI as
served (eq. 4, mean over words of the best patch), over content words only (training/stopwords.py),
FILIP's other direction (mean over patches of the best word), and the mean of both; each fused with
CLS at its best weight (benchmarks/fusion_sweep.py's sweep, raw and z-scored). Image queries keep
eq. 3. docs/fine-grained.md cites it.

    python benchmarks/cmli_variants.py --checkpoint model/weights/emkum-flickr8k.partial.safetensors \\
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
from benchmarks.fusion_sweep import best_fusion  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from model.cmli import cmli_t2i_candidates  # noqa: E402
from training.feature_cache import SplitFeatures  # noqa: E402
from training.fine_grained import _texts, load_cache, two_stage_scores  # noqa: E402
from training.metrics import i2t_recall, summarise, t2i_recall  # noqa: E402


def patch_to_word(tokens: torch.Tensor, word: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """[B, K]: for each candidate image, the mean over its patches of the best word's similarity."""
    sim = torch.einsum("bmd,bknd->bknm", tokens, candidates)
    return sim.masked_fill(~word.bool()[:, None, None, :], -1e4).max(3).values.mean(2)


@torch.no_grad()
def main(
    checkpoint: Path = typer.Option(..., help="a checkpoint with a fine-grained head"),
    cache: Path = typer.Option(..., help="a cached val half (emkum train-fine-grained writes one)"),
    candidates: int = typer.Option(20, help="CLS candidates reranked"),
    out: Path = typer.Option(ROOT / "benchmarks" / "results" / "cmli_variants.json"),
) -> None:
    model, _ = load_checkpoint(checkpoint)
    feats = SplitFeatures.load(cache)
    arrays = load_cache(feats, model.cfg.fine_grained.vision_layers, model.cfg.fine_grained.cnn)
    stage = two_stage_scores(model.fg_image, model.fg_text, feats, arrays, candidates)
    t2i, i2t, owner = stage["t2i"], stage["i2t"], stage["caption_image"]
    tokens, patches = stage["tokens"], stage["patches"]
    _, word, content = _texts(np.arange(len(tokens)), arrays["tokens"], arrays["word"], arrays["content"])
    content = torch.where(content.sum(1, keepdim=True) > 0, content, word)  # a caption of stop words keeps them
    chosen = torch.from_numpy(t2i.candidates)
    content_scores, reverse = [], []
    for s in range(0, len(tokens), 64):
        cand = patches[chosen[s : s + 64]]
        content_scores.append(cmli_t2i_candidates(tokens[s : s + 64], content[s : s + 64], cand)[0])
        reverse.append(patch_to_word(tokens[s : s + 64], word[s : s + 64], cand))
    variants = {
        "words (as served)": t2i.cmli,
        "content words only": torch.cat(content_scores).numpy(),
        "patch -> best word": torch.cat(reverse).numpy(),
    }
    variants["mean of both directions"] = 0.5 * (variants["words (as served)"] + variants["patch -> best word"])
    rows = []
    for name, scores in variants.items():
        best = max(
            (best_fusion(t2i, i2t, owner, norm, scores) | {"scores": norm} for norm in ("raw", "zscore")),
            key=lambda r: r["mean6"],
        )
        rows.append({"variant": name, **best})
        typer.echo(json.dumps(rows[-1]))
    cls_only = summarise(i2t_recall(i2t.candidates, owner), t2i_recall(t2i.candidates, owner))["mean6"]
    report = {
        "machine": describe(),
        "checkpoint": str(checkpoint),
        "cache": str(cache),
        "candidates": candidates,
        "cls_mean6": cls_only,
        "rows": rows,
    }
    out.write_text(json.dumps(report, indent=2))
    typer.echo(f"CLS only {cls_only}; wrote {out}")


if __name__ == "__main__":
    typer.run(main)
