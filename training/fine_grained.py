"""Train the fine-grained head (model/emkum.py FineGrainedHead) on cached frozen tower features.

Why a separate head on frozen features: the served patch vectors are 94% one shared direction and
their words point at the right collage cell barely above chance (docs/fine-grained.md), while the
image tower's own block outputs are local (a patch's nearest patches lie in its own cell 94% of the
time). So locality is there; what is missing is a projection in which words meet the patches that
show them. Training only that projection keeps the CLS path exactly as it was, and on cached features
it runs on two CPU cores in minutes.

Objectives (weights in FineGrainedTrainConfig):
- `filip`: FILIP's InfoNCE over CMLI scores (seed 004, eq. 3 and 4) between single images and
  their captions: the token vectors learn to rank (what the rerank needs);
- `cell`: on 2x2 and 3x3 collages, each tile's caption must score highest (CMLI restricted to a
  cell's patches) on its own cell: a multiple-instance form of pointing with the answer built in;
- `word`: each content word's softmax over the collage's patches must put its mass in its caption's
  cell (the `explain` heatmap is exactly this similarity map).
- `tile`: each collage patch's vector must match (cosine) its tile's own patch vectors seen alone at
  full resolution, average-pooled onto the cell's patches (stop-gradient on the tile side): the
  head learns to undo the mixing of neighbouring cells that a shrunken photo suffers in the tower,
  from the single-image vectors that `filip` trains on all the training images.
- `rerank`: the rerank's own task. Each query's first-stage candidates (top K by the served CLS
  vectors, on the training images) are ranked by the fused score the service uses, w * CLS +
  (1 - w) * CMLI, with CLS fixed: the cross-entropy of the true match teaches CMLI what CLS gets
  wrong, not what it already gets right (both directions, as Mean6 counts them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm

from model.cmli import cmli_i2t_candidates, cmli_pairs, cmli_t2i_candidates
from model.cnn import CNN_WIDTHS
from model.config import FineGrainedConfig
from model.emkum import Emkum, FineGrainedHead
from model.pretrained import load_efficientnet_lite
from runtime.cpu import has_native_bf16
from training.collage import cell_blocks, patch_cells
from training.feature_cache import SplitFeatures, cnn_array_names
from training.losses import cmli_contrastive_loss
from training.metrics import i2t_recall, rerank, summarise, t2i_recall


class FineGrainedTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: tuple[int, ...] = (10, 12)  # image-tower blocks the head reads (cached ones)
    hidden: int = 0  # MLP width inside the head (0: LayerNorm + Linear)
    context: int = 3  # kernel of the patch head's depthwise conv over the grid (model/emkum.py); 0: none
    attention: int = 0  # self-attention blocks over the patch head's vectors (model/emkum.py); 0: none
    # a frozen second tower the patch head reads beside the blocks (model/cnn.py; cached like them)
    cnn: str = "none"
    epochs: int = 5
    batch: int = 128  # single images per FILIP step
    collage_batch: int = 32  # collages per step
    lr: float = 2e-3
    weight_decay: float = 0.01
    filip: float = 1.0
    cell: float = 1.0
    word: float = 1.0
    word_temperature: float = 0.02
    # each word's vector + this x its caption's mean word vector (model/emkum.py FineGrainedHead), in
    # every term and in the evaluation. The shipped head was trained at 0 and given 1.0 afterwards
    # (epochs = 0 from the checkpoint; chosen on val half a, benchmarks/caption_context.py)
    caption_context: float = 0.0
    tile: float = 0.0  # the tile term (module docstring); off in the default recipe
    # FILIP batches made of groups of this many images that are each other's nearest by the served CLS
    # vectors: the in-batch negatives are then the first stage's own confusions, which is what a
    # rerank has to undo (1 = random batches, whose negatives CLS already tells apart)
    hard_group: int = 1  # 8 was tried: no better on val half a (docs/fine-grained.md)
    # NegCLIP-style: each image's caption must outscore the same caption with one word swapped
    # (training/swaps.py, made from the training captions), CMLI against CMLI (seed 004, eq. 4)
    swap: float = 1.0
    # the rerank's own task on the training images' CLS candidates (module docstring)
    rerank: float = 0.0
    rerank_candidates: int = 16  # K, the true match put in where CLS left it out
    rerank_queries: int = 24  # text and image queries per step
    rerank_weight: float = 0.7  # w of the fused score it trains for (the model card's)
    # 'checkpoint': continue from the checkpoint's own head (same layers and shape), e.g. to add a term
    init: Literal["random", "checkpoint"] = "random"
    seed: int = 0
    candidates: int = 20  # rerank depth the evaluation (and the exported model card) uses


class Heads(torch.nn.Module):
    """The two heads being trained, and the temperature of their contrastive terms."""

    def __init__(
        self,
        vision_widths: tuple[int, ...],
        text_width: int,
        dim: int,
        hidden: int,
        context: int = 0,
        attention: int = 0,
        caption_context: float = 0.0,
    ) -> None:
        super().__init__()
        self.image = FineGrainedHead(vision_widths, dim, hidden, context, attention)
        self.text = FineGrainedHead((text_width,), dim, hidden, caption_context=caption_context)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))


def hard_batches(cls: np.ndarray, batch: int, group: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of batches, each made of `batch // group` random seed images and, for each seed, its
    `group - 1` nearest images by CLS cosine not yet used this epoch. Every image appears once."""
    n = len(cls)
    if group <= 1:
        order = rng.permutation(n)
        return [order[s : s + batch] for s in range(0, n - batch + 1, batch)]
    x = torch.from_numpy(np.asarray(cls, dtype=np.float32))
    neighbours = torch.cat([(x[s : s + 1024] @ x.T).topk(4 * group, dim=1).indices for s in range(0, n, 1024)]).numpy()
    used = np.zeros(n, dtype=bool)
    groups: list[list[int]] = []
    for seed in rng.permutation(n):
        if used[seed]:
            continue
        members = [int(seed), *[int(j) for j in neighbours[seed] if not used[j] and j != seed][: group - 1]]
        used[members] = True
        groups.append(members)
    rng.shuffle(groups)
    flat = np.array([i for g in groups for i in g])
    return [flat[s : s + batch] for s in range(0, len(flat) - batch + 1, batch)]


