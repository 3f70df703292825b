"""Image-caption readers. Each yields `Pair`s (an image key, its captions, a way to read its bytes).

Supported: Karpathy-format JSON (Flickr8k/30K, COCO) with an image folder or tar shards, a CSV of
(image path, caption), and WebDataset tar shards (`key.jpg` + `key.txt` or `key.json`)."""

from __future__ import annotations

import csv
import glob
import json
import tarfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from runtime.images import decode_square


@dataclass
class Pair:
    key: str
    captions: list[str]
    read: Callable[[], bytes]


class TarImages:
    """Random access to the members of one or more tar shards, by base file name."""

    def __init__(self, pattern: str) -> None:
        self.paths = sorted(glob.glob(pattern))
        if not self.paths:
            raise FileNotFoundError(f"no tar shards match {pattern!r}")
        self.where: dict[str, tuple[str, int, int]] = {}
        for path in self.paths:
            with tarfile.open(path) as tar:
                for member in tar:
                    if member.isfile():
                        self.where[Path(member.name).name] = (path, member.offset_data, member.size)

    def reader(self, name: str) -> Callable[[], bytes]:
        if name not in self.where:
            raise KeyError(f"{name} is in no shard of {self.paths[0]}...")
        path, offset, size = self.where[name]

        def read() -> bytes:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(size)

        return read


def _folder_reader(folder: Path, name: str) -> Callable[[], bytes]:
    path = folder / name
    return lambda: path.read_bytes()


def read_karpathy(json_path: str | Path, images: str, split: str) -> list[Pair]:
    """Karpathy JSON: `images[]` with `filename`, `split`, `sentences[].raw`. `images` is a folder
    or a glob of tar shards. `split` may be `train`, `val`, `test` or `train+restval`."""
    data = json.loads(Path(json_path).read_text())
    wanted = set(split.split("+"))
    tars = TarImages(images) if images.endswith(".tar") or "*" in images else None
    pairs = []
    for item in data["images"]:
        if item["split"] not in wanted:
            continue
        name = item["filename"]
        read = tars.reader(name) if tars else _folder_reader(Path(images), name)
        pairs.append(Pair(name, [s["raw"].strip() for s in item["sentences"]], read))
    if not pairs:
        raise ValueError(f"split {split!r} is empty in {json_path}")
    return pairs


def read_csv(csv_path: str | Path) -> list[Pair]:
    """A CSV with columns `image` (path, relative to the CSV) and `caption`; repeated images group."""
    csv_path = Path(csv_path)
    groups: dict[str, list[str]] = defaultdict(list)
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            groups[row["image"]].append(row["caption"].strip())
    return [Pair(k, caps, _folder_reader(csv_path.parent, k)) for k, caps in groups.items()]


def read_webdataset(pattern: str) -> list[Pair]:
    """WebDataset shards: members grouped by key; `.jpg/.jpeg/.png` image and `.txt` caption or
    `.json` with `caption` or `captions`."""
    tars = TarImages(pattern)
    samples: dict[str, dict[str, str]] = defaultdict(dict)
    for name in tars.where:
        key, _, ext = name.partition(".")
        samples[key][ext] = name
    pairs = []
    for key, parts in sorted(samples.items()):
        image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
        if image is None:
            continue
        if "txt" in parts:
            captions = [tars.reader(parts["txt"])().decode().strip()]
        elif "json" in parts:
            meta = json.loads(tars.reader(parts["json"])())
            captions = meta.get("captions") or [meta["caption"]]
        else:
            continue
        pairs.append(Pair(key, captions, tars.reader(image)))
    return pairs


def read_spec(spec: str) -> list[Pair]:
    """Parse a data spec: `karpathy:JSON:IMAGES:SPLIT`, `csv:FILE` or `wds:GLOB`."""
    kind, _, rest = spec.partition(":")
    if kind == "karpathy":
        json_path, images, split = rest.rsplit(":", 2) if rest.count(":") >= 2 else (*rest.split(":"), "val")
        return read_karpathy(json_path, images, split)
    if kind == "csv":
        return read_csv(rest)
    if kind == "wds":
        return read_webdataset(rest)
    raise ValueError(f"unknown data spec {spec!r}: use karpathy:JSON:IMAGES:SPLIT, csv:FILE or wds:GLOB")


def load_images(pairs: list[Pair], size: int, desc: str = "decode") -> np.ndarray:
    """Decode every image once into a uint8 [N, size, size, 3] array (7k Flickr8k images: 1 GB)."""
    out = np.empty((len(pairs), size, size, 3), dtype=np.uint8)
    for i, pair in enumerate(tqdm(pairs, desc=desc, unit="img", leave=False)):
        out[i] = decode_square(pair.read(), size, pair.key)
    return out


def half_of(key: str) -> str:
    """'a' or 'b': a fixed split of any set by the image key's CRC-32, so choices made on half a (weights,
    layers, thresholds) are reported on half b, which nothing was tuned on."""
    import zlib

    return "ab"[zlib.crc32(key.encode()) % 2]


def select_half(pairs: list[Pair], half: str | None) -> list[Pair]:
    """The pairs of half 'a' or 'b' (None or 'all': every pair)."""
    if half in (None, "all"):
        return pairs
    if half not in ("a", "b"):
        raise ValueError(f"half must be 'a', 'b' or 'all', got {half!r}")
    return [p for p in pairs if half_of(p.key) == half]
