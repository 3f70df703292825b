"""Frozen tower features on disk, so the fine-grained head (training/fine_grained.py) trains on CPU
in minutes instead of running the towers every step.

For a checkpoint and a split it stores, as fp16 memmaps: the image tower's patch outputs at the
candidate blocks for every image and for fixed 2x2 and 3x3 collages of them (the collages teach
and test pointing), the text tower's token outputs for every caption with its word and content-word
masks, and the served CLS vectors (so rerank gains are measured against the real first stage)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.emkum import Emkum
from service.tokenizer import TextTokenizer
from training.augment import normalize
from training.collage import collage_groups, make_collage
from training.data import Pair, load_images
from training.pointing import word_groups
from training.stopwords import is_content_word

MAX_TOKENS = 40  # Flickr8k captions: 99.9% fit; longer ones are cut (for the cache only)


@dataclass
class SplitFeatures:
    """A cached split, opened read-only (see `load`)."""

    folder: Path
    meta: dict

    @classmethod
    def load(cls, folder: Path) -> SplitFeatures:
        return cls(Path(folder), json.loads((Path(folder) / "meta.json").read_text()))

    def array(self, name: str) -> np.ndarray:
        return np.load(self.folder / f"{name}.npy", mmap_mode="r")


def content_mask(tokens: list[str], length: int) -> np.ndarray:
    """1 at the pieces of content words (training/stopwords.py), 0 elsewhere: [length]."""
    out = np.zeros(length, dtype=np.float32)
    for word, pos in word_groups(tokens):
        if is_content_word(word):
            out[[p for p in pos if p < length]] = 1
    return out


def _open(folder: Path, name: str, shape: tuple[int, ...], dtype=np.float16) -> np.ndarray:
    return np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)


@torch.no_grad()
def cache_split(
    model: Emkum,
    pairs: list[Pair],
    tokenizer: TextTokenizer,
    folder: Path,
    layers: tuple[int, ...],
    collages: dict[int, int],
    batch: int = 32,
    with_cls: bool = True,
) -> SplitFeatures:
    """Write the split's features into `folder`. `collages`: {cells per side: rounds}, each round a
    fresh random grouping of all images. `with_cls`: also the served CLS vectors (for evaluation)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    model.eval()
    images = load_images(pairs, cfg.vision.image_size)
    groups = {g: np.concatenate([collage_groups(len(pairs), g, seed=r) for r in range(n)]) for g, n in collages.items()}
    n_patch, width = cfg.vision.num_patches, cfg.vision.width

    def run_images(stack: np.ndarray, with_cls: bool) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        px = normalize(torch.from_numpy(stack).permute(0, 3, 1, 2).float() / 255, cfg.vision.mean, cfg.vision.std)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, kept = model.vision.forward_layers(px, None, layers)
        cls = model.encode_image(px, with_kd=False).cls if with_cls else None  # fp32, as served
        return {k: v[:, 1:].float() for k, v in kept.items()}, cls

    sets = {"single": (len(pairs), lambda s, e: images[s:e])}
    for g, grp in groups.items():
        sets[f"collage{g}"] = (
            len(grp),
            lambda s, e, grp=grp: np.stack(
                [make_collage(list(images[grp[j]]), cfg.vision.image_size) for j in range(s, e)]
            ),
        )
    for name, (count, make) in sets.items():
        outs = {layer: _open(folder, f"{name}_block{layer}", (count, n_patch, width)) for layer in layers}
        cls_out = (
            _open(folder, f"{name}_cls", (count, cfg.proj_dim), np.float32) if name == "single" and with_cls else None
        )
        for s in tqdm(range(0, count, batch), desc=f"tower features: {name}", unit="batch"):
            e = min(s + batch, count)
            kept, cls = run_images(make(s, e), cls_out is not None)
            for layer in layers:
                outs[layer][s:e] = kept[layer].numpy()
            if cls_out is not None:
                cls_out[s:e] = cls.numpy()
        for arr in outs.values():
            arr.flush()
    for g, grp in groups.items():
        np.save(folder / f"collage{g}_images.npy", grp.astype(np.int64))

    captions = [c for p in pairs for c in p.captions]
    owner = np.array([i for i, p in enumerate(pairs) for _ in p.captions], dtype=np.int64)
    tok = _open(folder, "text_tokens", (len(captions), MAX_TOKENS, cfg.text.width))
    word = np.zeros((len(captions), MAX_TOKENS), dtype=np.float32)
    content = np.zeros((len(captions), MAX_TOKENS), dtype=np.float32)
    text_cls = _open(folder, "text_cls", (len(captions), cfg.proj_dim), np.float32)
    for s in tqdm(range(0, len(captions), 256), desc="text features", unit="batch"):
        b = tokenizer(captions[s : s + 256], pad_to=None)
        ids, mask = torch.from_numpy(b.ids[:, :MAX_TOKENS]), torch.from_numpy(b.mask[:, :MAX_TOKENS])
        out = model.encode_text(ids, mask, with_kd=False)
        tower = model.text(ids, mask)
        n = ids.shape[1]
        tok[s : s + len(ids), :n] = tower.float().numpy()
        word[s : s + len(ids), :n] = out.token_mask.numpy()
        text_cls[s : s + len(ids)] = out.cls.float().numpy()
        for i, strings in enumerate(b.words):
            content[s + i, :n] = content_mask(strings, n) * out.token_mask[i].numpy()
    tok.flush()
    text_cls.flush()
    np.save(folder / "text_word_mask.npy", word)
    np.save(folder / "text_content_mask.npy", content)
    np.save(folder / "caption_image.npy", owner)
    meta = {
        "layers": list(layers),
        "dim": cfg.proj_dim,
        "images": len(pairs),
        "captions": len(captions),
        "keys": [p.key for p in pairs],
    }
    meta["captions_text"] = captions
    (folder / "meta.json").write_text(json.dumps(meta))
    return SplitFeatures.load(folder)
