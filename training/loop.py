"""The training loop: AdamW, cosine schedule with warm-up, bf16 autocast on GPU, gradient clipping,
epoch checkpoints with exact resume, DDP under torchrun, per-step metrics to a JSONL file."""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.checkpoint import InitRecipe, build_model, save_checkpoint
from model.config import load_config
from model.emkum import Emkum
from model.pretrained import minilm_dir
from runtime.tokenizer import TextTokenizer
from training.augment import normalize, random_resized_crop_flip
from training.config import TrainConfig
from training.data import load_images, read_spec
from training.evaluate import embed_split, evaluate_embeddings
from training.losses import ContrastiveLoss, cmli_contrastive_loss, kd_loss, target_cmli_loss
from training.teacher import Teacher, build_teacher


@dataclass
class SplitTensors:
    images: np.ndarray  # uint8 [I, S, S, 3]
    ids: np.ndarray  # int64 [T, L]
    mask: np.ndarray  # int64 [T, L]
    caption_image: np.ndarray  # int64 [T]: which image each caption describes
    image_captions: list[list[int]]


def load_images_cached(pairs: list, size: int, desc: str, cache_dir: str | None) -> np.ndarray:
    """Decoded images are cached as .npy keyed by the image list, so ablation runs decode once."""
    if not cache_dir:
        return load_images(pairs, size, desc)
    import hashlib

    key = hashlib.sha1(("|".join(p.key for p in pairs) + f"@{size}").encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"images-{key}.npy"
    if path.is_file():
        return np.load(path)
    images = load_images(pairs, size, desc)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path.with_suffix(".tmp.npy"), images)
    os.replace(path.with_suffix(".tmp.npy"), path)
    return images


def prepare_split(
    spec: str, tokenizer: TextTokenizer, size: int, limit: int | None, desc: str, cache_dir: str | None = None
) -> SplitTensors:
    pairs = read_spec(spec)[:limit]
    images = load_images_cached(pairs, size, desc, cache_dir)
    texts, owner, per_image = [], [], []
    for i, pair in enumerate(pairs):
        per_image.append(list(range(len(texts), len(texts) + len(pair.captions))))
        texts.extend(pair.captions)
        owner.extend([i] * len(pair.captions))
    tokens = tokenizer(texts, pad_to=tokenizer.max_length)
    return SplitTensors(images, tokens.ids, tokens.mask, np.array(owner), per_image)


def apply_freeze(model: Emkum, cfg: TrainConfig) -> None:
    f = cfg.freeze
    vision_n = len(model.vision.blocks) if f.vision_blocks < 0 else f.vision_blocks
    text_n = len(model.text.blocks) if f.text_blocks < 0 else f.text_blocks
    if vision_n:
        for p in (model.vision.patch_embed.parameters(), [model.vision.cls_token, model.vision.pos_embed]):
            for t in p:
                t.requires_grad_(False)
        for block in model.vision.blocks[:vision_n]:
            block.requires_grad_(False)
        if f.vision_blocks < 0:
            model.vision.norm.requires_grad_(False)
    if f.text_embeddings or text_n:
        model.text.token_embed.requires_grad_(False)
        model.text.pos_embed.requires_grad_(False)
        model.text.embed_norm.requires_grad_(False)
    for block in model.text.blocks[:text_n]:
        block.requires_grad_(False)


