"""Decode and validate uploaded images, then preprocess them as model.json says.

Every rejection is an `InputError` naming the problem: too many bytes, not an image, a format we do not
take, too many pixels (decompression bombs are refused before the pixels are decoded)."""

from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from runtime.errors import InputError

ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def find_images(folder: Path) -> list[Path]:
    """Every file under `folder` (recursively) whose suffix says image, sorted: bulk indexers' input."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


class PixelBudget:
    """The decoded pixels one request may spend across all its images, taken from the headers before
    any pixel is decoded; the images of a request decode in parallel, hence the lock."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def take(self, pixels: int, name: str) -> None:
        with self._lock:
            if self.used + pixels > self.limit:
                raise InputError(
                    "request_too_many_pixels",
                    f"{name}: the request's images hold more than {self.limit} pixels in all; send fewer per request",
                )
            self.used += pixels


def decode_image(
    data: bytes, filename: str, max_bytes: int, max_pixels: int, budget: PixelBudget | None = None
) -> Image.Image:
    """Bytes -> RGB PIL image with EXIF orientation applied. Raises InputError."""
    name = filename or "upload"
    if not data:
        raise InputError("empty_file", f"{name}: the file is empty")
    if len(data) > max_bytes:
        raise InputError("image_too_large", f"{name}: {len(data)} bytes, the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.format not in ALLOWED_FORMATS:
                raise InputError("unsupported_format", f"{name}: format {im.format} is not supported")
            w, h = im.size
            if w * h > max_pixels:
                raise InputError("too_many_pixels", f"{name}: {w}x{h} pixels, the limit is {max_pixels}")
            if budget is not None:
                budget.take(w * h, name)
            im.load()
            im = ImageOps.exif_transpose(im)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError("too_many_pixels", f"{name}: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InputError("invalid_image", f"{name}: not a decodable image ({type(exc).__name__})") from exc
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK and alpha images become RGB; transparency is composited on white."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def square(im: Image.Image, size: int) -> Image.Image:
    """Squash to size x size with bicubic resampling: the one resize of training, evaluation and
    serving (the thesis' eval transform: no crop)."""
    return im if im.size == (size, size) else im.resize((size, size), Image.BICUBIC)


def normalize(arr: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 [S, S, 3] RGB -> float32 [3, S, S], normalised as model.json says."""
    x = np.asarray(arr, dtype=np.float32) / 255.0
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(im: Image.Image, size: int, mean: list[float], std: list[float]) -> np.ndarray:
    """A decoded image -> the image graph's input, float32 [3, size, size]."""
    return normalize(np.asarray(square(im, size)), mean, std)


# training and evaluation read their own datasets: no upload limits beyond PIL's bomb check
TRUSTED_BYTES, TRUSTED_PIXELS = 2**31, Image.MAX_IMAGE_PIXELS or 2**31


def decode_square(data: bytes, size: int, name: str = "image") -> np.ndarray:
    """Bytes -> uint8 [size, size, 3], decoded exactly as the service decodes an upload (EXIF
    orientation, alpha on white, CMYK and palettes to RGB): training and `emkum eval` see the
    pixels the service will see."""
    return np.asarray(square(decode_image(data, name, TRUSTED_BYTES, TRUSTED_PIXELS), size), dtype=np.uint8)


def thumbnail_jpeg(im: Image.Image, size: int) -> bytes:
    thumb = im.copy()
    thumb.thumbnail((size, size))
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=85)
    return out.getvalue()
