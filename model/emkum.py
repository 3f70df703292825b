"""EMKUM: two modality towers, token-type embeddings, one shared block, projection and KD heads.

Data flow per modality: tower -> (+ LayerScale(TTE), seed 003 eq. 4-5) -> shared block(s), the same
weights for image and text -> LayerNorm -> linear projection to `proj_dim`, L2-normalised, for the
[CLS] position (global vector) and every other position (patch / token vectors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.cnn import build_cnn
from model.config import EmkumConfig
from model.encoders import TextTransformer, VisionTransformer
from model.layers import Block, LayerScale, Mlp, key_padding_bias

IMAGE_TYPE, TEXT_TYPE = 0, 1


@dataclass
class ImageOutput:
    cls: torch.Tensor  # [B, cls_dim] L2-normalised global vector (config.py `cls_dim`)
    patches: torch.Tensor  # [B, N, P] L2-normalised patch vectors
    hidden: torch.Tensor  # [B, 1 + N, width] shared-block output, before the projection
    kd: torch.Tensor | None  # [B, teacher_dim] regression-head prediction from [I_CLS]
    # raw outputs [B, 1 + N, vision width] of the tower blocks the caller asked for (and the head reads)
    layers: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class TextOutput:
    cls: torch.Tensor  # [B, cls_dim]
    tokens: torch.Tensor  # [B, L, P] (position 0 is [T_CLS]; use `token_mask` to pick words)
    token_mask: torch.Tensor  # [B, L] 1 for word tokens: not CLS, not SEP, not padding
    hidden: torch.Tensor
    kd: torch.Tensor | None
    tower: torch.Tensor | None = None  # [B, L, text width] the text tower's output, what the head reads


class RegressionHead(nn.Module):
    """LayerNorm + Linear from the shared block to the teacher's space (KD, the design card section 3)."""

    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


