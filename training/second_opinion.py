"""The second opinion (model/config.py `FineGrainedConfig.second_opinion`): a global vector from
evidence CLS does not have, fused into the served CLS vector (issue #14, docs/fine-grained.md).

Image side: the frozen ConvNet's maps (the ones the patch head reads) mean-pooled; text side: the
text tower's outputs mean-pooled over the words; one LayerNorm + Linear each, CLIP's symmetric
InfoNCE on the cached training features. Why it is trained *without* CLS: CLS is nearly perfect on
the training images its towers were fine-tuned on, so a head trained with it there learns to trust
it (a correction of CLS trained that way fell to Mean6 53-64 on val half a, from CLS's 71.0;
benchmarks/second_opinion.py). The epoch, the fusion weight w and the CMLI rerank weight are chosen
on one val half from cached features; `emkum eval` on the other half reports through the graphs.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from model.emkum import Emkum, second_opinion_head
from training.feature_cache import SplitFeatures, cnn_array_names
from training.fine_grained import TRAIN_DATA, VAL_DATA, FineGrainedRun, cached_splits, load_cache, two_stage_scores
from training.metrics import i2t_recall, rerank, summarise, t2i_recall

WEIGHTS = np.round(np.arange(0.05, 0.96, 0.05), 2)  # the fusion weights tried for w and for the rerank


class SecondOpinionRun(BaseModel):
    """`emkum train-second-opinion`: the model (with a fine-grained head that reads a ConvNet), the
    data and the cache (shared with `emkum train-fine-grained`), the training and where it goes."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str = "model/weights/emkum-flickr8k.partial.safetensors"
    out: str = "runs/second-opinion/model.safetensors"
    train_data: str = TRAIN_DATA
    val_data: str = VAL_DATA
    val_half: str = "a"  # the epoch and both weights are chosen on this half
    cache_dir: str = "runs/fine-grained/cache"
    epochs: int = 30  # the epoch with the best Mean6 of the second opinion alone on the val half is kept
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    seed: int = 0


