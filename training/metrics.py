"""Retrieval recall by image id, and Mean6 (the mean of i2t and t2i R@1/5/10)."""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def t2i_recall(ranked_images: np.ndarray, caption_image: np.ndarray) -> dict[str, float]:
    """ranked_images [T, >=10]: image indices best first; a caption's hit is its own image."""
    hits = ranked_images == caption_image[:, None]
    return {f"r{k}": round(float(100 * hits[:, :k].any(1).mean()), 2) for k in KS}


def i2t_recall(ranked_captions: np.ndarray, caption_image: np.ndarray) -> dict[str, float]:
    """ranked_captions [I, >=10]: caption indices best first; an image's hit is any of its captions."""
    owners = caption_image[ranked_captions]
    hits = owners == np.arange(len(ranked_captions))[:, None]
    return {f"r{k}": round(float(100 * hits[:, :k].any(1).mean()), 2) for k in KS}


def summarise(i2t: dict[str, float], t2i: dict[str, float]) -> dict:
    mean6 = float(np.mean([*i2t.values(), *t2i.values()]))
    return {"i2t": i2t, "t2i": t2i, "mean6": round(mean6, 2)}


def rerank(candidates: np.ndarray, cls_scores: np.ndarray, cmli_scores: np.ndarray, cls_weight: float) -> np.ndarray:
    """Reorder each row's candidates by cls_weight * cls + (1 - cls_weight) * cmli."""
    fused = cls_weight * cls_scores + (1 - cls_weight) * cmli_scores
    order = np.argsort(-fused, axis=1, kind="stable")
    return np.take_along_axis(candidates, order, axis=1)
