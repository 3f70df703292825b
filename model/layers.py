"""Layers shared by every tower (timm's habit: defined once, imported everywhere)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerScale(nn.Module):
    """Per-channel learnable scale, diag(lambda) in seed 003, Figure 1 (Touvron et al., CaiT).

    Initialised small so that whatever it scales starts with almost no contribution."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def key_padding_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Turn a [B, L] keep-mask (1 = real token) into an additive [B, 1, 1, L] attention bias."""
    if mask is None:
        return None
    keep = mask.to(torch.bool)[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)


class RelativePositionBias(nn.Module):
    """BEiT's learned relative position bias: one value per head for every (dy, dx) between two patches,
    plus three for [CLS]-to-patch, patch-to-[CLS] and [CLS]-to-[CLS]. Returns an additive
    [1, heads, 1 + N, 1 + N] attention bias.

    The index is a buffer (not saved): it depends only on the grid, and gathering from the table
    exports to ONNX as one Gather, so serving needs nothing BEiT-specific."""

    def __init__(self, grid: int, heads: int) -> None:
        super().__init__()
        self.grid = grid
        self.table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2 + 3, heads))
        self.register_buffer("index", relative_position_index(grid), persistent=False)

    def forward(self) -> torch.Tensor:
        n = self.grid * self.grid + 1
        return self.table[self.index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)[None]


def relative_position_index(grid: int) -> torch.Tensor:
    """[1 + N, 1 + N] indices into the table, laid out as BEiT lays them out (row offset major)."""
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid - 1)
    distances = (2 * grid - 1) ** 2 + 3
    index = torch.zeros((grid * grid + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = rel[..., 0] * (2 * grid - 1) + rel[..., 1]
    index[0, :] = distances - 3  # [CLS] to patch
    index[:, 0] = distances - 2  # patch to [CLS]
    index[0, 0] = distances - 1
    return index


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    Written with plain matmuls rather than a fused kernel so the ONNX graph is portable across
    execution providers and the export parity check stays tight."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if bias is not None:
            attn = attn + bias
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Transformer block. Pre-LN by default (seed 000, eq. 16-17); `post_norm=True` gives the BERT
    layout so that MiniLM's pretrained layers load without conversion error.

    `layer_scale_init` puts LayerScale on both residual branches (DINOv2 blocks; the shared block)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        layer_scale_init: float | None = None,
        post_norm: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        if layer_scale_init is None:
            self.ls1: nn.Module = nn.Identity()
            self.ls2: nn.Module = nn.Identity()
        else:
            self.ls1 = LayerScale(dim, layer_scale_init)
            self.ls2 = LayerScale(dim, layer_scale_init)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.ls1(self.attn(x, bias)))
            return self.norm2(x + self.ls2(self.mlp(x)))
        x = x + self.ls1(self.attn(self.norm1(x), bias))
        return x + self.ls2(self.mlp(self.norm2(x)))
