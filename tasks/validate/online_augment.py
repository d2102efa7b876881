"""The augment policy on the fly, a whole batch at a time, for training loops.

`tasks/augment/stage.py` writes augmented copies to disk with torchvision, one image at a time.
A classifier that augments every batch it trains on (the utility arms) needs the same
policy about a hundred times faster, so here it is drawn per image but applied with one
`affine_grid`/`grid_sample` call per batch:
- flips with probability `hflip` / `vflip`;
- a random affine as torchvision's RandomAffine draws it: angle uniform in
  [-rotate_degrees, rotate_degrees], shift uniform in [-translate, translate] of the size,
  scale uniform in [scale_min, scale_max]; bilinear, filled with 0;
- brightness jitter (RGB only) uniform in [1 - color_jitter, 1 + color_jitter];
- Gaussian noise of `noise_std` on [0, 1] pixels, clipped.
Every draw comes from the caller's torch.Generator, so a seed fixes the stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from synthloop.config import AugmentPolicy


def batch_augmenter(
    policy: AugmentPolicy, generator: torch.Generator
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (N, C, H, W) -> augmented uint8 (N, C, H, W), fresh parameters per image."""

    def uniform(n: int, low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    def augment(images: torch.Tensor) -> torch.Tensor:
        n, channels = images.shape[:2]
        x = images.float().div(255.0)
        flip_h = torch.rand(n, generator=generator) < policy.hflip
        flip_v = torch.rand(n, generator=generator) < policy.vflip
        angle = uniform(n, -policy.rotate_degrees, policy.rotate_degrees) * (math.pi / 180)
        shift = uniform(2 * n, -policy.translate, policy.translate).view(n, 2) * 2  # [-1, 1] units
        scale = uniform(n, policy.scale_min, policy.scale_max)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        sx = torch.where(flip_h, -1.0, 1.0)
        sy = torch.where(flip_v, -1.0, 1.0)
        # Output -> input sampling grid: flips, then the inverse of rotate-scale-shift.
        theta = torch.stack(
            [
                torch.stack([cos * sx, sin * sy, -(cos * shift[:, 0] + sin * shift[:, 1])], 1),
                torch.stack([-sin * sx, cos * sy, sin * shift[:, 0] - cos * shift[:, 1]], 1),
            ],
            1,
        ).to(x.device)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if channels == 3 and policy.color_jitter > 0:
            j = policy.color_jitter
            x = x * uniform(n, 1 - j, 1 + j).view(n, 1, 1, 1).to(x.device)
        if policy.noise_std > 0:
            noise = torch.randn(x.shape, generator=generator).mul_(policy.noise_std)
            x = x + noise.to(x.device)
        return x.clamp_(0, 1).mul_(255).round_().to(torch.uint8)

    return augment
