"""Image bytes for API tests: real encodings made with Pillow, and deliberately broken ones."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **kw)
    return out.getvalue()


def photo(seed: int, size: int = 48, mode: str = "RGB") -> Image.Image:
    arr = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


def jpeg(seed: int, size: int = 48) -> bytes:
    return encode(photo(seed, size))


def bomb_png(side: int = 12000) -> bytes:
    """A 1-bit PNG with side*side pixels that compresses to a few kilobytes."""
    return encode(Image.new("1", (side, side)), "PNG", optimize=True)
