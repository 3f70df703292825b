"""The two modality-specific towers (seed 000, eq. 8-15)."""

from __future__ import annotations

import torch
from torch import nn

from model.config import TextConfig, VisionConfig
from model.layers import Block, RelativePositionBias, key_padding_bias


class VisionTransformer(nn.Module):
    """Patchify, linear patch embedding, learnable [I_CLS], positional encoding that is zero for
    [I_CLS] (seed 000, eq. 8-11), then `depth` blocks. Returns [B, 1 + N, width]."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.width))  # patches only
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.layer_scale_init, eps=cfg.norm_eps) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        tables = {"none": 0, "shared": 1, "per_layer": cfg.depth}[cfg.rel_pos_bias]
        self.rel_pos = nn.ModuleList(RelativePositionBias(cfg.grid, cfg.heads) for _ in range(tables))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, pixels: torch.Tensor, input_offset: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_layers(pixels, input_offset)[0]

    def forward_layers(
        self, pixels: torch.Tensor, input_offset: torch.Tensor | None = None, keep: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The normed output and the raw outputs of the blocks numbered in `keep` (1 = the first).

        Seed 004 lets CMLI read any layer l; the fine-grained head reads one below the top, where
        the patch vectors are still local and not yet dominated by one shared direction."""
        patches = self.patch_embed(pixels).flatten(2).transpose(1, 2) + self.pos_embed
        x = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        if input_offset is not None:  # token-type embedding before the encoder (seed 003, eq. 2)
            x = x + input_offset
        shared = self.rel_pos[0]() if self.cfg.rel_pos_bias == "shared" else None
        kept: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks, start=1):
            bias = self.rel_pos[i - 1]() if self.cfg.rel_pos_bias == "per_layer" else shared
            x = block(x, bias)
            if i in keep:
                kept[i] = x
        return self.norm(x), kept


class TextTransformer(nn.Module):
    """Token embeddings for [T_CLS] w_1..w_M [T_SEP], positional encoding (zero for [T_CLS] when
    `cls_zero_position`, seed 000 eq. 14), `depth` blocks with a padding mask. Returns [B, L, width].

    With `post_norm` and `embed_norm` it is exactly a BERT encoder, which is how MiniLM loads."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Embedding(cfg.max_positions, cfg.width)
        self.embed_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.embed_norm else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, post_norm=cfg.post_norm, eps=cfg.norm_eps)
            for _ in range(cfg.depth)
        )
        self.norm = nn.Identity() if cfg.post_norm else nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed.weight, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, input_offset: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        pos = self.pos_embed(positions)[None]
        if self.cfg.cls_zero_position:
            keep = (positions > 0).to(pos.dtype)[None, :, None]
            pos = pos * keep
        x = self.embed_norm(self.token_embed(ids) + pos)
        if input_offset is not None:  # token-type embedding before the encoder (seed 003, eq. 1)
            x = x + input_offset
        bias = key_padding_bias(mask, x.dtype)
        for block in self.blocks:
            x = block(x, bias)
        return self.norm(x)
