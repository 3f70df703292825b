"""Pointing on real photos with object boxes: the dev stand-in for issue #14's held-out check ("a photo
of a <object>" with `explain`: does the object word's best patch lie inside the object?).

Collage pointing (training/pointing.py) asks which *photo* a word belongs to; this asks which *part of
one photo*, where the rest of the scene is what the word must not land on. The boxes are hand-drawn
on Flickr8k val photos (`annotations/flickr8k_val_boxes.json`, one named object per photo, every
instance boxed), so the choices made on val half a can be reported on half b here too. Chance is the
share of patches whose centre lies inside a box; the held-out set's objects are smaller (chance 8.5%),
so the summary also gives the photos whose object covers under a tenth of the image."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.pointing import content_word_maps

ANNOTATIONS = Path(__file__).with_name("annotations") / "flickr8k_val_boxes.json"
SMALL = 0.1  # an object "small" when its boxes hold under this share of the patch centres


@dataclass(frozen=True)
class BoxedObject:
    """One photo's named object: every instance's box as (x0, y0, x1, y1), fractions of the square
    picture the model sees."""

    file: str
    half: str
    word: str
    boxes: tuple[tuple[float, float, float, float], ...]


def load_boxes(path: Path = ANNOTATIONS) -> tuple[str, list[BoxedObject]]:
    """(the query template, the objects) of an annotation file; malformed boxes are refused by name."""
    doc = json.loads(Path(path).read_text())
    objects = []
    for o in doc["objects"]:
        boxes = tuple(tuple(float(v) for v in b) for b in o["boxes"])
        for x0, y0, x1, y1 in boxes:
            if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
                raise ValueError(f"{path}: {o['file']}: box {(x0, y0, x1, y1)} is not inside the unit square")
        objects.append(BoxedObject(o["file"], o["half"], o["word"], boxes))
    return doc["template"], objects


def patches_inside(boxes: tuple[tuple[float, float, float, float], ...], grid: int) -> np.ndarray:
    """[grid * grid] row-major: whether each patch's centre lies inside one of the boxes."""
    centres = (np.arange(grid) + 0.5) / grid
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    inside = np.zeros((grid, grid), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        inside |= (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    return inside.reshape(-1)


@dataclass
class BoxTally:
    """Counts over photos; `summary()` gives shares in percent, all objects and the small ones."""

    hits: list[bool] = field(default_factory=list)
    areas: list[float] = field(default_factory=list)

    def add(self, word_map: np.ndarray, boxes: tuple[tuple[float, float, float, float], ...]) -> bool:
        """word_map [N patches]: the object word's similarity to each patch (as `explain` gives it)."""
        inside = patches_inside(boxes, math.isqrt(len(word_map)))
        hit = bool(inside[int(np.argmax(word_map))])
        self.hits.append(hit)
        self.areas.append(float(inside.mean()))
        return hit

    def summary(self) -> dict:
        hits, areas = np.array(self.hits, dtype=bool), np.array(self.areas)
        small = areas < SMALL

        def share(x: np.ndarray) -> float:
            return round(100 * float(x.mean()), 2) if len(x) else 0.0

        return {
            "word_in_box": share(hits),
            "chance": share(areas),
            "objects": len(hits),
            "small": {"word_in_box": share(hits[small]), "chance": share(areas[small]), "objects": int(small.sum())},
        }


def box_pointing(
    stored_patches: dict[str, np.ndarray],
    embed_queries: Callable[[list[str]], list[tuple[np.ndarray, list[str]]]],
    objects: list[BoxedObject],
    template: str,
) -> dict:
    """`stored_patches`: each photo's patch vectors [N, d] by file; `embed_queries(texts)` -> one
    (word vectors [L, d], token labels) per text, the way a search embeds it. Each object is asked
    for with `template` and scored on its word's map (WordPieces averaged, as for collage pointing)."""
    tally = BoxTally()
    queries = embed_queries([template.format(o.word) for o in objects])
    for o, (vectors, labels) in zip(objects, queries, strict=True):
        words, maps = content_word_maps(vectors @ stored_patches[o.file].T, labels)
        if o.word not in words:
            raise ValueError(f"{o.file}: {o.word!r} is not a content word of its query")
        tally.add(maps[words.index(o.word)], o.boxes)
    return tally.summary()
