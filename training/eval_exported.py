"""`emkum eval`: Recall@K of an exported model through the serving path (ONNX Runtime encoders and
the `index/` store), for CLS-only ranking and for CLS + CMLI rerank of the top K.

Text->image: every caption searches an index of the split's images. Image->text: every image searches
an index of the split's captions, whose word vectors play the patches' part (seed 004, eq. 3)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from index import VectorStore
from index.store import ItemInput
from service.encoders import Encoders
from service.images import preprocess
from service.modelcard import load_model_card, rerank_defaults, store_config
from service.tokenizer import TextTokenizer
from training.data import decode_square, read_spec
from training.metrics import i2t_recall, summarise, t2i_recall


def evaluate_exported(
    model_dir: Path,
    data_spec: str,
    candidates: int = 20,
    batch: int = 32,
    limit: int | None = None,
    providers: str = "auto",
    precision: str = "fp32",
) -> dict:
    card = load_model_card(model_dir)
    encoders = Encoders(model_dir, card, providers=providers, precision=precision, max_batch=batch)
    tokenizer = TextTokenizer(model_dir / card["files"]["tokenizer"], card["text"]["max_length"])
    pairs = read_spec(data_spec)[:limit]
    spec = card["image"]
    images, texts, owner = [], [], []
    for s in tqdm(range(0, len(pairs), batch), desc="embed images", unit="batch"):
        chunk = pairs[s : s + batch]
        pixels = [preprocess_array(decode_square(p.read(), spec["size"]), spec) for p in chunk]
        images.extend(encoders.embed_images_now(pixels))
        for i, p in enumerate(chunk):
            texts.extend(p.captions)
            owner.extend([s + i] * len(p.captions))
    caption_image = np.array(owner)
    embedded = []
    for s in tqdm(range(0, len(texts), 256), desc="embed captions", unit="batch"):
        embedded.extend(encoders.embed_tokens_now(tokenizer(texts[s : s + 256]).rows()))
    encoders.close()
    weight = rerank_defaults(card).cls_weight
    with tempfile.TemporaryDirectory() as tmp:
        image_store = VectorStore(Path(tmp) / "images", store_config(card, use_gpu=False))
        image_store.add([ItemInput(str(i), e.cls, e.patches) for i, e in enumerate(images)])
        text_store = VectorStore(Path(tmp) / "texts", store_config(card, use_gpu=False))
        text_store.add([ItemInput(str(i), e.cls, e.tokens[e.mask.astype(bool)]) for i, e in enumerate(embedded)])
        out = {}
        for mode, rerank in (("cls", False), ("rerank", True)):
            t2i = np.array(
                [
                    [
                        int(h.id)
                        for h in image_store.search(e.cls, e.tokens, e.mask, 10, candidates, rerank, cls_weight=weight)
                    ]
                    for e in tqdm(embedded, desc=f"t2i {mode}", unit="q")
                ]
            )
            i2t = np.array(
                [
                    [
                        int(h.id)
                        for h in text_store.search(
                            e.cls,
                            e.patches,
                            np.ones(len(e.patches)),
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
    out["provider"], out["precision"] = encoders.provider, encoders.precision
    out["candidates"] = candidates
    out["cls_weight"] = weight
    out["images"], out["captions"] = len(images), len(texts)
    return out


def preprocess_array(arr: np.ndarray, spec: dict) -> np.ndarray:
    from PIL import Image

    return preprocess(Image.fromarray(arr), spec["size"], spec["mean"], spec["std"])
