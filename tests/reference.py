"""The brute-force CMLI reference (seed 004, eq. 3 and 4) that both implementations are tested against."""

from __future__ import annotations

import numpy as np


def cmli_t2i_loop(tokens: np.ndarray, mask: np.ndarray, patches: np.ndarray) -> float:
    """Mean over the text's words of the max cosine over the image's patches (eq. 4)."""
    total, count = 0.0, 0
    for j in range(len(tokens)):
        if not mask[j]:
            continue
        total += max(float(np.dot(tokens[j], patches[k])) for k in range(len(patches)))
        count += 1
    return total / max(count, 1)


def cmli_i2t_loop(tokens: np.ndarray, mask: np.ndarray, patches: np.ndarray) -> float:
    """Mean over the image's patches of the max cosine over the text's words (eq. 3)."""
    words = [j for j in range(len(tokens)) if mask[j]]
    return float(np.mean([max(float(np.dot(patches[k], tokens[j])) for j in words) for k in range(len(patches))]))
