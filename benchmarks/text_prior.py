"""Would the word head gain from a second text tower? The frozen MiniLM (the fine-tuned text tower's
own starting point, before 30 epochs on Flickr8k) read beside the fine-tuned tower's outputs, one
LayerNorm each, like the ConvNet beside the ViT on the image side (issue #14). Everything else is
the shipped recipe (`FineGrainedTrainConfig` with blocks 10 + 12, EfficientNet-Lite0, 3 epochs).

An experiment, not a product option: it writes a copy of a feature cache whose `text_tokens` and
`swap_tokens` carry both towers' outputs (768 wide; every other array a symlink to the original),
trains the heads on it with the val half's evaluation after each epoch, then evaluates the result
again with caption context 1.0, as shipped. docs/fine-grained.md section 4 has the numbers.

    python benchmarks/text_prior.py cache --source /work/cache --dest /work/cache-prior
    python benchmarks/text_prior.py train --cache /work/cache-prior --out runs/fg-prior
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import typer
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import training.fine_grained as fine_grained  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from model.checkpoint import read_header  # noqa: E402
from model.emkum import FineGrainedHead  # noqa: E402
from model.encoders import TextTransformer  # noqa: E402
from model.pretrained import load_bert_text, minilm_dir  # noqa: E402
from runtime.tokenizer import TextTokenizer  # noqa: E402
from training.feature_cache import MAX_TOKENS, SplitFeatures  # noqa: E402
from training.swaps import make_swaps  # noqa: E402

app = typer.Typer(help=__doc__, no_args_is_help=True)
CHECKPOINT = ROOT / "model" / "weights" / "emkum-flickr8k.partial.safetensors"


class TwoTowerWords(FineGrainedHead):
    """The word head over [fine-tuned tower | frozen MiniLM] token features, one LayerNorm each."""

    def __init__(self, width: int, dim: int, hidden: int, caption_context: float) -> None:
        super().__init__((width, width), dim, hidden, caption_context=caption_context)
        self.width = width

    def forward(self, x: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x[..., : self.width], x[..., self.width :], words=words)


class TwoTowerHeads(fine_grained.Heads):
    """`Heads` whose word head reads both towers when the cached tokens are twice the tower's width."""

    tower_width = 384

    def __init__(self, vision_widths, text_width, dim, hidden, context=0, attention=0, caption_context=0.0):
        super().__init__(vision_widths, text_width, dim, hidden, context, attention, caption_context)
        if text_width == 2 * self.tower_width:
            self.text = TwoTowerWords(self.tower_width, dim, hidden, caption_context)


@app.command()
def cache(
    source: Path = typer.Option(..., help="a feature cache (emkum train-fine-grained writes one)"),
    dest: Path = typer.Option(..., help="where the copy with both towers' tokens goes"),
    splits: list[str] = typer.Option(["val-a", "train"], help="the cache's split folders to copy"),
    checkpoint: Path = typer.Option(CHECKPOINT, help="the model whose text config the frozen tower takes"),
) -> None:
    """Write `dest/<split>`: the frozen MiniLM's token outputs beside the cached fine-tuned ones."""
    cfg = read_header(checkpoint)["config"]
    # the package's MiniLM as published: its CLS keeps its position embedding
    prior = TextTransformer(dataclasses.replace(cfg.text, cls_zero_position=False)).eval()
    load_bert_text(prior)
    tokenizer = TextTokenizer(minilm_dir() / "tokenizer.json", cfg.text.max_length)
    width = cfg.text.width
    for split in splits:
        src, dst = source / split, dest / split
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.name not in ("text_tokens.npy", "swap_tokens.npy") and not (dst / f.name).exists():
                os.symlink(f.resolve(), dst / f.name)
        meta = json.loads((src / "meta.json").read_text())
        captions = meta["captions_text"]
        per_image: list[list[str]] = [[] for _ in range(meta["images"])]
        for caption, image in zip(captions, np.load(src / "caption_image.npy"), strict=True):
            per_image[int(image)].append(caption)
        swaps = make_swaps(per_image)  # the cache's own swaps: the generator is deterministic
        if not (np.load(src / "swap_image.npy") == np.array([sw.image for sw in swaps])).all():
            raise typer.BadParameter(f"{src}: its swaps are not make_swaps' of its captions")
        for name, texts in (("text_tokens", captions), ("swap_tokens", [sw.negative for sw in swaps])):
            old = np.load(src / f"{name}.npy", mmap_mode="r")
            out = np.lib.format.open_memmap(
                dst / f"{name}.npy", mode="w+", dtype=np.float16, shape=(len(texts), MAX_TOKENS, 2 * width)
            )
            with torch.no_grad():
                for s in tqdm(range(0, len(texts), 256), desc=f"{split} {name}", unit="batch"):
                    b = tokenizer(texts[s : s + 256])
                    ids, mask = torch.from_numpy(b.ids[:, :MAX_TOKENS]), torch.from_numpy(b.mask[:, :MAX_TOKENS])
                    e = s + len(ids)
                    out[s:e, :, :width] = old[s:e]
                    out[s:e, : ids.shape[1], width:] = prior(ids, mask).float().numpy()
            out.flush()


@app.command()
def train(
    cache: Path = typer.Option(..., help="a cache written by `cache`"),
    out: Path = typer.Option(..., help="folder for the training log, the heads and the report"),
    epochs: int = typer.Option(3),
    report: Path = typer.Option(ROOT / "benchmarks" / "results" / "text_prior.json"),
) -> None:
    """The shipped recipe on both towers' tokens; half a's numbers after each epoch, and with caption
    context 1.0 at the end."""
    torch.manual_seed(0)
    fine_grained.Heads = TwoTowerHeads  # train_heads builds its heads from the cached widths
    cfg = fine_grained.FineGrainedTrainConfig(layers=(10, 12), cnn="efficientnet-lite0", epochs=epochs)
    train_split, val = SplitFeatures.load(cache / "train"), SplitFeatures.load(cache / "val-a")
    out.mkdir(parents=True, exist_ok=True)
    heads, history = fine_grained.train_heads(train_split, val, cfg, out / "model.log.json")
    torch.save(heads.state_dict(), out / "heads.pt")
    heads.text.caption_context = 1.0
    context = fine_grained.evaluate_heads(heads, val, cfg.model_copy(update={"caption_context": 1.0}))
    result = {
        "machine": describe(),
        "cache": str(cache),
        "config": cfg.model_dump(),
        "history": history,
        "caption_context_1": context,
    }
    report.write_text(json.dumps(result, indent=2))
    typer.echo(json.dumps({"last_epoch": history[-1] if history else None, "caption_context_1": context}, indent=2))


if __name__ == "__main__":
    app()
