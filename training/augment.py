"""Batched image augmentation on the training device: the thesis's RandomResizedCrop (scale 0.9-1)
and horizontal flip, done as one affine `grid_sample` per batch so that data loading never limits
a GPU step."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_resized_crop_flip(
    images: torch.Tensor,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """images: float [B, 3, H, W] in [0, 1]; returns the same shape."""
    b, device = images.shape[0], images.device

    def rand(n: int) -> torch.Tensor:
        return torch.rand(n, generator=generator, device="cpu").to(device)

    area = scale[0] + (scale[1] - scale[0]) * rand(b)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand(b)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1 - w) * (2 * rand(b) - 1)
    cy = (1 - h) * (2 * rand(b) - 1)
    flip = torch.where(rand(b) < flip_p, -1.0, 1.0).to(device)
    theta = torch.zeros(b, 2, 3, device=device, dtype=images.dtype)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, device=images.device, dtype=images.dtype)[None, :, None, None]
    s = torch.tensor(std, device=images.device, dtype=images.dtype)[None, :, None, None]
    return (images - m) / s