def param_groups(model: Emkum, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, embeddings, scales and tokens (1-D or embedding tables)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "embed" in name or "token" in name or "logit_scale" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def teacher_targets(teacher: Teacher, images: np.ndarray, device: str, batch: int = 256) -> tuple:
    """Teacher outputs for every training image, computed once on the un-augmented image."""
    glob, patch = [], []
    for s in tqdm(range(0, len(images), batch), desc="teacher", leave=False):
        px = torch.from_numpy(images[s : s + batch]).to(device).permute(0, 3, 1, 2).float() / 255
        g, p = teacher(px)
        glob.append(g.half())
        patch.append(p.half())
    return torch.cat(glob), torch.cat(patch)


def pooled_patches(hidden_patches: torch.Tensor, grid: int, target_n: int) -> torch.Tensor:
    """Average-pool the student's patch grid down to the teacher's grid (16x16 -> 7x7)."""
    b, _n, d = hidden_patches.shape
    side = round(target_n**0.5)
    x = hidden_patches.transpose(1, 2).reshape(b, d, grid, grid)
    return F.adaptive_avg_pool2d(x, side).flatten(2).transpose(1, 2)


def train(cfg: TrainConfig) -> dict:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        rank, world = 0, 1
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    is_main = rank == 0
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        (out_dir / "train_config.json").write_text(cfg.model_dump_json(indent=2))

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    mcfg = load_config(cfg.model)
    init = InitRecipe(vision=cfg.init_vision, text=cfg.init_text)
    model = build_model(mcfg, init, cfg.seed).to(device)
    if cfg.record_init_as:
        init = InitRecipe(**cfg.record_init_as)
    apply_freeze(model, cfg)
    tokenizer = TextTokenizer(Path(cfg.tokenizer or minilm_dir() / "tokenizer.json"), mcfg.text.max_length)
    size = mcfg.vision.image_size
    train_split = prepare_split(cfg.train_data, tokenizer, size, cfg.max_train_items, "decode train", cfg.cache_dir)
    val_split = (
        prepare_split(cfg.val_data, tokenizer, size, cfg.max_val_items, "decode val", cfg.cache_dir)
        if cfg.val_data
        else None
    )

    use_kd = cfg.loss.kd > 0 or cfg.loss.target_cmli > 0
    teacher = build_teacher(cfg.teacher).to(device) if use_kd else None
    if use_kd and teacher is None:
        raise ValueError("KD or Target-CMLI weights are set but no teacher is configured")
    t_glob = t_patch = None
    if teacher is not None:
        t_glob, t_patch = teacher_targets(teacher, train_split.images, device)
        del teacher

    raw_model = model
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optim = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    per_rank = cfg.batch_size // world
    steps_per_epoch = len(train_split.images) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: cosine_with_warmup(s, total, int(cfg.warmup_fraction * total))
    )
    contrastive = ContrastiveLoss()
    start_epoch, best, history = 0, None, []
    resume = out_dir / "last.pt"
    if resume.is_file():  # exact resume at an epoch boundary
        state = torch.load(resume, map_location=device, weights_only=False)
        raw_model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        start_epoch, best, history = state["epoch"], state["best"], state["history"]
        torch.set_rng_state(state["rng"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.startswith("cuda"))
    log = (out_dir / "metrics.jsonl").open("a") if is_main else None
    mean, std = mcfg.vision.mean, mcfg.vision.std
    trainable = {n for n, p in raw_model.named_parameters() if p.requires_grad}
    trainable |= {n for n, _ in raw_model.named_buffers()}
    t_start = time.time()
    last_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start_epoch + cfg.stop_after)
    for epoch in range(start_epoch, last_epoch):
        model.train()
        rng = np.random.default_rng(cfg.seed * 1000 + epoch)  # data order depends on (seed, epoch) only
        order = rng.permutation(len(train_split.images))
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not is_main)
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size][rank * per_rank : (rank + 1) * per_rank]
            caps = np.array([rng.choice(train_split.image_captions[i]) for i in idx])
            px = torch.from_numpy(train_split.images[idx]).to(device).permute(0, 3, 1, 2).float() / 255
            px = normalize(random_resized_crop_flip(px, generator=gen), mean, std)
            width = int(train_split.mask[caps].sum(1).max())
            ids = torch.from_numpy(train_split.ids[caps, :width]).to(device)
            msk = torch.from_numpy(train_split.mask[caps, :width]).to(device)
            with autocast:
                img, txt, logit_scale = model(px, ids, msk)
                losses = {"contrastive": contrastive(img.cls.float(), txt.cls.float(), logit_scale)}
                if cfg.loss.kd > 0:
                    losses["kd"] = kd_loss(img.kd, txt.kd, t_glob[idx].to(device))
                if cfg.loss.target_cmli > 0:
                    kd_head = raw_model.kd_head
                    pooled = pooled_patches(img.hidden[:, 1:], mcfg.vision.grid, t_patch.shape[1])
                    own = pooled_patches(img.patches, mcfg.vision.grid, t_patch.shape[1])  # for eq. 9's argmax
                    losses["target_cmli"] = target_cmli_loss(
                        kd_head(pooled), kd_head(txt.hidden), txt.token_mask, t_patch[idx].to(device), txt.tokens, own
                    )
                if cfg.loss.cmli_contrastive > 0:
                    losses["cmli_contrastive"] = cmli_contrastive_loss(
                        img.patches.float(), txt.tokens.float(), txt.token_mask.float(), logit_scale
                    )
                weights = cfg.loss.model_dump()
                loss = sum(weights[k] * v for k, v in losses.items())
            optim.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            optim.step()
            sched.step()
            if is_main:
                row = {k: round(float(v.detach()), 5) for k, v in losses.items()}
                row.update(
                    epoch=epoch,
                    step=epoch * steps_per_epoch + step,
                    loss=round(float(loss.detach()), 5),
                    lr=sched.get_last_lr()[0],
                    grad_norm=round(float(grad_norm), 4),
                    scale=round(float(raw_model.logit_scale.detach().exp()), 3),
                )
                log.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{float(loss):.3f}")
        if is_main:
            log.flush()
        result = None
        if is_main and val_split is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            emb = embed_split(raw_model, val_split.images, val_split.ids, val_split.mask, device)
            result = evaluate_embeddings(emb, val_split.caption_image, cfg.eval_candidates)
            result["epoch"] = epoch + 1
            history.append(result)
            print(
                json.dumps(
                    {
                        "epoch": epoch + 1,
                        "cls": result["cls"]["mean6"],
                        "rerank": result["rerank"]["mean6"],
                        "cls_weight": result["cls_weight"],
                    }
                )
            )
            if best is None or result["rerank"]["mean6"] > best["rerank"]["mean6"]:
                best = result
                extra = {"val": result, "train_config": cfg.model_dump()}
                save_checkpoint(out_dir / "best.safetensors", raw_model, init, cfg.seed, extra)
                save_checkpoint(
                    out_dir / "best.partial.safetensors",
                    raw_model,
                    init,
                    cfg.seed,
                    extra,
                    only=trainable,
                    dtype=torch.float16,
                )
        if is_main:
            state = {
                "model": raw_model.state_dict(),
                "optim": optim.state_dict(),
                "sched": sched.state_dict(),
                "epoch": epoch + 1,
                "best": best,
                "history": history,
                "rng": torch.get_rng_state(),
            }
            torch.save(state, out_dir / "last.pt.tmp")
            os.replace(out_dir / "last.pt.tmp", out_dir / "last.pt")
    summary = {
        "best": best,
        "history": history,
        "seconds": round(time.time() - t_start, 1),
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "trainable_params": sum(p.numel() for p in raw_model.parameters() if p.requires_grad),
    }
    if distributed:  # every replica must hold the same weights, or gradients were not synchronised
        checksum = torch.stack([p.detach().double().sum() for p in raw_model.parameters()]).sum().reshape(1)
        replicas = [torch.zeros_like(checksum) for _ in range(world)]
        torch.distributed.all_gather(replicas, checksum)
        if not all(torch.allclose(r, replicas[0]) for r in replicas):
            raise RuntimeError(f"DDP replicas diverged: {[float(r) for r in replicas]}")
        summary["replicas_in_sync"] = world
    if is_main:
        if val_split is None:  # no validation split: the last epoch is the model
            save_checkpoint(out_dir / "best.safetensors", raw_model, init, cfg.seed, {"train_config": cfg.model_dump()})
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if distributed:
        torch.distributed.destroy_process_group()
    return summary