def _group_by_image(owner: np.ndarray, n_images: int) -> list[list[int]]:
    """For each image, the rows (captions or swaps) that belong to it."""
    groups: list[list[int]] = [[] for _ in range(n_images)]
    for row, image in enumerate(owner):
        groups[int(image)].append(row)
    return groups


def _caption_rows(cache: dict, owners: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random caption row for each image in `owners`."""
    return np.array([rng.choice(cache["captions_by_image"][int(i)]) for i in owners])


def _texts(rows: np.ndarray, tokens: np.ndarray, word: np.ndarray, content: np.ndarray):
    """Token features and masks of the captions `rows`, cut to the longest caption among them."""
    order = np.sort(rows)  # memmap reads in file order, then back to the request order
    inverse = np.searchsorted(order, rows)
    n = int(word[order].sum(1).max()) + 2
    t = torch.from_numpy(np.asarray(tokens[order, :n], dtype=np.float32))[inverse]
    w = torch.from_numpy(word[order, :n])[inverse]
    c = torch.from_numpy(content[order, :n])[inverse]
    return t, w, c


def cell_scores(tokens: torch.Tensor, word: torch.Tensor, patches: torch.Tensor, cells: torch.Tensor, g: int):
    """CMLI (eq. 4) of each caption [C, T, M, d] over each cell of its collage's patches [C, N, d]:
    [C, T, g*g]; also the raw similarities [C, T, M, N]."""
    sim = torch.einsum("ctmd,cnd->ctmn", tokens, patches)
    per_cell = torch.stack([sim[..., cells == k].max(dim=-1).values for k in range(g * g)], dim=-1)  # [C, T, M, cells]
    scores = (per_cell * word[..., None]).sum(2) / word.sum(2, keepdim=True).clamp_min(1)
    return scores, sim


def collage_losses(
    heads: Heads, cache: dict, g: int, idx: np.ndarray, cfg: FineGrainedTrainConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `cell`, `word` and `tile` terms on the g x g collages `idx`, one random caption per tile."""
    patches_all = cache[f"collage{g}"]
    groups = cache[f"collage{g}_images"][idx]  # [C, g*g] image indices
    order = np.sort(idx)
    inverse = np.searchsorted(order, idx)
    patches = heads.image(*(_rows(a, order)[inverse] for a in patches_all))
    tile = tile_loss(heads, cache, g, idx, patches) if cfg.tile else torch.zeros(())
    rows = _caption_rows(cache, groups.reshape(-1), rng)
    tok, word, content = _texts(rows, cache["tokens"], cache["word"], cache["content"])
    tok = heads.text(tok, words=word).reshape(len(idx), g * g, tok.shape[1], -1)
    word = word.reshape(len(idx), g * g, -1)
    content = content.reshape(len(idx), g * g, -1)
    cells = torch.from_numpy(patch_cells(math.isqrt(patches.shape[1]), g))
    scores, sim = cell_scores(tok, word, patches, cells, g)
    scale = heads.logit_scale.exp().clamp(max=100.0)
    target = torch.arange(g * g).repeat(len(idx))
    cell_loss = F.cross_entropy(scale * scores.reshape(-1, g * g), target)
    # word MIL: log of the softmax mass inside the caption's own cell, for content words
    logp = F.log_softmax(sim / cfg.word_temperature, dim=-1)  # [C, T, M, N]
    own = cells[None, None, None, :] == torch.arange(g * g)[None, :, None, None]  # [1, T, 1, N]
    inside = torch.logsumexp(logp.masked_fill(~own, float("-inf")), dim=-1)  # [C, T, M]
    word_loss = -(inside * content).sum() / content.sum().clamp_min(1)
    return cell_loss, word_loss, tile


def tile_loss(heads: Heads, cache: dict, g: int, idx: np.ndarray, patches: torch.Tensor) -> torch.Tensor:
    """1 - cosine between each collage patch [C, N, d] and its tile's own patch vectors (the tile
    alone, at full resolution), average-pooled onto the cell's patches; the tile side is a target."""
    groups = cache[f"collage{g}_images"][idx].reshape(-1)  # [C * g*g], row-major cells
    order, inverse = np.unique(groups, return_inverse=True)
    with torch.no_grad():
        alone = heads.image(*(_rows(a, order) for a in cache["single"]))[torch.from_numpy(inverse)]
    grid = math.isqrt(patches.shape[1])
    alone = alone.reshape(len(idx), g * g, grid, grid, -1).permute(0, 1, 4, 2, 3)  # [C, cells, d, grid, grid]
    student = patches.reshape(len(idx), grid, grid, -1)
    losses = []
    for k, (rows, cols) in enumerate(cell_blocks(grid, g)):
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        target = F.normalize(F.adaptive_avg_pool2d(alone[:, k], shape).permute(0, 2, 3, 1), dim=-1)
        losses.append(1 - (F.normalize(student[:, rows, cols], dim=-1) * target).sum(-1).mean())
    return torch.stack(losses).mean()


def _rows(arrays: np.ndarray, rows) -> torch.Tensor:
    return torch.from_numpy(np.asarray(arrays[rows], dtype=np.float32))


def swap_scores(heads: Heads, cache: dict, chosen: np.ndarray, patches: torch.Tensor) -> tuple:
    """CMLI (eq. 4) of the swaps `chosen` (indices into the cached swaps): (true caption, swapped
    caption) scores against their image's patches [len(chosen), N, d]."""
    sw = cache["swap"]
    pos, pos_word, _ = _texts(sw["positive"][chosen], cache["tokens"], cache["word"], cache["content"])
    neg, neg_word, _ = _texts(chosen, sw["tokens"], sw["word"], sw["content"])
    s_pos = cmli_pairs(heads.text(pos, words=pos_word), pos_word, patches)[0]
    s_neg = cmli_pairs(heads.text(neg, words=neg_word), neg_word, patches)[0]
    return s_pos, s_neg


def swap_loss(heads: Heads, cache: dict, idx: np.ndarray, patches: torch.Tensor | None, rng) -> torch.Tensor:
    """Two-way cross-entropy, true caption against its one-word swap, for each image of the batch
    that has a swap (one drawn at random)."""
    by_image = cache["swap"]["by_image"]
    keep = [j for j, i in enumerate(idx) if by_image[int(i)]]
    if not keep:
        return torch.zeros(())
    chosen = np.array([rng.choice(by_image[int(idx[j])]) for j in keep])
    if patches is None:
        patches = heads.image(*(_rows(a, np.sort(idx)) for a in cache["single"]))
    s_pos, s_neg = swap_scores(heads, cache, chosen, patches[keep])
    scale = heads.logit_scale.exp().clamp(max=100.0)
    logits = scale * torch.stack([s_pos, s_neg], dim=1)
    return F.cross_entropy(logits, torch.zeros(len(keep), dtype=torch.long))


@dataclass
class FirstStage:
    """The training split's CLS candidates, best first, the true match always among them: captions
    -> images (`t2i`, [captions, K]) and images -> captions (`i2t`, [images, K]), with CLS scores."""

    t2i: np.ndarray
    t2i_cls: np.ndarray
    i2t: np.ndarray
    i2t_cls: np.ndarray
    caption_image: np.ndarray


@torch.no_grad()
def first_stage(feats: SplitFeatures, k: int) -> FirstStage:
    img = torch.from_numpy(np.array(feats.array("single_cls"), dtype=np.float32))
    txt = torch.from_numpy(np.array(feats.array("text_cls"), dtype=np.float32))
    owner = np.array(feats.array("caption_image"))
    sim = txt @ img.T
    t2i_s, t2i = (x.numpy().copy() for x in sim.topk(k, dim=1))
    i2t_s, i2t = (x.numpy().copy() for x in sim.T.topk(k, dim=1))
    for q in np.flatnonzero(~(t2i == owner[:, None]).any(1)):  # CLS missed it: last place is its
        t2i[q, -1], t2i_s[q, -1] = owner[q], float(sim[q, owner[q]])
    for i in np.flatnonzero(~(owner[i2t] == np.arange(len(img))[:, None]).any(1)):
        q = int(np.flatnonzero(owner == i)[0])
        i2t[i, -1], i2t_s[i, -1] = q, float(sim[q, i])
    return FirstStage(t2i, t2i_s, i2t, i2t_s, owner)


def rerank_loss(heads: Heads, cache: dict, stage: FirstStage, cfg: FineGrainedTrainConfig, rng) -> torch.Tensor:
    """Cross-entropy of the true match among each query's CLS candidates under the fused score, for
    `rerank_queries` random captions and as many random images (an image's matches: its captions)."""
    w, scale = cfg.rerank_weight, heads.logit_scale.exp().clamp(max=100.0)
    n = cfg.rerank_queries
    # text -> image
    q = np.sort(rng.choice(len(stage.t2i), size=n, replace=False))
    cand = stage.t2i[q]
    images, inverse = np.unique(cand, return_inverse=True)
    patches = heads.image(*(_rows(a, images) for a in cache["single"]))[torch.from_numpy(inverse.reshape(cand.shape))]
    tok, word, _ = _texts(q, cache["tokens"], cache["word"], cache["content"])
    cmli = cmli_t2i_candidates(heads.text(tok, words=word), word, patches)[0]
    logits = scale * (w * torch.from_numpy(stage.t2i_cls[q]) + (1 - w) * cmli)
    positive = torch.from_numpy(cand == stage.caption_image[q][:, None])
    # image -> text
    i = np.sort(rng.choice(len(stage.i2t), size=n, replace=False))
    cand_t = stage.i2t[i]
    image_patches = heads.image(*(_rows(a, i) for a in cache["single"]))
    tok, word, _ = _texts(cand_t.reshape(-1), cache["tokens"], cache["word"], cache["content"])
    tokens = heads.text(tok, words=word).reshape(*cand_t.shape, tok.shape[1], -1)
    cmli_i = cmli_i2t_candidates(image_patches, tokens, word.reshape(*cand_t.shape, -1))
    logits = torch.cat([logits, scale * (w * torch.from_numpy(stage.i2t_cls[i]) + (1 - w) * cmli_i)])
    positive = torch.cat([positive, torch.from_numpy(stage.caption_image[cand_t] == i[:, None])])
    matched = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=1)
    return (torch.logsumexp(logits, dim=1) - matched).mean()


