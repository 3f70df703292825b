"""The training loop: AdamW, cosine schedule with warm-up, bf16 autocast on GPU, gradient clipping,
epoch checkpoints with exact resume, DDP under torchrun, per-step metrics to a JSONL file."""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
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
from training.losses import Objective, build_objectives
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


@dataclass
class Run:
    """Everything one training run holds between its epochs (train() below walks through it)."""

    cfg: TrainConfig
    device: str
    rank: int
    world: int
    distributed: bool
    out_dir: Path
    mcfg: object
    init: InitRecipe
    model: torch.nn.Module  # the DDP wrapper when distributed
    raw_model: Emkum
    train_split: SplitTensors
    val_split: SplitTensors | None
    objectives: list[Objective]
    optim: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    trainable: set[str]
    autocast: torch.autocast
    log: object | None
    start_epoch: int = 0
    best: dict | None = None
    history: list[dict] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(cfg: TrainConfig) -> Run:
    """Process group, seeds, model and its freezing, data, teacher targets, objectives, optimiser
    and schedule, and the state of an interrupted run to resume from."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        rank, world = 0, 1
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
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
    targets = None
    if teacher is not None:
        targets = teacher_targets(teacher, train_split.images, device)
        del teacher

    raw_model = model
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optim = torch.optim.AdamW(param_groups(raw_model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    steps_per_epoch = len(train_split.images) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: cosine_with_warmup(s, total, int(cfg.warmup_fraction * total))
    )
    trainable = {n for n, p in raw_model.named_parameters() if p.requires_grad}
    trainable |= {n for n, _ in raw_model.named_buffers()}
    run = Run(
        cfg=cfg,
        device=device,
        rank=rank,
        world=world,
        distributed=distributed,
        out_dir=out_dir,
        mcfg=mcfg,
        init=init,
        model=model,
        raw_model=raw_model,
        train_split=train_split,
        val_split=val_split,
        objectives=build_objectives(cfg.loss, raw_model, mcfg.vision.grid, targets),
        optim=optim,
        sched=sched,
        steps_per_epoch=steps_per_epoch,
        trainable=trainable,
        autocast=torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp and device.startswith("cuda")),
        log=(out_dir / "metrics.jsonl").open("a") if rank == 0 else None,
    )
    resume = out_dir / "last.pt"
    if resume.is_file():  # exact resume at an epoch boundary
        state = torch.load(resume, map_location=device, weights_only=False)
        raw_model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        run.start_epoch, run.best, run.history = state["epoch"], state["best"], state["history"]
        torch.set_rng_state(state["rng"])
    return run


def train_epoch(run: Run, epoch: int) -> None:
    """One pass over the training images in an order fixed by (seed, epoch)."""
    cfg, split, device = run.cfg, run.train_split, run.device
    run.model.train()
    rng = np.random.default_rng(cfg.seed * 1000 + epoch)  # data order depends on (seed, epoch) only
    order = rng.permutation(len(split.images))
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    per_rank = cfg.batch_size // run.world
    mean, std = run.mcfg.vision.mean, run.mcfg.vision.std
    bar = tqdm(range(run.steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not run.is_main)
    for step in bar:
        idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size][
            run.rank * per_rank : (run.rank + 1) * per_rank
        ]
        caps = np.array([rng.choice(split.image_captions[i]) for i in idx])
        px = torch.from_numpy(split.images[idx]).to(device).permute(0, 3, 1, 2).float() / 255
        px = normalize(random_resized_crop_flip(px, generator=gen), mean, std)
        width = int(split.mask[caps].sum(1).max())
        ids = torch.from_numpy(split.ids[caps, :width]).to(device)
        msk = torch.from_numpy(split.mask[caps, :width]).to(device)
        with run.autocast:
            img, txt, logit_scale = run.model(px, ids, msk)
            losses = {o.name: o(img, txt, logit_scale, idx) for o in run.objectives}
            loss = sum(o.weight * losses[o.name] for o in run.objectives)
        run.optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip)
        run.optim.step()
        run.sched.step()
        if run.is_main:
            row = {k: round(float(v.detach()), 5) for k, v in losses.items()}
            row.update(
                epoch=epoch,
                step=epoch * run.steps_per_epoch + step,
                loss=round(float(loss.detach()), 5),
                lr=run.sched.get_last_lr()[0],
                grad_norm=round(float(grad_norm), 4),
                scale=round(float(run.raw_model.logit_scale.detach().exp()), 3),
            )
            run.log.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{float(loss):.3f}")
    if run.is_main:
        run.log.flush()


def evaluate_epoch(run: Run, epoch: int) -> None:
    """Val retrieval after `epoch` (when due); a new best by rerank Mean6 is checkpointed."""
    cfg, val = run.cfg, run.val_split
    if not (run.is_main and val is not None and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs)):
        return
    emb = embed_split(run.raw_model, val.images, val.ids, val.mask, run.device)
    result = evaluate_embeddings(emb, val.caption_image, cfg.eval_candidates)
    result["epoch"] = epoch + 1
    run.history.append(result)
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
    if run.best is None or result["rerank"]["mean6"] > run.best["rerank"]["mean6"]:
        run.best = result
        extra = {"val": result, "train_config": cfg.model_dump()}
        save_checkpoint(run.out_dir / "best.safetensors", run.raw_model, run.init, cfg.seed, extra)
        save_checkpoint(
            run.out_dir / "best.partial.safetensors",
            run.raw_model,
            run.init,
            cfg.seed,
            extra,
            only=run.trainable,
            dtype=torch.float16,
        )


def save_state(run: Run, epoch: int) -> None:
    """`last.pt` after `epoch`, written atomically: what an interrupted run resumes from, exactly."""
    if not run.is_main:
        return
    state = {
        "model": run.raw_model.state_dict(),
        "optim": run.optim.state_dict(),
        "sched": run.sched.state_dict(),
        "epoch": epoch + 1,
        "best": run.best,
        "history": run.history,
        "rng": torch.get_rng_state(),
    }
    torch.save(state, run.out_dir / "last.pt.tmp")
    os.replace(run.out_dir / "last.pt.tmp", run.out_dir / "last.pt")


def finish(run: Run, seconds: float) -> dict:
    """The summary; with DDP, proof that every replica ended with the same weights."""
    raw_model, cfg = run.raw_model, run.cfg
    summary = {
        "best": run.best,
        "history": run.history,
        "seconds": round(seconds, 1),
        "device": torch.cuda.get_device_name() if run.device.startswith("cuda") else "cpu",
        "trainable_params": sum(p.numel() for p in raw_model.parameters() if p.requires_grad),
    }
    if run.distributed:  # every replica must hold the same weights, or gradients were not synchronised
        checksum = torch.stack([p.detach().double().sum() for p in raw_model.parameters()]).sum().reshape(1)
        replicas = [torch.zeros_like(checksum) for _ in range(run.world)]
        torch.distributed.all_gather(replicas, checksum)
        if not all(torch.allclose(r, replicas[0]) for r in replicas):
            raise RuntimeError(f"DDP replicas diverged: {[float(r) for r in replicas]}")
        summary["replicas_in_sync"] = run.world
    if run.is_main:
        if run.val_split is None:  # no validation split: the last epoch is the model
            extra = {"train_config": cfg.model_dump()}
            save_checkpoint(run.out_dir / "best.safetensors", raw_model, run.init, cfg.seed, extra)
        (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if run.distributed:
        torch.distributed.destroy_process_group()
    return summary


def train(cfg: TrainConfig) -> dict:
    """Set up, then for each epoch: train, evaluate (checkpointing a new best), save the state."""
    run = setup(cfg)
    start = time.time()
    last_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, run.start_epoch + cfg.stop_after)
    for epoch in range(run.start_epoch, last_epoch):
        train_epoch(run, epoch)
        evaluate_epoch(run, epoch)
        save_state(run, epoch)
    return finish(run, time.time() - start)
