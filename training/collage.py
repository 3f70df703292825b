"""Collages for measuring whether word vectors point at the right place (issue #14's dev pointing test).

A g x g collage puts g*g different images into the cells of one model-sized square (each image
resized into its cell). A caption of one cell's image should then match patches of that cell, and
the caption's CMLI score should be highest over that cell's patches: the answer is built in, so no
boxes are needed. Chance is 1 / g^2 (25% for 2x2, 11% for 3x3)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def cell_edges(size: int, g: int) -> np.ndarray:
    """Pixel edges of the g cells along one side: [g + 1] (cells differ by at most one pixel)."""
    return np.round(np.linspace(0, size, g + 1)).astype(int)


def make_collage(images: list[np.ndarray], size: int) -> np.ndarray:
    """uint8 [size, size, 3] from g*g uint8 RGB images, row-major: image i goes to cell (i // g, i % g)."""
    g = round(len(images) ** 0.5)
    if g * g != len(images):
        raise ValueError(f"a collage needs a square number of images, got {len(images)}")
    edges = cell_edges(size, g)
    out = np.zeros((size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, g)
        h, w = edges[r + 1] - edges[r], edges[c + 1] - edges[c]
        cell = Image.fromarray(img).resize((w, h), Image.BICUBIC)
        out[edges[r] : edges[r + 1], edges[c] : edges[c + 1]] = np.asarray(cell)
    return out


def _cell_of_row(grid: int, g: int) -> np.ndarray:
    """For each of the grid patch rows (or columns), the row (column) of cells its centre lies in."""
    centres = (np.arange(grid) + 0.5) / grid  # in units of the image side
    return np.minimum((centres * g).astype(int), g - 1)


def patch_cells(grid: int, g: int) -> np.ndarray:
    """For each of the grid x grid patches (row-major), the collage cell its centre lies in: [grid^2]."""
    cell_of = _cell_of_row(grid, g)
    return (cell_of[:, None] * g + cell_of[None, :]).reshape(-1)


def cell_blocks(grid: int, g: int) -> list[tuple[slice, slice]]:
    """The patch rows and columns of each collage cell, row-major: the cells of `patch_cells` as
    blocks of the patch grid (each cell's patches are contiguous in both directions)."""
    cell_of = _cell_of_row(grid, g)
    starts = np.searchsorted(cell_of, np.arange(g + 1))
    spans = [slice(int(starts[a]), int(starts[a + 1])) for a in range(g)]
    return [(rows, cols) for rows in spans for cols in spans]


def collage_groups(n_images: int, g: int, seed: int = 0) -> np.ndarray:
    """Disjoint groups of g*g image indices, in a fixed random order: [n_groups, g*g]."""
    order = np.random.default_rng(seed).permutation(n_images)
    k = g * g
    return order[: (n_images // k) * k].reshape(-1, k)