class SecondOpinionHeads(torch.nn.Module):
    """The model's two heads (model/emkum.py `second_image` / `second_text`) and a temperature."""

    def __init__(self, image_width: int, text_width: int, dim: int) -> None:
        super().__init__()
        self.image = second_opinion_head(image_width, dim)
        self.text = second_opinion_head(text_width, dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def vectors(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image(image), dim=-1), F.normalize(self.text(text), dim=-1)


@dataclasses.dataclass
class Pooled:
    """One split's pooled features: ConvNet maps [images, sum of widths], words [captions, width]."""

    image: torch.Tensor
    text: torch.Tensor
    caption_image: np.ndarray


def pooled(feats: SplitFeatures, cnn: str, maps: int, chunk: int = 500) -> Pooled:
    """As the model pools them (model/emkum.py): each cached map averaged over the patch grid, the
    cached text-tower outputs averaged over the word mask."""
    parts = []
    for name in cnn_array_names(cnn, "single", maps):
        a = feats.array(name)
        parts.append(
            np.concatenate([np.asarray(a[s : s + chunk], np.float32).mean(1) for s in range(0, len(a), chunk)])
        )
    text = word_mean(feats.array("text_tokens"), np.load(feats.folder / "text_word_mask.npy"), 4 * chunk)
    owner = np.load(feats.folder / "caption_image.npy")
    return Pooled(torch.from_numpy(np.concatenate(parts, 1)), text, owner)


def word_mean(tokens: np.ndarray, word: np.ndarray, chunk: int = 2000) -> torch.Tensor:
    """Token features [captions, L, width] (a memmap, read in chunks) averaged over the word mask."""
    out = []
    for s in range(0, len(tokens), chunk):
        t, w = np.asarray(tokens[s : s + chunk], np.float32), word[s : s + chunk, :, None]
        out.append((t * w).sum(1) / w.sum(1).clip(1))
    return torch.from_numpy(np.concatenate(out))


def mean6(sim: torch.Tensor, caption_image: np.ndarray) -> float:
    """Mean6 of a full caption x image score matrix."""
    t2i, i2t = sim.topk(10, dim=1).indices.numpy(), sim.T.topk(10, dim=1).indices.numpy()
    return summarise(i2t_recall(i2t, caption_image), t2i_recall(t2i, caption_image))["mean6"]


def train_heads(train: Pooled, val: Pooled, dim: int, cfg: SecondOpinionRun) -> tuple[SecondOpinionHeads, list]:
    """Batches of `cfg.batch` images with one random caption each; returns the heads of the epoch
    whose second opinion alone ranks `val` best, and every epoch's figures."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    heads = SecondOpinionHeads(train.image.shape[1], train.text.shape[1], dim)
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    captions_of = [np.flatnonzero(train.caption_image == i) for i in range(len(train.image))]
    history, best = [], None
    for epoch in tqdm(range(cfg.epochs), desc="second opinion", unit="epoch"):
        heads.train()
        order = rng.permutation(len(train.image))
        for s in range(0, len(order) - cfg.batch + 1, cfg.batch):
            images = order[s : s + cfg.batch]
            captions = np.array([rng.choice(captions_of[i]) for i in images])
            img, txt = heads.vectors(train.image[images], train.text[captions])
            logits = heads.logit_scale.exp().clamp(max=100.0) * txt @ img.T
            target = torch.arange(len(images))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
        heads.eval()
        with torch.no_grad():
            img, txt = heads.vectors(val.image, val.text)
            history.append(
                {"epoch": epoch + 1, "loss": round(float(loss), 4), "mean6": mean6(txt @ img.T, val.caption_image)}
            )
        if best is None or history[-1]["mean6"] > best[0]:
            best = (history[-1]["mean6"], {k: v.clone() for k, v in heads.state_dict().items()})
    heads.load_state_dict(best[1])
    return heads.eval(), history


def joined(cls: torch.Tensor, second: torch.Tensor, w: float) -> torch.Tensor:
    """The served global vector (model/emkum.py `_with_second_opinion`) from the two unit vectors."""
    return torch.cat([math.sqrt(1 - w) * cls, math.sqrt(w) * second], dim=-1)


def second_weight(cls: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor], owner):
    """The weight w of the second opinion in the served global vector with the best Mean6 of
    (1 - w) CLS + w second over the whole split, and every weight's Mean6; (images, captions) pairs."""
    cls_sim, second_sim = cls[1] @ cls[0].T, second[1] @ second[0].T
    fused = {float(w): mean6((1 - w) * cls_sim + w * second_sim, owner) for w in WEIGHTS}
    return max(fused, key=fused.get), fused


@torch.no_grad()
def choose_weights(model: Emkum, heads: SecondOpinionHeads, feats: SplitFeatures, val: Pooled, k: int) -> dict:
    """On the val half: w, the second opinion's weight in the served global vector (best Mean6 of the
    fused global alone over the whole half), then the rerank's weight of that global score against
    CMLI over its top `k` (what `model.json` `rerank.cls_weight` holds)."""
    img_cls = torch.from_numpy(np.array(feats.array("single_cls"), dtype=np.float32))
    txt_cls = torch.from_numpy(np.array(feats.array("text_cls"), dtype=np.float32))
    if img_cls.shape[1] != model.cfg.proj_dim:
        raise ValueError(f"{feats.folder}: its CLS vectors hold a second opinion: use a cache made without one")
    img, txt = heads.vectors(val.image, val.text)
    owner = val.caption_image
    w, fused = second_weight((img_cls, txt_cls), (img, txt), owner)
    fg = model.cfg.fine_grained
    stage = two_stage_scores(
        model.fg_image, model.fg_text, feats, load_cache(feats, fg.vision_layers, fg.cnn), k,
        global_vectors=(joined(img_cls, img, w), joined(txt_cls, txt, w)),
    )  # fmt: skip
    t2i, i2t = stage["t2i"], stage["i2t"]
    reranked = {
        float(c): summarise(
            i2t_recall(rerank(i2t.candidates, i2t.cls, i2t.cmli, c), owner),
            t2i_recall(rerank(t2i.candidates, t2i.cls, t2i.cmli, c), owner),
        )["mean6"]
        for c in [*WEIGHTS, 1.0]
    }
    cls_weight = max(reranked, key=reranked.get)
    return {
        "second_opinion": w,
        "cls_weight": cls_weight,
        "candidates": k,
        "cls_only_mean6": mean6(txt_cls @ img_cls.T, owner),
        "global_mean6": fused[w],
        "rerank_mean6": reranked[cls_weight],
        "global_mean6_by_weight": fused,
    }


def run(cfg: SecondOpinionRun) -> dict:
    """Train the heads on the cached training features, choose the weights on the val half, and write
    a checkpoint of the model with `second_opinion` set and the heads' tensors."""
    from safetensors import safe_open

    from model.checkpoint import load_checkpoint, save_checkpoint

    model, header = load_checkpoint(Path(cfg.checkpoint))
    fg = model.cfg.fine_grained
    if fg is None or fg.cnn == "none":
        raise ValueError(
            f"{cfg.checkpoint}: the second opinion reads the fine-grained head's ConvNet; this model has none"
        )
    if fg.second_opinion:  # trained afresh: the features are cached, and CLS chosen, without it
        plain = Emkum(dataclasses.replace(model.cfg, fine_grained=dataclasses.replace(fg, second_opinion=0.0)))
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("second_")})
        model, fg = plain.eval(), plain.cfg.fine_grained
    run_cfg = FineGrainedRun(
        checkpoint=cfg.checkpoint, train_data=cfg.train_data, val_data=cfg.val_data, val_half=cfg.val_half,
        cache_dir=cfg.cache_dir, layers=fg.vision_layers,
    )  # fmt: skip
    splits = cached_splits(model, run_cfg, fg.cnn)
    feats = splits[f"val-{cfg.val_half}"]
    maps = len(model.cnn.widths)
    train, val = pooled(splits["train"], fg.cnn, maps), pooled(feats, fg.cnn, maps)
    heads, history = train_heads(train, val, model.cfg.proj_dim, cfg)
    chosen = choose_weights(model, heads, feats, val, int(header["extra"].get("val", {}).get("candidates", 20)))
    out_cfg = dataclasses.replace(
        model.cfg, fine_grained=dataclasses.replace(fg, second_opinion=chosen["second_opinion"])
    )
    new = Emkum(out_cfg)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("second_") for k in missing), missing
    new.second_image.load_state_dict(heads.image.state_dict())
    new.second_text.load_state_dict(heads.text.state_dict())
    extra = dict(header["extra"])
    extra["val"] = {**extra.get("val", {}), "cls_weight": chosen["cls_weight"], "candidates": chosen["candidates"]}
    extra["second_opinion"] = {"train": cfg.model_dump(), f"val_{cfg.val_half}": chosen, "history": history}
    with safe_open(cfg.checkpoint, "pt") as f:
        names = set(f.keys()) | {k for k in new.state_dict() if k.startswith("second_")}
    out = Path(cfg.out)
    save_checkpoint(
        out, new, header["init"], header["seed"], extra=extra,
        only=names if header["partial"] else None, dtype=torch.float16 if header["partial"] else None,
    )  # fmt: skip
    return {"out": str(out), **chosen, "best_epoch": max(history, key=lambda h: h["mean6"])["epoch"]}
