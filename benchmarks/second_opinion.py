"""Would the rerank gain from a global score made of evidence the first stage does not have?

The rerank's CMLI ranks almost as well as CLS on its own and makes the same mistakes
(docs/fine-grained.md section 5). This measures a "second opinion" built only from the two frozen
towers the design card ships beside ours: EfficientNet-Lite0's maps (the ones the patch head reads),
mean-pooled over the grid, against the frozen MiniLM's mean-pooled token outputs (the sentence
vector all-MiniLM-L6-v2 was trained to give). One LayerNorm + Linear to 256 on each side, trained
with CLIP's symmetric InfoNCE on the cached training features (30,000 captions of 6,000 images;
seconds per epoch on a CPU): training/second_opinion.py's heads and loop, which train the default
model's second opinion (there with our own text tower's side: `--text fine-tuned` here). The epoch
and the fusion weights are chosen on val half a; half b reports, with paired bootstrap intervals
(training/metrics.py). Also measured: the same ensemble
over the whole collection (the two global vectors concatenated with weights), and a correction of
the CLS vector trained from the same features instead (`Correction`), on half a.

Fused score of a CLS candidate: a * CLS + b * CMLI + c * second opinion, a + b + c = 1 (steps of
0.05), over the CLS top `candidates`, as the service's rerank does for CLS + CMLI.

    python benchmarks/text_prior.py cache --source CACHE --dest PRIOR --splits train --splits val-a --splits val-b
    python benchmarks/second_opinion.py --cache CACHE --prior-cache PRIOR --checkpoint runs/fg-cnn/context.safetensors

CACHE holds `train`, `val-a` and `val-b` feature caches with EfficientNet-Lite0's maps
(training/feature_cache.py; `emkum train-fine-grained --set cache_dir=CACHE --set val_half=b
--set train.cnn=efficientnet-lite0 --set train.init=checkpoint --set train.epochs=0 --set out=...`
writes the third without training).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import describe  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from training.feature_cache import SplitFeatures  # noqa: E402
from training.fine_grained import load_cache, two_stage_scores  # noqa: E402
from training.metrics import i2t_recall, mean6_gain_interval, summarise, t2i_recall  # noqa: E402
from training.second_opinion import (  # noqa: E402
    Pooled,
    SecondOpinionHeads,
    SecondOpinionRun,
    pooled,
    train_heads,
    word_mean,
)
from training.second_opinion import mean6 as full_mean6  # noqa: E402


def pooled_features(split: Path, prior_split: Path, width: int = 384, text: str = "frozen") -> Pooled:
    """The split's pooled features as training/second_opinion.py makes them (ConvNet maps over the
    grid, our text tower's outputs over the words); with `text` 'frozen', the frozen MiniLM's outputs
    from the prior cache instead of our tower's."""
    features = pooled(SplitFeatures.load(split), "efficientnet-lite0", 2)
    if text == "fine-tuned":
        return features
    tokens = np.load(prior_split / "text_tokens.npy", mmap_mode="r")
    if tokens.shape[-1] != 2 * width:
        raise typer.BadParameter(f"{prior_split}: no frozen tower's tokens (benchmarks/text_prior.py cache)")
    frozen = word_mean(tokens[..., width:], np.load(split / "text_word_mask.npy"))
    return dataclasses.replace(features, text=frozen)


def scores(heads: SecondOpinionHeads, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The second opinion's caption x image scores."""
    img, txt = heads.vectors(image, text)
    return txt @ img.T


class Correction(torch.nn.Module):
    """The alternative that keeps one 256-d global vector: normalise(CLS + delta), delta from the frozen
    towers' features, zero at the start, trained with CLS on the training images."""

    def __init__(self, image_width: int, text_width: int, dim: int = 256) -> None:
        super().__init__()
        self.image = torch.nn.Sequential(torch.nn.LayerNorm(image_width), torch.nn.Linear(image_width, dim))
        self.text = torch.nn.Sequential(torch.nn.LayerNorm(text_width), torch.nn.Linear(text_width, dim))
        for layer in (self.image[1], self.text[1]):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(np.log(1 / 0.05))))

    def scores(self, text_cls, text, image_cls, image) -> torch.Tensor:
        t = F.normalize(text_cls + self.text(text), dim=-1)
        return t @ F.normalize(image_cls + self.image(image), dim=-1).T


