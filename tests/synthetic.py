"""Synthetic image-caption collections for tests: coloured shapes with captions that name them, so a
model can actually learn something in a few CPU steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SHAPES = ("square", "stripe")


def make_image(colour: str, shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    arr = (rng.random((size, size, 3)) * 40).astype(np.uint8)
    c = np.array(COLOURS[colour], dtype=np.uint8)
    if shape == "square":
        a, b = size // 4, 3 * size // 4
        arr[a:b, a:b] = c
    else:
        arr[:, size // 3 : 2 * size // 3] = c
    return Image.fromarray(arr)


def make_karpathy(root: Path, n_train: int = 48, n_val: int = 16, size: int = 32, seed: int = 0) -> Path:
    """Write `images/*.jpg` and `dataset.json` in Karpathy format; returns the JSON path."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    items = []
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    for i in range(n_train + n_val):
        colour, shape = combos[i % len(combos)]
        name = f"img{i:04d}.jpg"
        make_image(colour, shape, size, rng).save(root / "images" / name, quality=95)
        sentences = [
            {"raw": f"a {colour} {shape} on a dark background"},
            {"raw": f"the {shape} is {colour}"},
        ]
        items.append({"filename": name, "imgid": i, "split": "train" if i < n_train else "val", "sentences": sentences})
    path = root / "dataset.json"
    path.write_text(json.dumps({"images": items, "dataset": "synthetic"}))
    return path
