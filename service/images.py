"""Decode and validate uploaded images, then preprocess them as model.json says.

Every rejection is an `ApiError` naming the problem: too many bytes, not an image, a format we do not
take, too many pixels (decompression bombs are refused before the pixels are decoded)."""

from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import ApiError

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
                raise ApiError(
                    413,
                    "request_too_many_pixels",
                    f"{name}: the request's images hold more than {self.limit} pixels in all; send fewer per request",
                )
            self.used += pixels


def decode_image(
    data: bytes, filename: str, max_bytes: int, max_pixels: int, budget: PixelBudget | None = None
) -> Image.Image:
    """Bytes -> RGB PIL image with EXIF orientation applied. Raises ApiError(4xx)."""
    name = filename or "upload"
    if not data:
        raise ApiError(400, "empty_file", f"{name}: the file is empty")
    if len(data) > max_bytes:
        raise ApiError(413, "image_too_large", f"{name}: {len(data)} bytes, the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.format not in ALLOWED_FORMATS:
                raise ApiError(415, "unsupported_format", f"{name}: format {im.format} is not supported")
            w, h = im.size
            if w * h > max_pixels:
                raise ApiError(413, "too_many_pixels", f"{name}: {w}x{h} pixels, the limit is {max_pixels}")
            if budget is not None:
                budget.take(w * h, name)
            im.load()
            im = ImageOps.exif_transpose(im)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ApiError(413, "too_many_pixels", f"{name}: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ApiError(400, "invalid_image", f"{name}: not a decodable image ({type(exc).__name__})") from exc
    return to_rgb(im)


def decode_image_file(path: Path, max_bytes: int, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    """For bulk indexing, where a bad file is reported and skipped: (image, None) or (None, reason)."""
    try:
        return decode_image(Path(path).read_bytes(), Path(path).name, max_bytes, max_pixels), None
    except ApiError as exc:
        return None, f"{path}: {exc.message}"
    except OSError as exc:
        return None, f"{path}: {exc}"


def to_rgb(im: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK and alpha images become RGB; transparency is composited on white."""
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def preprocess(im: Image.Image, size: int, mean: list[float], std: list[float]) -> np.ndarray:
    """Squash to size x size with bicubic resampling (the training eval transform), normalise,
    return float32 [3, size, size]."""
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def thumbnail_jpeg(im: Image.Image, size: int) -> bytes:
    thumb = im.copy()
    thumb.thumbnail((size, size))
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=85)
    return out.getvalue()
