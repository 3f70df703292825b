"""`emkum eval`: quality of an exported model through the serving path (ONNX Runtime encoders and the
`index/` store, its codec included), on a split or on one fixed half of it.

- Recall@K both ways, CLS-only and CLS + CMLI rerank of the top K (keys `cls`, `rerank`).
  Text->image: every caption searches an index of the split's images. Image->text: every image
  searches an index of the split's captions, whose word vectors play the patches' part (seed 004, eq. 3).
- `pointing`: 2x2 and 3x3 collages of the split's images (training/collage.py); for each tile's first
  caption, the share of its content words whose best stored patch lies in the tile, and the share of
  captions whose CMLI score is highest over the tile's patches. Chance: 25% / 11%.
- `choice`: each image against its caption and a one-word swap of it (training/swaps.py): how often
  the true caption scores higher with CLS, with CMLI and fused (the model card's weight), per kind.
- `boxes` (Flickr8k val only): on photos with hand-drawn object boxes (training/box_pointing.py), how
  often "a photo of a <object>"'s object word has its best stored patch inside the object, beside
  chance (the share of patches inside); also for the small objects alone.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from index import VectorStore
from index.cmli import rerank_cmli
from index.store import ItemInput
from runtime.encoders import Encoders
from runtime.images import decode_square, normalize
from runtime.modelcard import load_model_card, rerank_defaults, store_config
from runtime.query import embed_text_queries, image_query
from runtime.tokenizer import TextTokenizer
from training.box_pointing import box_pointing, load_boxes
from training.collage import collage_groups, make_collage, patch_cells
from training.data import read_spec, select_half
from training.metrics import i2t_recall, mean6_gain_interval, summarise, t2i_recall
from training.pointing import PointingTally
from training.swaps import KINDS, make_swaps


def evaluate_exported(
    model_dir: Path,
    data_spec: str,
    candidates: int = 20,
    batch: int = 32,
    limit: int | None = None,
    providers: str = "auto",
    precision: str = "fp32",
    half: str | None = None,
    fine_grained: bool = True,
) -> dict:
    card = load_model_card(model_dir)
    encoders = Encoders(model_dir, card, providers=providers, precision=precision)
    tokenizer = TextTokenizer(model_dir / card["files"]["tokenizer"], card["text"]["max_length"])
    pairs = select_half(read_spec(data_spec), half)[:limit]
    spec = card["image"]
    images, texts, owner, arrays = [], [], [], []
    for s in tqdm(range(0, len(pairs), batch), desc="embed images", unit="batch"):
        chunk = pairs[s : s + batch]
        decoded = [decode_square(p.read(), spec["size"], p.key) for p in chunk]
        arrays.extend(decoded)
        images.extend(encoders.embed_images_now([normalize(a, spec["mean"], spec["std"]) for a in decoded]))
        for i, p in enumerate(chunk):
            texts.extend(p.captions)
            owner.extend([s + i] * len(p.captions))
    caption_image = np.array(owner)
    embedded = embed_text_queries(tokenizer, encoders.embed_tokens_now, texts)
    weight = rerank_defaults(card).cls_weight
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        image_store = VectorStore(Path(tmp) / "images", store_config(card, use_gpu=False))
        image_store.add([ItemInput(str(i), e.cls, e.patches) for i, e in enumerate(images)])
        text_store = VectorStore(Path(tmp) / "texts", store_config(card, use_gpu=False))
        text_store.add([ItemInput(str(i), q.cls, q.words()[0]) for i, q in enumerate(embedded)])
        ranked: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for mode, rerank in (("cls", False), ("rerank", True)):
            t2i = np.array(
                [
                    [int(h.id) for h in image_store.search(q, 10, candidates, rerank, cls_weight=weight)]
                    for q in tqdm(embedded, desc=f"t2i {mode}", unit="q")
                ]
            )
            i2t = np.array(
                [
                    [
                        int(h.id)
                        for h in text_store.search(
                            image_query(e),
                            10,
                            candidates,
                            rerank,
                            cls_weight=weight,
                        )
                    ]
                    for e in tqdm(images, desc=f"i2t {mode}", unit="q")
                ]
            )
            out[mode] = summarise(i2t_recall(i2t, caption_image), t2i_recall(t2i, caption_image))
            ranked[mode] = (i2t, t2i)
        # the rerank's gain over CLS with its paired bootstrap interval over images
        out["rerank_gain"] = mean6_gain_interval(ranked["cls"], ranked["rerank"], caption_image)
        if fine_grained:
            out["pointing"] = {
                f"{g}x{g}": collage_pointing(encoders, tokenizer, card, pairs, arrays, g, Path(tmp) / f"collage{g}")
                for g in (2, 3)
            }
            out["choice"] = fine_grained_choice(encoders, tokenizer, image_store, images, embedded, pairs, weight)
            boxes = photo_box_pointing(encoders, tokenizer, image_store, pairs)
            if boxes is not None:
                out["boxes"] = boxes
    encoders.close()
    out["provider"], out["precision"] = encoders.provider, encoders.precision
    out["candidates"] = candidates
    out["cls_weight"] = weight
    out["half"] = half or "all"
    out["images"], out["captions"] = len(images), len(texts)
    return out


def collage_pointing(
    encoders: Encoders, tokenizer: TextTokenizer, card: dict, pairs: list, arrays: list, g: int, folder: Path
) -> dict:
    """Pointing on g x g collages, scored on the patch vectors as the store keeps them (its codec)."""
    spec = card["image"]
    groups = collage_groups(len(pairs), g)
    collages = [make_collage([arrays[i] for i in grp], spec["size"]) for grp in groups]
    store = VectorStore(folder, store_config(card, use_gpu=False))
    for s in range(0, len(collages), 32):
        embs = encoders.embed_images_now([normalize(c, spec["mean"], spec["std"]) for c in collages[s : s + 32]])
        store.add([ItemInput(str(s + j), e.cls, e.patches) for j, e in enumerate(embs)])
    if not store.codec.is_trained:  # score on the codec's codes, as a larger collection would be
        with contextlib.suppress(ValueError):  # too few vectors for this codec: they stay fp16
            store.train_codec()
    cells = patch_cells(spec["grid"] // store.config.patch_pool, g)
    tally = PointingTally()
    for c, grp in enumerate(tqdm(groups, desc=f"pointing {g}x{g}", unit="collage")):
        patches = store.vectors(str(c))
        captions = embed_text_queries(tokenizer, encoders.embed_tokens_now, [pairs[i].captions[0] for i in grp])
        for t, q in enumerate(captions):
            tally.add(q.vectors @ patches.T, q.labels, q.mask, cells, t)
    store.close()
    return {**tally.summary(), "collages": len(groups), "chance": round(100 / g**2, 2)}


def photo_box_pointing(encoders: Encoders, tokenizer: TextTokenizer, store: VectorStore, pairs: list) -> dict | None:
    """Box pointing (training/box_pointing.py) on the evaluated photos that have hand-drawn boxes,
    scored on their patch vectors as the store keeps them; None when none of them has any."""
    template, objects = load_boxes()
    index = {p.key: i for i, p in enumerate(pairs)}
    objects = [o for o in objects if o.file in index]
    if not objects:
        return None

    def embed(texts: list[str]) -> list[tuple[np.ndarray, list[str]]]:
        return [(q.vectors, q.labels) for q in embed_text_queries(tokenizer, encoders.embed_tokens_now, texts)]

    stored = {o.file: store.vectors(str(index[o.file])) for o in objects}
    return box_pointing(stored, embed, objects, template)


def fine_grained_choice(
    encoders: Encoders,
    tokenizer: TextTokenizer,
    store: VectorStore,
    images: list,
    captions: list,
    pairs: list,
    weight: float,
) -> dict:
    """True caption vs a one-word swap, for each image (training/swaps.py): accuracy in percent.
    `captions`: the split's embedded captions, in pair order (the true captions are among them)."""
    swaps = make_swaps([p.captions for p in pairs])
    first = np.cumsum([0] + [len(p.captions) for p in pairs])
    pos = [captions[first[s.image] + pairs[s.image].captions.index(s.positive)] for s in swaps]
    neg = embed_text_queries(tokenizer, encoders.embed_tokens_now, [s.negative for s in swaps])
    wins = {kind: {"cls": [], "cmli": [], "fused": []} for kind in (*KINDS, "all")}
    for s, p, n in zip(swaps, pos, neg, strict=True):
        img = images[s.image]
        patches = store.vectors(str(s.image))[None]
        cls_p, cls_n = float(img.cls @ p.cls), float(img.cls @ n.cls)
        cmli_p = float(rerank_cmli(p.vectors, p.mask, patches)[0])
        cmli_n = float(rerank_cmli(n.vectors, n.mask, patches)[0])
        fused_p = weight * cls_p + (1 - weight) * cmli_p
        fused_n = weight * cls_n + (1 - weight) * cmli_n
        for kind in (s.kind, "all"):
            wins[kind]["cls"].append(cls_p > cls_n)
            wins[kind]["cmli"].append(cmli_p > cmli_n)
            wins[kind]["fused"].append(fused_p > fused_n)
    return {
        kind: {**{k: round(100 * float(np.mean(v)), 2) for k, v in w.items()}, "pairs": len(w["cls"])}
        for kind, w in wins.items()
        if w["cls"]
    }