def _patch_arrays(prefix: str, layers: tuple[int, ...], cnn: str) -> list[str]:
    """The cached arrays the patch head reads, in its input order: the blocks, then the second tower's maps."""
    maps = cnn_array_names(cnn, prefix, len(CNN_WIDTHS[cnn])) if cnn != "none" else []
    return [f"{prefix}_block{layer}" for layer in layers] + maps


def load_cache(feats: SplitFeatures, layers: tuple[int, ...], cnn: str = "none") -> dict:
    """The arrays a run reads, opened once (memmaps; the patch features stay on disk); patch features
    are lists, one array per block in `layers` and one per map of the second tower `cnn`."""
    out = {
        "single": [feats.array(name) for name in _patch_arrays("single", layers, cnn)],
        "tokens": feats.array("text_tokens"),
        "word": np.load(feats.folder / "text_word_mask.npy"),
        "content": np.load(feats.folder / "text_content_mask.npy"),
        "captions_by_image": _group_by_image(np.load(feats.folder / "caption_image.npy"), feats.meta["images"]),
    }
    if (feats.folder / "swap_tokens.npy").is_file():
        out["swap"] = {
            "tokens": feats.array("swap_tokens"),
            "word": np.load(feats.folder / "swap_word_mask.npy"),
            "content": np.load(feats.folder / "swap_content_mask.npy"),
            "image": np.load(feats.folder / "swap_image.npy"),
            "positive": np.load(feats.folder / "swap_positive.npy"),
            "kind": np.load(feats.folder / "swap_kind.npy"),
        }
        out["swap"]["by_image"] = _group_by_image(out["swap"]["image"], feats.meta["images"])
    for g in (2, 3):
        names = _patch_arrays(f"collage{g}", layers, cnn)
        if all((feats.folder / f"{name}.npy").is_file() for name in names):
            out[f"collage{g}"] = [feats.array(name) for name in names]
            out[f"collage{g}_images"] = np.load(feats.folder / f"collage{g}_images.npy")
    return out