def train_correction(train: Pooled, train_cls, val: Pooled, val_cls, epochs: int, seed: int = 0) -> list[dict]:
    """Mean6 on `val` (full ranking) after each epoch of the CLS correction."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    (img, txt, owner), (img_cls, txt_cls) = (train.image, train.text, train.caption_image), train_cls
    model = Correction(img.shape[1], txt.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    by_image = [np.flatnonzero(owner == i) for i in range(len(img))]
    history = []
    for epoch in range(epochs):
        order = rng.permutation(len(img))
        for s in range(0, len(img) - 255, 256):
            images = order[s : s + 256]
            captions = np.array([rng.choice(by_image[i]) for i in images])
            sim = model.scores(txt_cls[captions], txt[captions], img_cls[images], img[images])
            logits = model.logit_scale.exp().clamp(max=100) * sim
            target = torch.arange(len(images))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            sim = model.scores(val_cls[1], val.text, val_cls[0], val.image)
        history.append({"epoch": epoch + 1, "mean6": full_mean6(sim, val.caption_image)})
    return history


def cls_vectors(split: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The served CLS vectors the cache holds: (images, captions)."""
    feats = SplitFeatures.load(split)
    return tuple(torch.from_numpy(np.array(feats.array(n), dtype=np.float32)) for n in ("single_cls", "text_cls"))


