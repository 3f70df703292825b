"""Pointing measures over collages (numpy only): given a caption's word vectors and a collage's patch
vectors, does each content word's best patch lie in the caption's cell, and is the caption's CMLI
score (seed 004, eq. 4) highest over that cell's patches?

Shared by `emkum eval` (vectors from the exported graphs) and the diagnosis (vectors from any layer
of the torch model), so both count the same way."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.stopwords import is_content_word


def word_groups(tokens: list[str]) -> list[tuple[str, list[int]]]:
    """Whole words from WordPiece tokens ("skate", "##board" -> "skateboard"), each with the positions
    of its pieces; [CLS]/[SEP]/[PAD] are skipped."""
    groups: list[tuple[str, list[int]]] = []
    for i, tok in enumerate(tokens):
        if tok in ("[CLS]", "[SEP]", "[PAD]"):
            continue
        if tok.startswith("##") and groups:
            word, pos = groups[-1]
            groups[-1] = (word + tok[2:], [*pos, i])
        else:
            groups.append((tok, [i]))
    return groups


def content_word_maps(sim: np.ndarray, tokens: list[str]) -> tuple[list[str], np.ndarray]:
    """sim [L tokens, N patches] -> (content words, [W, N] each word's map: the mean of its pieces')."""
    words, maps = [], []
    for word, pos in word_groups(tokens):
        if is_content_word(word):
            words.append(word)
            maps.append(sim[pos].mean(axis=0))
    return words, (np.stack(maps) if maps else np.zeros((0, sim.shape[1]), dtype=sim.dtype))


@dataclass
class PointingTally:
    """Counts over captions of collage cells; `summary()` gives the shares in percent."""

    words: int = 0
    words_in_cell: int = 0
    captions: int = 0
    captions_best_cell: int = 0
    contrast: float = 0.0  # sum over words of (mean similarity in its cell - mean elsewhere)

    def add(self, sim: np.ndarray, tokens: list[str], word_mask: np.ndarray, cells: np.ndarray, cell: int) -> None:
        """One caption of cell `cell`: sim [L, N] between its tokens and the collage's patches,
        word_mask [L] (1 for word tokens, as CMLI uses), cells [N] the cell of every patch."""
        _, maps = content_word_maps(sim, tokens)
        inside = cells == cell
        if len(maps):
            self.words += len(maps)
            self.words_in_cell += int(inside[maps.argmax(axis=1)].sum())
            self.contrast += float((maps[:, inside].mean(axis=1) - maps[:, ~inside].mean(axis=1)).sum())
        keep = word_mask.astype(bool)
        if keep.any():
            scores = [sim[keep][:, cells == c].max(axis=1).mean() for c in range(int(cells.max()) + 1)]
            self.captions += 1
            self.captions_best_cell += int(np.argmax(scores) == cell)

    def summary(self) -> dict[str, float]:
        return {
            "word_pointing": round(100 * self.words_in_cell / max(self.words, 1), 2),
            "caption_cell": round(100 * self.captions_best_cell / max(self.captions, 1), 2),
            "cell_contrast": round(self.contrast / max(self.words, 1), 4),  # < 0: the map is inverted
            "words": self.words,
            "captions": self.captions,
        }


def patch_locality(patches: np.ndarray, cells: np.ndarray, neighbours: int = 8) -> float:
    """Text-free locality of one collage's patch vectors [N, d]: the share of each patch's nearest
    `neighbours` patches (cosine) that lie in its own cell. Chance is about 1 / cells."""
    x = patches / np.maximum(np.linalg.norm(patches, axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    nearest = np.argpartition(-sim, neighbours, axis=1)[:, :neighbours]
    return float((cells[nearest] == cells[:, None]).mean())


def common_share(patches: np.ndarray) -> float:
    """How much of the L2-normalised patch vectors is one shared direction: |mean|^2 (0 for vectors
    spread evenly, 1 when every patch is the same vector)."""
    x = patches / np.maximum(np.linalg.norm(patches, axis=1, keepdims=True), 1e-12)
    return float(np.square(x.mean(axis=0)).sum())


def collage_word_hits(encoders, tokenizer, spec: dict, collages: list[list[np.ndarray]], queries: list[list[str]]):
    """Pointing through the serving path: each 2x2 collage of photos (uint8 RGB) through the image
    graph, each photo's query through the text graph, and for each of its content words whether
    its best patch (as `explain` computes it) lies in that photo's cell. Yields (collage index, photo
    index in its collage, word, hit) in order. `encoders`: runtime.encoders.Encoders; `spec`: model.json's image."""
    from PIL import Image

    from runtime.images import preprocess
    from runtime.query import embed_text_queries
    from training.collage import make_collage, patch_cells

    cells = patch_cells(spec["grid"], 2)
    for k, (photos, texts) in enumerate(zip(collages, queries, strict=True)):
        collage = Image.fromarray(make_collage(photos, spec["size"]))
        (image,) = encoders.embed_images_now([preprocess(collage, spec["size"], spec["mean"], spec["std"])])
        for cell, query in enumerate(embed_text_queries(tokenizer, encoders.embed_tokens_now, texts)):
            words, maps = content_word_maps(query.vectors @ image.patches.T, query.labels)
            for word, heat in zip(words, maps, strict=True):
                yield k, cell, word, bool(cells[heat.argmax()] == cell)