def train_heads(
    train: SplitFeatures,
    val: SplitFeatures | None,
    cfg: FineGrainedTrainConfig,
    log: Path | None = None,
    start: Emkum | None = None,
):
    """Returns (heads, history). One epoch = every training image once in FILIP steps, with one
    collage batch (2x2 and 3x3 alternating) per step. `start`: a model whose own fine-grained head
    (same shape) the heads continue from, instead of a fresh one."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    cache = load_cache(train, cfg.layers, cfg.cnn)
    single = cache["single"]
    n_images = len(single[0])
    heads = Heads(
        tuple(a.shape[-1] for a in single),
        cache["tokens"].shape[-1],
        train.meta["dim"],
        cfg.hidden,
        cfg.context,
        cfg.attention,
        cfg.caption_context,
    )
    if start is not None:
        if start.fg_image is None:
            raise ValueError("train.init = 'checkpoint' needs a checkpoint that has a fine-grained head")
        # a head may gain attention blocks on the way (they start fresh); nothing else may differ
        missing, unexpected = heads.image.load_state_dict(start.fg_image.state_dict(), strict=False)
        if unexpected or any(not k.startswith("blocks.") for k in missing):
            raise ValueError(f"the checkpoint's head does not fit: missing {missing}, unexpected {unexpected}")
        heads.text.load_state_dict(start.fg_text.state_dict())
    decay = [p for n, p in heads.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in heads.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=cfg.lr
    )
    steps_per_epoch = n_images // cfg.batch
    train_cls = train.array("single_cls")
    total = max(1, steps_per_epoch * cfg.epochs)  # epochs = 0: only the starting head's evaluation
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, total // 10)) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    history = []
    started = time.time()
    collage_sets = [g for g in (2, 3) if f"collage{g}" in cache]
    if start is not None and val is not None:  # where the continued head starts from
        history.append({"epoch": 0, "seconds": 0.0, **evaluate_heads(heads, val, cfg)})
    stage = first_stage(train, cfg.rerank_candidates) if cfg.rerank else None
    for epoch in range(cfg.epochs):
        heads.train()
        batches = hard_batches(train_cls, cfg.batch, cfg.hard_group, rng)[:steps_per_epoch]
        bar = tqdm(range(len(batches)), desc=f"fine-grained epoch {epoch + 1}/{cfg.epochs}", unit="step")
        for step in bar:
            idx = np.sort(batches[step])
            loss = torch.zeros(())
            parts = {}
            if cfg.filip:
                patches = heads.image(*(_rows(a, idx) for a in single))
                tok, word, _ = _texts(_caption_rows(cache, idx, rng), cache["tokens"], cache["word"], cache["content"])
                tokens = heads.text(tok, words=word)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=has_native_bf16()):
                    parts["filip"] = cmli_contrastive_loss(patches, tokens, word, heads.logit_scale).float()
                loss = loss + cfg.filip * parts["filip"]
            if cfg.swap and "swap" in cache:
                parts["swap"] = swap_loss(heads, cache, idx, patches if cfg.filip else None, rng)
                loss = loss + cfg.swap * parts["swap"]
            if stage is not None:
                parts["rerank"] = rerank_loss(heads, cache, stage, cfg, rng)
                loss = loss + cfg.rerank * parts["rerank"]
            if collage_sets and (cfg.cell or cfg.word):
                g = collage_sets[step % len(collage_sets)]
                n_col = len(cache[f"collage{g}_images"])
                cidx = rng.choice(n_col, size=min(cfg.collage_batch, n_col), replace=False)
                parts["cell"], parts["word"], tile = collage_losses(heads, cache, g, cidx, cfg, rng)
                loss = loss + cfg.cell * parts["cell"] + cfg.word * parts["word"]
                if cfg.tile:
                    parts["tile"] = tile
                    loss = loss + cfg.tile * tile
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.set_postfix({k: f"{v.item():.3f}" for k, v in parts.items()})
        row = {"epoch": epoch + 1, "seconds": round(time.time() - started, 1)}
        if val is not None:
            row.update(evaluate_heads(heads, val, cfg))
        history.append(row)
        tqdm.write(json.dumps(row))
        if log is not None:
            log.write_text(json.dumps({"config": cfg.model_dump(), "history": history}, indent=2))
    return heads, history


@dataclass
class Candidates:
    """For each query: its first-stage candidates (best CLS first), their CLS and CMLI scores: [Q, K]."""

    candidates: np.ndarray
    cls: np.ndarray
    cmli: np.ndarray


@torch.no_grad()
def head_patches(image_head, cache: dict, chunk: int = 256) -> torch.Tensor:
    """The patch vectors [images, N, d] the head gives every cached single image, in chunks."""
    n = len(cache["single"][0])
    return torch.cat(
        [image_head(*(_rows(a, slice(s, s + chunk)) for a in cache["single"])) for s in range(0, n, chunk)]
    )


@torch.no_grad()
def two_stage_scores(
    image_head,
    text_head,
    feats: SplitFeatures,
    cache: dict,
    k: int,
    global_vectors: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict:
    """Both directions of the two-stage search on cached features: CLS top `k` (the served vectors,
    or `global_vectors`, (images, captions), in their place), then CMLI from the heads (eq. 4 for text
    queries, eq. 3 for image queries). The in-loop evaluation and benchmarks/fusion_sweep.py both read
    these; the store does the same at serving time."""
    if global_vectors is None:
        img_cls = torch.from_numpy(np.array(feats.array("single_cls")))
        txt_cls = torch.from_numpy(np.array(feats.array("text_cls")))
    else:
        img_cls, txt_cls = global_vectors
    patches = head_patches(image_head, cache)
    tok, word, _ = _texts(np.arange(len(txt_cls)), cache["tokens"], cache["word"], cache["content"])
    tokens = text_head(tok, words=word)
    sim = txt_cls @ img_cls.T
    t2i_s, t2i_c = sim.topk(k, dim=1)
    i2t_s, i2t_c = sim.T.topk(k, dim=1)
    t2i_m = torch.cat(
        [
            cmli_t2i_candidates(tokens[s : s + 64], word[s : s + 64], patches[t2i_c[s : s + 64]])[0]
            for s in range(0, len(tokens), 64)
        ]
    )
    i2t_m = torch.cat(
        [
            cmli_i2t_candidates(patches[s : s + 64], tokens[i2t_c[s : s + 64]], word[i2t_c[s : s + 64]])
            for s in range(0, len(patches), 64)
        ]
    )
    return {
        "t2i": Candidates(t2i_c.numpy(), t2i_s.numpy(), t2i_m.numpy()),
        "i2t": Candidates(i2t_c.numpy(), i2t_s.numpy(), i2t_m.numpy()),
        "caption_image": np.array(feats.array("caption_image")),
        "img_cls": img_cls,
        "txt_cls": txt_cls,
        "patches": patches,
        "tokens": tokens,
        "word": word,
    }


@torch.no_grad()
def evaluate_heads(heads: Heads, feats: SplitFeatures, cfg: FineGrainedTrainConfig) -> dict:
    """Rerank Mean6 (CLS candidates from the served vectors, CMLI from the heads, best fusion weight on
    this split) and collage pointing, all on cached features: the quick loop for choosing a recipe.
    The numbers to report come from `emkum eval` through the exported graphs."""
    from model.pretrained import minilm_dir
    from runtime.tokenizer import TextTokenizer
    from training.pointing import PointingTally

    tokenizer = TextTokenizer(minilm_dir() / "tokenizer.json")
    heads.eval()
    cache = load_cache(feats, cfg.layers, cfg.cnn)
    stage = two_stage_scores(heads.image, heads.text, feats, cache, cfg.candidates)
    img_cls, txt_cls, patches, tokens, word = (stage[k] for k in ("img_cls", "txt_cls", "patches", "tokens", "word"))
    caption_image = stage["caption_image"]
    t2i, i2t = stage["t2i"], stage["i2t"]
    cls = summarise(i2t_recall(i2t.candidates, caption_image), t2i_recall(t2i.candidates, caption_image))["mean6"]
    fused = {}
    for w in np.round(np.linspace(0, 1, 11), 2):
        fused[float(w)] = summarise(
            i2t_recall(rerank(i2t.candidates, i2t.cls, i2t.cmli, w), caption_image),
            t2i_recall(rerank(t2i.candidates, t2i.cls, t2i.cmli, w), caption_image),
        )["mean6"]
    best_w = max(fused, key=fused.get)
    out = {"cls_mean6": cls, "rerank_mean6": fused[best_w], "cls_weight": best_w, "cmli_only_mean6": fused[0.0]}
    if "swap" in cache:
        sw = cache["swap"]
        chosen = np.arange(len(sw["image"]))
        s_pos, s_neg = swap_scores(heads, cache, chosen, patches[sw["image"]])
        c_pos = (img_cls[sw["image"]] * txt_cls[sw["positive"]]).sum(-1)
        c_neg = (img_cls[sw["image"]] * torch.from_numpy(np.array(feats.array("swap_cls")))).sum(-1)
        out["choice_cls"] = round(100 * float((c_pos > c_neg).float().mean()), 2)
        out["choice_cmli"] = round(100 * float((s_pos > s_neg).float().mean()), 2)
        w = best_w
        out["choice_fused"] = round(
            100 * float((w * c_pos + (1 - w) * s_pos > w * c_neg + (1 - w) * s_neg).float().mean()), 2
        )
    for g in (2, 3):
        if f"collage{g}" not in cache:
            continue
        tally = PointingTally()
        groups = cache[f"collage{g}_images"]
        cells = patch_cells(math.isqrt(patches.shape[1]), g)
        first = {int(i): c for c, i in reversed(list(enumerate(caption_image)))}  # each image's first caption
        texts = feats.meta["captions_text"]
        for ci in range(len(groups)):
            p = heads.image(*(_rows(a, ci) for a in cache[f"collage{g}"]))
            rows_t = [first[int(image)] for image in groups[ci]]
            batch = tokenizer([texts[r] for r in rows_t])
            for t, r in enumerate(rows_t):
                n = min(len(batch.token_ids[t]), tokens.shape[1])
                s = (tokens[r, :n] @ p.T).numpy()
                tally.add(s, batch.words[t][:n], word[r, :n].numpy(), cells, t)
        summary = tally.summary()
        out[f"pointing{g}"] = summary["word_pointing"]
        out[f"cell{g}"] = summary["caption_cell"]
    return out


def heads_into_model(model: Emkum, heads: Heads, cfg: FineGrainedTrainConfig) -> Emkum:
    """A copy of `model` configured with the fine-grained head and carrying the trained weights."""
    import copy

    before = model.cfg.fine_grained
    # a second opinion reads the ConvNet's maps and the text tower, not the head: kept with its ConvNet
    second = before.second_opinion if before is not None and before.cnn == cfg.cnn else 0.0
    out_cfg = copy.deepcopy(model.cfg)
    out_cfg.fine_grained = FineGrainedConfig(
        vision_layers=tuple(cfg.layers),
        hidden=cfg.hidden,
        context=cfg.context,
        attention=cfg.attention,
        caption_context=cfg.caption_context,
        cnn=cfg.cnn,
        second_opinion=second,
    )
    new = Emkum(out_cfg)
    # everything but the head (and its second tower) from `model`, whose own head may differ in shape
    drop = ("fg_image.", "fg_text.", "cnn.") + (() if second else ("second_",))
    base = {k: v for k, v in model.state_dict().items() if not k.startswith(drop)}
    missing, unexpected = new.load_state_dict(base, strict=False)
    assert not unexpected and all(k.startswith(("fg_image.", "fg_text.", "cnn.")) for k in missing), missing
    if new.cnn is not None:  # frozen: the package's weights, as the cache read them
        load_efficientnet_lite(new.cnn.net, new.cnn.variant)
    new.fg_image.load_state_dict(heads.image.state_dict())
    new.fg_text.load_state_dict(heads.text.state_dict())
    return new.eval()


TRAIN_DATA = "karpathy:../shared/data/flickr8k/dataset_flickr8k.json:../shared/data/flickr8k/images-train-*.tar:train"
VAL_DATA = "karpathy:../shared/data/flickr8k/dataset_flickr8k.json:../shared/data/flickr8k/images-val-*.tar:val"


class FineGrainedRun(BaseModel):
    """`emkum train-fine-grained`: which model, which data, where the cache and the result go."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str = "model/weights/emkum-flickr8k.partial.safetensors"
    out: str = "runs/fine-grained/model.safetensors"
    train_data: str = TRAIN_DATA
    val_data: str = VAL_DATA
    val_half: str = "a"  # choices are made on this half; `emkum eval --half b` reports on the other
    cache_dir: str = "runs/fine-grained/cache"
    layers: tuple[int, ...] = (8, 10, 12)  # blocks cached (the head reads `train.layers`)
    train_collages: dict[int, int] = {2: 2, 3: 2}  # cells per side: random groupings of all images
    train: FineGrainedTrainConfig = FineGrainedTrainConfig()


