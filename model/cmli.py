"""Cross-modal late interaction (seed 004, eq. 1-4), in torch for training and evaluation.

Every function takes L2-normalised vectors, so a dot product is a cosine. Masks mark the positions
that count: CLS, SEP and padding are excluded by the caller's mask (`TextOutput.token_mask`).
The serving-side twin over numpy lives in `index/cmli.py`; both are tested against one brute-force
loop so they cannot drift apart.
"""

from __future__ import annotations

import torch


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def cmli_pairs(
    tokens: torch.Tensor, token_mask: torch.Tensor, patches: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CMLI for B matched (text, image) pairs.

    Returns (t2i [B], i2t [B], argmax patch per token [B, M]) - eq. 4, eq. 3 and m_j^{t2i} of eq. 2."""
    sim = torch.einsum("bmd,bnd->bmn", tokens, patches)  # [B, M, N]
    best, best_patch = sim.max(dim=2)
    t2i = _masked_mean(best, token_mask)
    i2t = sim.masked_fill(~token_mask.bool()[:, :, None], torch.finfo(sim.dtype).min).max(dim=1).values.mean(-1)
    return t2i, i2t, best_patch


def cmli_t2i_matrix(
    tokens: torch.Tensor, token_mask: torch.Tensor, patches: torch.Tensor, chunk: int = 64
) -> torch.Tensor:
    """Text-to-image CMLI (eq. 4) for every text against every image: [Bt, Bi].

    Images are processed `chunk` at a time so that the [Bt, chunk, M, N] similarity block, not the
    full [Bt, Bi, M, N] one, bounds memory."""
    out = []
    for start in range(0, patches.shape[0], chunk):
        block = torch.einsum("tmd,ind->timn", tokens, patches[start : start + chunk])
        out.append(_masked_mean(block.max(dim=3).values, token_mask[:, None, :]))
    return torch.cat(out, dim=1)


def cmli_i2t_matrix(
    tokens: torch.Tensor, token_mask: torch.Tensor, patches: torch.Tensor, chunk: int = 64
) -> torch.Tensor:
    """Image-to-text CMLI (eq. 3) for every image against every text: [Bi, Bt]."""
    keep = token_mask.bool()
    out = []
    for start in range(0, patches.shape[0], chunk):
        block = torch.einsum("tmd,ind->itnm", tokens, patches[start : start + chunk])
        # fill with the block's own dtype minimum: under autocast the block is bf16
        block = block.masked_fill(~keep[None, :, None, :], torch.finfo(block.dtype).min)
        out.append(block.max(dim=3).values.mean(dim=2))
    return torch.cat(out, dim=0)


def cmli_t2i_candidates(
    tokens: torch.Tensor, token_mask: torch.Tensor, candidate_patches: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """B text queries ([B, M, d], mask [B, M]), each against its own K candidate images
    ([B, K, N, d]): t2i scores [B, K] (eq. 4) and the best patch of every word [B, K, M]."""
    sim = torch.einsum("bmd,bknd->bkmn", tokens, candidate_patches)
    best, best_patch = sim.max(dim=3)
    return _masked_mean(best, token_mask[:, None, :]), best_patch


def cmli_i2t_candidates(
    patches: torch.Tensor, candidate_tokens: torch.Tensor, candidate_mask: torch.Tensor
) -> torch.Tensor:
    """B image queries ([B, N, d]), each against its own K candidate texts ([B, K, M, d], mask
    [B, K, M]): i2t scores [B, K] (eq. 3, mean over patches of the best word)."""
    sim = torch.einsum("bnd,bkmd->bknm", patches, candidate_tokens)
    sim = sim.masked_fill(~candidate_mask.bool()[:, :, None, :], torch.finfo(sim.dtype).min)
    return sim.max(dim=3).values.mean(dim=2)