def ranked(stage: dict, second: np.ndarray, weights: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(i2t, t2i) candidates reordered by a * CLS + b * CMLI + c * second opinion."""
    a, b, c = weights
    out = []
    for direction, sim in (("i2t", second.T), ("t2i", second)):
        cand = stage[direction]
        fused = a * cand.cls + b * cand.cmli + c * np.take_along_axis(sim, cand.candidates, 1)
        out.append(np.take_along_axis(cand.candidates, np.argsort(-fused, 1, kind="stable"), 1))
    return out[0], out[1]


def mean6(lists: tuple[np.ndarray, np.ndarray], owner: np.ndarray) -> float:
    return summarise(i2t_recall(lists[0], owner), t2i_recall(lists[1], owner))["mean6"]


def best_weights(stage: dict, second: np.ndarray, allowed) -> tuple[float, tuple[float, float, float]]:
    owner = stage["caption_image"]
    best = None
    for a in np.round(np.arange(0, 1.0001, 0.05), 2):
        for b in np.round(np.arange(0, 1.0001 - a, 0.05), 2):
            w = (float(a), float(b), round(1 - a - b, 2))
            if allowed(w):
                m = mean6(ranked(stage, second, w), owner)
                if best is None or m > best[0]:
                    best = (m, w)
    return best


@torch.no_grad()
def main(
    cache: Path = typer.Option(..., help="feature caches: train, val-a, val-b (with EfficientNet-Lite0's maps)"),
    prior_cache: Path = typer.Option(..., help="the same splits with the frozen MiniLM's tokens (text_prior.py cache)"),
    checkpoint: Path = typer.Option(..., help="the model whose fine-grained head gives CMLI"),
    epochs: int = typer.Option(30, help="training epochs of the second opinion (the best on half a is kept)"),
    candidates: int = typer.Option(20, help="K: CLS candidates reranked"),
    seed: int = typer.Option(0, help="the second opinion's initialisation and batches"),
    correction: bool = typer.Option(True, help="also train the CLS correction (half a only)"),
    text: str = typer.Option("frozen", help="the text side: 'frozen' MiniLM or our 'fine-tuned' tower"),
    out: Path = typer.Option(ROOT / "benchmarks" / "results" / "second_opinion.json"),
) -> None:
    torch.set_num_threads(2)
    if text not in ("frozen", "fine-tuned"):
        raise typer.BadParameter(f"--text must be 'frozen' or 'fine-tuned', not {text!r}")
    splits = {
        name: pooled_features(cache / name, prior_cache / name, text=text) for name in ("train", "val-a", "val-b")
    }
    with torch.enable_grad():
        run = SecondOpinionRun(epochs=epochs, seed=seed)
        second, history = train_heads(splits["train"], splits["val-a"], 256, run)
    model, _ = load_checkpoint(checkpoint)
    fg = model.cfg.fine_grained
    report: dict = {
        "machine": describe(),
        "checkpoint": str(checkpoint),
        "candidates": candidates,
        "seed": seed,
        "text": text,
        "history": history,
    }
    halves = {}
    for half in ("a", "b"):
        feats = SplitFeatures.load(cache / f"val-{half}")
        stage = two_stage_scores(
            model.fg_image, model.fg_text, feats, load_cache(feats, fg.vision_layers, fg.cnn), candidates
        )
        img, txt = splits[f"val-{half}"].image, splits[f"val-{half}"].text
        halves[half] = (stage, scores(second, txt, img).numpy())
    # weights chosen on half a, for each combination
    stage_a, second_a = halves["a"]
    choices = {
        "cls": (1.0, 0.0, 0.0),
        "cls+cmli": best_weights(stage_a, second_a, lambda w: w[2] == 0)[1],
        "cls+second": best_weights(stage_a, second_a, lambda w: w[1] == 0)[1],
        "cls+cmli+second": best_weights(stage_a, second_a, lambda w: True)[1],
    }
    report["weights_chosen_on_half_a"] = {
        k: dict(zip(("cls", "cmli", "second"), w, strict=True)) for k, w in choices.items()
    }
    for half, (stage, sec) in halves.items():
        owner = stage["caption_image"]
        lists = {k: ranked(stage, sec, w) for k, w in choices.items()}
        row = {"second_alone_full_ranking": full_mean6(torch.from_numpy(sec), owner)}
        row |= {k: mean6(v, owner) for k, v in lists.items()}
        for k in ("cls+cmli", "cls+second", "cls+cmli+second"):
            row[f"gain {k} over cls"] = mean6_gain_interval(lists["cls"], lists[k], owner)
        row["gain of cmli over cls+second"] = mean6_gain_interval(lists["cls+second"], lists["cls+cmli+second"], owner)
        report[f"half_{half}"] = row
    # the same ensemble over the whole collection: the two global vectors concatenated with weights
    # sqrt(1 - c) and sqrt(c), so one inner product is the fused score (c chosen on half a)
    cls = {half: cls_vectors(cache / f"val-{half}") for half in ("a", "b")}

    def whole(half: str, c: float) -> float:
        image_cls, text_cls = cls[half]
        split = splits[f"val-{half}"]
        img, txt, owner = split.image, split.text, split.caption_image
        return full_mean6((1 - c) * (text_cls @ image_cls.T) + c * scores(second, txt, img), owner)

    c = max(np.round(np.arange(0, 1.0001, 0.05), 2), key=lambda c: whole("a", float(c)))
    report["whole_collection"] = {"second_weight_chosen_on_half_a": float(c)} | {
        f"half_{h}": {"cls": whole(h, 0.0), "cls+second": whole(h, float(c))} for h in ("a", "b")
    }
    if correction:
        with torch.enable_grad():
            report["correction_of_cls_half_a"] = train_correction(
                splits["train"], cls_vectors(cache / "train"), splits["val-a"], cls["a"], epochs
            )
    out.write_text(json.dumps(report, indent=2))
    typer.echo(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    typer.run(main)