def cached_splits(model: Emkum, cfg: FineGrainedRun, cnn: str) -> dict[str, SplitFeatures]:
    """The training split's and the val half's feature caches under `cfg.cache_dir`, made once per
    checkpoint and data; a cache made without the ConvNet `cnn` gains its maps."""
    from model.pretrained import minilm_dir
    from runtime.tokenizer import TextTokenizer
    from training.data import read_spec, select_half
    from training.feature_cache import cache_cnn, cache_split

    tokenizer = TextTokenizer(minilm_dir() / "tokenizer.json", model.cfg.text.max_length)
    splits = {}
    for name, spec, half, collages in (
        ("train", cfg.train_data, None, cfg.train_collages),
        (f"val-{cfg.val_half}", cfg.val_data, cfg.val_half, {2: 1, 3: 1}),
    ):
        folder = Path(cfg.cache_dir) / name
        if not (folder / "meta.json").is_file():
            cache_split(model, select_half(read_spec(spec), half), tokenizer, folder, cfg.layers, collages)
        feats = SplitFeatures.load(folder)
        if cnn != "none" and not all((folder / f"{n}.npy").is_file() for n in _patch_arrays("single", (), cnn)):
            cache_cnn(feats, select_half(read_spec(spec), half), cnn, model.cfg.vision)
        splits[name] = feats
    return splits