class FineGrainedHead(nn.Module):
    """LayerNorm per input -> concatenate -> optional residual MLP -> Linear to the CMLI space,
    L2-normalised (issue #14). One LayerNorm per input because the tower's blocks differ in scale by
    orders of magnitude (block 12's patches share one large direction, block 10's do not).

    Trained on frozen tower features with token-level objectives (training/fine_grained.py); kept
    apart from the CLS projection so that making words point cannot cost global retrieval."""

    def __init__(
        self,
        widths: tuple[int, ...],
        out_dim: int,
        hidden: int,
        context: int = 0,
        attention: int = 0,
        caption_context: float = 0.0,
    ) -> None:
        super().__init__()
        # words only: each word's vector leans towards its caption's mean word vector, so "man" in
        # "a man in a red shirt" looks for the man in red where several tiles or people show a man
        # (docs/fine-grained.md: 40% of the 3x3 test's content words are named by another tile too)
        self.caption_context = caption_context
        self.norms = nn.ModuleList(nn.LayerNorm(w) for w in widths)
        width = sum(widths)
        self.mlp = Mlp(width, hidden) if hidden > 0 else None
        self.proj = nn.Linear(width, out_dim)
        # patches only: a residual depthwise conv over the square patch grid, zero at the start (so
        # training starts from the plain head); a patch's vector can borrow from its neighbours
        self.context = None
        if context > 0:
            self.context = nn.Conv2d(out_dim, out_dim, context, padding=context // 2, groups=out_dim)
            nn.init.zeros_(self.context.weight)
            nn.init.zeros_(self.context.bias)
        # patches only: pre-LN Transformer blocks over one image's patch vectors, so a patch can take
        # from the rest of its object (or tile) wherever it lies, not only from its 3x3 neighbours
        self.blocks = nn.ModuleList(
            Block(out_dim, heads=max(1, out_dim // 64), mlp_ratio=2.0, layer_scale_init=0.1) for _ in range(attention)
        )

    def forward(self, *inputs: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor:
        """`words` [..., L] (1 on a caption's words): needed when the head adds caption context."""
        x = torch.cat([norm(t) for norm, t in zip(self.norms, inputs, strict=True)], dim=-1)
        if self.mlp is not None:
            x = x + self.mlp(x)
        y = self.proj(x)
        if self.context is not None:  # [..., N, D] patches of square grids (one image: [N, D])
            n, d = y.shape[-2:]
            side = math.isqrt(n)
            flat = y.reshape(-1, n, d)
            grid = flat.transpose(1, 2).reshape(-1, d, side, side)
            y = y + self.context(grid).reshape(-1, d, n).transpose(1, 2).reshape(y.shape)
        if len(self.blocks):
            flat = y.reshape(-1, *y.shape[-2:])
            for block in self.blocks:
                flat = block(flat)
            y = flat.reshape(y.shape)
        y = F.normalize(y, dim=-1)
        if self.caption_context:
            if words is None:
                raise ValueError("this head adds caption context: pass the word mask")
            w = words.to(y.dtype)[..., None]
            mean = (y * w).sum(-2, keepdim=True) / w.sum(-2, keepdim=True).clamp_min(1)
            y = F.normalize(y + self.caption_context * mean, dim=-1)
        return y


def second_opinion_head(width: int, dim: int) -> nn.Sequential:
    """One side of the second opinion (config.py `second_opinion`): LayerNorm + Linear of a pooled
    vector; training/second_opinion.py trains the same shape on cached features."""
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))


class Emkum(nn.Module):
    def __init__(self, cfg: EmkumConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.text = TextTransformer(cfg.text)
        self.vision_adapter = nn.Identity() if cfg.vision.width == cfg.width else nn.Linear(cfg.vision.width, cfg.width)
        self.text_adapter = nn.Identity() if cfg.text.width == cfg.width else nn.Linear(cfg.text.width, cfg.width)
        if cfg.tte == "before" and not (cfg.vision.width == cfg.text.width == cfg.width):
            raise ValueError("tte='before' adds the type embedding at the tower inputs: widths must match")
        self.type_embed = nn.Embedding(2, cfg.width) if cfg.tte != "none" else None
        # One LayerScale for both modalities so neither is favoured (seed 003, after eq. 5).
        self.type_scale = LayerScale(cfg.width, cfg.tte_layer_scale_init) if cfg.tte == "after" else None
        self.shared = nn.ModuleList(
            Block(cfg.width, cfg.shared_heads, cfg.shared_mlp_ratio, cfg.shared_layer_scale_init)
            for _ in range(cfg.shared_depth)
        )
        self.final_norm = nn.LayerNorm(cfg.width)
        self.image_proj = nn.Linear(cfg.width, cfg.proj_dim, bias=False)
        self.text_proj = nn.Linear(cfg.width, cfg.proj_dim, bias=False)
        self.kd_head = RegressionHead(cfg.width, cfg.teacher_dim) if cfg.teacher_dim else None
        fg = cfg.fine_grained
        if fg is not None and not (fg.vision_layers and all(1 <= i <= cfg.vision.depth for i in fg.vision_layers)):
            raise ValueError(f"fine_grained.vision_layers must be in 1..{cfg.vision.depth}, got {fg.vision_layers}")
        # the optional second tower (model/cnn.py): frozen, its maps read by the patch head after the blocks
        self.cnn = build_cnn(fg.cnn, cfg.vision.mean, cfg.vision.std, cfg.vision.grid) if fg else None
        widths = (cfg.vision.width,) * len(fg.vision_layers) if fg else ()
        widths += tuple(self.cnn.widths) if self.cnn is not None else ()
        self.fg_image = FineGrainedHead(widths, cfg.proj_dim, fg.hidden, fg.context, fg.attention) if fg else None
        self.fg_text = (
            FineGrainedHead((cfg.text.width,), cfg.proj_dim, fg.hidden, caption_context=fg.caption_context)
            if fg
            else None
        )
        # the second opinion (config.py `second_opinion`): its two small heads
        self.second_image = self.second_text = None
        if fg is not None and fg.second_opinion:
            if self.cnn is None:
                raise ValueError("fine_grained.second_opinion reads the ConvNet's maps: set fine_grained.cnn")
            if not 0 < fg.second_opinion < 1:
                raise ValueError(f"fine_grained.second_opinion must be in (0, 1), got {fg.second_opinion}")
            maps = sum(self.cnn.widths)
            self.second_image = second_opinion_head(maps, cfg.proj_dim)
            self.second_text = second_opinion_head(cfg.text.width, cfg.proj_dim)
        # CLIP's learnable temperature, initialised at 1/0.07 and clamped at 100 by the loss.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    # -- internals -------------------------------------------------------------------------
    def _type_vector(self, type_id: int) -> torch.Tensor | None:
        if self.type_embed is None:
            return None
        return self.type_embed.weight[type_id][None, None, :]

    def _shared(self, x: torch.Tensor, type_id: int, mask: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.tte == "after":
            x = x + self.type_scale(self._type_vector(type_id))  # seed 003, eq. 4-5
        bias = key_padding_bias(mask, x.dtype)
        for block in self.shared:
            x = block(x, bias)
        return self.final_norm(x)

    def _with_second_opinion(self, cls: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """[sqrt(1 - w) CLS, sqrt(w) second]: unit norm, and its inner product is the fused score."""
        w = self.cfg.fine_grained.second_opinion
        return torch.cat([math.sqrt(1 - w) * cls, math.sqrt(w) * F.normalize(second, dim=-1)], dim=-1)

    # -- public ----------------------------------------------------------------------------
    def encode_image(
        self, pixels: torch.Tensor, with_kd: bool = True, keep_layers: tuple[int, ...] = ()
    ) -> ImageOutput:
        """`keep_layers`: tower blocks whose raw outputs to return too (the feature cache reads them
        from the same pass that gives the CLS vector)."""
        before = self._type_vector(IMAGE_TYPE) if self.cfg.tte == "before" else None
        keep = self.cfg.fine_grained.vision_layers if self.fg_image is not None else ()
        tower, layers = self.vision.forward_layers(pixels, before, tuple(sorted({*keep, *keep_layers})))
        hidden = self._shared(self.vision_adapter(tower), IMAGE_TYPE, None)
        emb = F.normalize(self.image_proj(hidden), dim=-1)
        kd = self.kd_head(hidden[:, 0]) if (with_kd and self.kd_head is not None) else None
        maps = self.cnn(pixels) if (keep and self.cnn is not None) else []
        patches = self.fine_grained_patches(layers, maps) if keep else emb[:, 1:]
        cls = emb[:, 0]
        if self.second_image is not None:
            cls = self._with_second_opinion(cls, self.second_image(torch.cat([m.mean(1) for m in maps], dim=-1)))
        return ImageOutput(cls=cls, patches=patches, hidden=hidden, kd=kd, layers=layers)

    def fine_grained_patches(self, layers: dict[int, torch.Tensor], maps: list[torch.Tensor]) -> torch.Tensor:
        """The fine-grained head's patch vectors from the tower blocks it reads (`layers`, raw outputs
        with [I_CLS] first) and, when it has one, the second tower's maps of the same pixels."""
        return self.fg_image(*(layers[i][:, 1:] for i in self.cfg.fine_grained.vision_layers), *maps)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor, with_kd: bool = True) -> TextOutput:
        before = self._type_vector(TEXT_TYPE) if self.cfg.tte == "before" else None
        tower = self.text(ids, mask, before)
        hidden = self._shared(self.text_adapter(tower), TEXT_TYPE, mask)
        emb = F.normalize(self.text_proj(hidden), dim=-1)
        t = self.cfg.text
        word = mask.to(torch.bool) & (ids != t.cls_token_id) & (ids != t.sep_token_id)
        if self.fg_text is not None:  # position 0 stays the CLS vector; the rest are the words' CMLI vectors
            emb = torch.cat([emb[:, :1], self.fg_text(tower[:, 1:], words=word[:, 1:])], dim=1)
        kd = self.kd_head(hidden[:, 0]) if (with_kd and self.kd_head is not None) else None
        cls = emb[:, 0]
        if self.second_text is not None:  # the tower's outputs averaged over the words
            w = word.to(tower.dtype)[..., None]
            cls = self._with_second_opinion(cls, self.second_text((tower * w).sum(1) / w.sum(1).clamp_min(1)))
        return TextOutput(cls=cls, tokens=emb, token_mask=word.to(emb.dtype), hidden=hidden, kd=kd, tower=tower)

    def forward(
        self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
    ) -> tuple[ImageOutput, TextOutput, torch.Tensor]:
        """Both towers and the temperature in one call: DDP synchronises gradients only for
        parameters reached through `forward`, the loss's `logit_scale` included."""
        return self.encode_image(pixels), self.encode_text(ids, mask), self.logit_scale * 1.0
