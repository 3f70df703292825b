"""Frozen tower features on disk, so the fine-grained head (training/fine_grained.py) trains on CPU
in minutes instead of running the towers every step.

For a checkpoint and a split it stores, as fp16 memmaps: the image tower's patch outputs at the
candidate blocks for every image and for fixed 2x2 and 3x3 collages of them (the collages teach
and test pointing), the text tower's token outputs for every caption with its word and content-word
masks, the same for one-word swaps of the captions (training/swaps.py: hard negatives), and the
served CLS vectors (so rerank gains are measured against the real first stage)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from model.config import VisionConfig
from model.emkum import Emkum
from runtime.cpu import has_native_bf16
from runtime.tokenizer import TextTokenizer
from training.augment import normalize
from training.collage import collage_groups, make_collage
from training.data import Pair, load_images
from training.pointing import word_groups
from training.stopwords import is_content_word
from training.swaps import make_swaps

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


def image_sets(images: np.ndarray, groups: dict[int, np.ndarray], size: int) -> dict:
    """The pictures a cache holds features of, by array prefix: `single` (the split's images) and
    `collage{g}` (one collage per row of `groups[g]`), each as (count, make(start, end) -> uint8 batch)."""
    sets = {"single": (len(images), lambda s, e: images[s:e])}
    for g, grp in groups.items():
        sets[f"collage{g}"] = (
            len(grp),
            lambda s, e, grp=grp: np.stack([make_collage(list(images[grp[j]]), size) for j in range(s, e)]),
        )
    return sets


@torch.no_grad()
def cache_split(
    model: Emkum,
    pairs: list[Pair],
    tokenizer: TextTokenizer,
    folder: Path,
    layers: tuple[int, ...],
    collages: dict[int, int],
    batch: int = 32,
) -> SplitFeatures:
    """Write the split's features into `folder`. `collages`: {cells per side: rounds}, each round a
    fresh random grouping of all images. The CLS vectors (bf16 like the rest, within ~1e-2 of the fp32
    graph) rank the first stage whose mistakes the rerank head learns to correct, and score the
    in-loop evaluation; the reported numbers come from `emkum eval` on the exported fp32 graphs."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    model.eval()
    images = load_images(pairs, cfg.vision.image_size)
    groups = {g: np.concatenate([collage_groups(len(pairs), g, seed=r) for r in range(n)]) for g, n in collages.items()}
    n_patch, width = cfg.vision.num_patches, cfg.vision.width

    def run_images(stack: np.ndarray) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """One pass of the model: the cached blocks' patches and the CLS vector."""
        px = normalize(torch.from_numpy(stack).permute(0, 3, 1, 2).float() / 255, cfg.vision.mean, cfg.vision.std)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=has_native_bf16()):
            out = model.encode_image(px, with_kd=False, keep_layers=layers)
        return {k: out.layers[k][:, 1:].float() for k in layers}, out.cls.float()

    for name, (count, make) in image_sets(images, groups, cfg.vision.image_size).items():
        outs = {layer: _open(folder, f"{name}_block{layer}", (count, n_patch, width)) for layer in layers}
        cls_out = _open(folder, f"{name}_cls", (count, cfg.cls_dim), np.float32) if name == "single" else None
        for s in tqdm(range(0, count, batch), desc=f"tower features: {name}", unit="batch"):
            e = min(s + batch, count)
            kept, cls = run_images(make(s, e))
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
    cache_texts(model, tokenizer, captions, folder, "text")
    swaps = make_swaps([p.captions for p in pairs])
    row_of = {(int(i), c): r for r, (i, c) in enumerate(zip(owner, captions, strict=True))}
    cache_texts(model, tokenizer, [sw.negative for sw in swaps], folder, "swap")
    np.save(folder / "swap_image.npy", np.array([sw.image for sw in swaps], dtype=np.int64))
    np.save(folder / "swap_positive.npy", np.array([row_of[(sw.image, sw.positive)] for sw in swaps], dtype=np.int64))
    np.save(folder / "swap_kind.npy", np.array([sw.kind for sw in swaps]))
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


def cnn_array_names(name: str, prefix: str, count: int) -> list[str]:
    """The cached arrays of a second tower's maps (model/cnn.py), one per map it gives the head."""
    return [f"{prefix}_{name}_{i}" for i in range(count)]


@torch.no_grad()
def cache_cnn(feats: SplitFeatures, pairs: list[Pair], name: str, v: VisionConfig, batch: int = 64) -> None:
    """Add the second tower's maps (already on the ViT's patch grid) for the split's images and its
    collages to an existing cache: the same images and collage groupings the ViT blocks were cached
    for, so one cache serves heads with and without the second tower."""
    from model.cnn import build_cnn
    from model.pretrained import load_efficientnet_lite

    if [p.key for p in pairs] != feats.meta["keys"]:
        raise ValueError(f"{feats.folder}: the data's images are not the cached ones")
    image_size = v.image_size
    cnn = build_cnn(name, v.mean, v.std, v.grid)
    load_efficientnet_lite(cnn.net, name)
    images = load_images(pairs, image_size)
    groups = {
        g: np.load(feats.folder / f"collage{g}_images.npy")
        for g in (2, 3)
        if (feats.folder / f"collage{g}_images.npy").is_file()
    }
    for prefix, (count, make) in image_sets(images, groups, image_size).items():
        names = cnn_array_names(name, prefix, len(cnn.widths))
        outs = [_open(feats.folder, n, (count, v.num_patches, w)) for n, w in zip(names, cnn.widths, strict=True)]
        for s in tqdm(range(0, count, batch), desc=f"{name} features: {prefix}", unit="batch"):
            e = min(s + batch, count)
            px = normalize(torch.from_numpy(make(s, e)).permute(0, 3, 1, 2).float() / 255, v.mean, v.std)
            for out, fmap in zip(outs, cnn(px), strict=True):
                out[s:e] = fmap.numpy()
        for out in outs:
            out.flush()


@torch.no_grad()
def cache_texts(model: Emkum, tokenizer: TextTokenizer, texts: list[str], folder: Path, prefix: str) -> None:
    """`{prefix}_tokens` (the text tower's outputs), `_word_mask`, `_content_mask` and `_cls` (served)."""
    cfg = model.cfg
    tok = _open(folder, f"{prefix}_tokens", (len(texts), MAX_TOKENS, cfg.text.width))
    word = np.zeros((len(texts), MAX_TOKENS), dtype=np.float32)
    content = np.zeros((len(texts), MAX_TOKENS), dtype=np.float32)
    cls = _open(folder, f"{prefix}_cls", (len(texts), cfg.cls_dim), np.float32)
    for s in tqdm(range(0, len(texts), 256), desc=f"text features: {prefix}", unit="batch"):
        b = tokenizer(texts[s : s + 256])
        ids, mask = torch.from_numpy(b.ids[:, :MAX_TOKENS]), torch.from_numpy(b.mask[:, :MAX_TOKENS])
        out = model.encode_text(ids, mask, with_kd=False)
        n = ids.shape[1]
        tok[s : s + len(ids), :n] = out.tower.float().numpy()
        word[s : s + len(ids), :n] = out.token_mask.numpy()
        cls[s : s + len(ids)] = out.cls.float().numpy()
        for i, strings in enumerate(b.words):
            content[s + i, :n] = content_mask(strings, n) * out.token_mask[i].numpy()
    tok.flush()
    cls.flush()
    np.save(folder / f"{prefix}_word_mask.npy", word)
    np.save(folder / f"{prefix}_content_mask.npy", content)