def run(cfg: FineGrainedRun) -> dict:
    """Cache the towers' features (once per checkpoint and data), train the heads with the val half's
    evaluation after each epoch, and write a checkpoint of the model with the head. The rerank weight
    and depth recorded for the model card are the ones chosen on the val half."""
    from safetensors import safe_open

    from model.checkpoint import load_checkpoint, save_checkpoint

    model, header = load_checkpoint(Path(cfg.checkpoint))
    splits = cached_splits(model, cfg, cfg.train.cnn)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    heads, history = train_heads(
        splits["train"],
        splits[f"val-{cfg.val_half}"],
        cfg.train,
        out.with_suffix(".log.json"),
        start=model if cfg.train.init == "checkpoint" else None,
    )
    final = history[-1]
    merged = heads_into_model(model, heads, cfg.train)
    with safe_open(cfg.checkpoint, "pt") as f:
        base_names = set(f.keys())
    fg_names = {k for k in merged.state_dict() if k.startswith(("fg_image.", "fg_text."))}
    extra = dict(header["extra"])
    extra["val"] = {  # the towers' CLS numbers still hold; the old vectors' rerank numbers do not
        **{k: v for k, v in extra.get("val", {}).items() if k not in ("rerank", "cmli_only")},
        "cls_weight": final["cls_weight"],
        "candidates": cfg.train.candidates,
        "chosen_on": f"val half {cfg.val_half}",
    }
    extra["fine_grained"] = {"train": cfg.train.model_dump(), f"val_{cfg.val_half}": final}
    if cfg.train.init == "checkpoint" and "fine_grained" in header["extra"]:  # how the head it continued was made
        extra["fine_grained"]["continued_from"] = header["extra"]["fine_grained"]
    init = header["init"]
    if cfg.train.cnn != "none":  # the frozen second tower is rebuilt from its package, never shipped
        init = dataclasses.replace(init, cnn=cfg.train.cnn)
    save_checkpoint(
        out,
        merged,
        init,
        header["seed"],
        extra=extra,
        only=(base_names | fg_names) if header["partial"] else None,
        dtype=torch.float16 if header["partial"] else None,
    )
    return {"out": str(out), "history": history}
