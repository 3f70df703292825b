"""A second, convolutional image tower for the fine-grained head (issue #14).

Why a second tower: the head's CMLI read only the ViT that also makes the CLS vectors, so the rerank
made the first stage's own mistakes again (docs/fine-grained.md: at most +0.3 Mean6 over CLS, however
it was trained). An ImageNet ConvNet is different evidence about the same photo: other
architecture, other training data, and features that stay local (a conv layer sees only its
neighbourhood). It is frozen; only the head's projection learns to read it.

EfficientNet-Lite (the design card's teacher packages) is read at two depths: the last stride-16
stage (where things are) and the 1x1 head conv (1280 channels: what they are). Both maps are resized
bilinearly onto the ViT's patch grid so each patch vector can take its own spot from them. Lite0
(the default: 0.4 GFLOPs at its 224 px, a tenth of the ViT) gives 14 x 14 and 7 x 7 maps; Lite2
(about twice Lite0's time) runs at its own 260 px, the ViT's input resized, and gives 17 x 17 and
9 x 9. The finer maps were meant for small cells (3 x 3 collages); on val half a they helped 2 x 2
pointing but not 3 x 3 or the rerank (docs/fine-grained.md, section 4), so Lite0 stays the default."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LiteVariant:
    """What differs between the EfficientNet-Lite sizes the head can read."""

    input_size: int  # the resolution it was trained at (the ViT's pixels are resized to it)
    widths: tuple[int, int]  # channels of the last stride-16 stage and of the head conv


CNN_VARIANTS = {
    "efficientnet-lite0": LiteVariant(224, (112, 1280)),
    "efficientnet-lite2": LiteVariant(260, (120, 1280)),
}
CNN_NAMES = ("none", *CNN_VARIANTS)
CNN_WIDTHS = {"none": (), **{name: v.widths for name, v in CNN_VARIANTS.items()}}  # the maps each gives the head
CNN_MEAN = (0.5, 0.5, 0.5)  # EfficientNet-Lite's own input normalisation (TF-style, [-1, 1])
CNN_STD = (0.5, 0.5, 0.5)


class EfficientNetLiteMaps(nn.Module):
    """pixels normalised with the ViT's mean/std [B, 3, S, S] -> [[B, grid^2, C1], [B, grid^2, 1280]].

    Frozen, batch norm included (`train()` keeps it in eval mode): its weights come from the pip
    package at build time (model/pretrained.py), never from training."""

    def __init__(self, variant: str, vit_mean: tuple[float, ...], vit_std: tuple[float, ...], grid: int) -> None:
        super().__init__()
        import timm

        from model.pretrained import EFFICIENTNET_LITE

        self.variant = variant
        self.spec = CNN_VARIANTS[variant]
        self.widths = self.spec.widths
        self.grid = grid
        self.net = timm.create_model(EFFICIENTNET_LITE[variant][0], pretrained=False, num_classes=0)
        self.net.requires_grad_(False)
        # x_cnn = (x_raw - 0.5) / 0.5 with x_raw = x_vit * std + mean: one affine map per channel
        vit_mean_t, vit_std_t = torch.tensor(vit_mean), torch.tensor(vit_std)
        scale = vit_std_t / torch.tensor(CNN_STD)
        shift = (vit_mean_t - torch.tensor(CNN_MEAN)) / torch.tensor(CNN_STD)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        super().train(False)

    def train(self, mode: bool = True) -> EfficientNetLiteMaps:
        return super().train(False)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Runs in the tower's own dtype, which may differ from the rest of the model's (the fp16
        graphs keep this tower fp32: training/export.py `half_precision`); returns the input's dtype."""
        net = self.net
        dtype = net.conv_stem.weight.dtype
        x = pixels.to(dtype) * self.scale.to(dtype) + self.shift.to(dtype)
        size = self.spec.input_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = net.bn1(net.conv_stem(x))
        for i, block in enumerate(net.blocks):
            x = block(x)
            if i == 4:  # the last stride-16 stage (timm's blocks[4] in every Lite size)
                where = x
        what = net.bn2(net.conv_head(x))
        return [self._on_grid(where).to(pixels.dtype), self._on_grid(what).to(pixels.dtype)]

    def _on_grid(self, fmap: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, grid^2, C], bilinear onto the ViT's patch grid (row-major like its patches)."""
        fmap = F.interpolate(fmap, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return fmap.flatten(2).transpose(1, 2)


def build_cnn(name: str, vit_mean: tuple[float, ...], vit_std: tuple[float, ...], grid: int) -> nn.Module | None:
    """The second tower a config names ('none': no second tower)."""
    if name == "none":
        return None
    if name in CNN_VARIANTS:
        return EfficientNetLiteMaps(name, vit_mean, vit_std, grid)
    raise ValueError(f"unknown fine_grained cnn {name!r}; choose one of {CNN_NAMES}")
