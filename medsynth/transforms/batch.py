"""Batched random augmentations on tensors, for self-supervised training (2D and 3D alike)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_views(
    x: torch.Tensor,
    *,
    generator: torch.Generator,
    zoom: tuple[float, float] = (0.75, 1.0),
    shift: float = 0.15,
    contrast: tuple[float, float] = (0.8, 1.2),
    brightness: float = 0.1,
    noise: float = 0.05,
) -> torch.Tensor:
    """An independently augmented view of every image in a batch.

    Each image gets a random zoom-in and shift (a random crop, resampled to full size), a random
    flip along each spatial axis, a random contrast and brightness change and Gaussian noise.

    Args:
        x: ``(N, C, *spatial)`` intensities in [0, 1].
        generator: Source of randomness.
        zoom: Range of the zoom factor (fraction of the field of view kept).
        shift: Largest shift, as a fraction of the half field of view.
        contrast: Range of the intensity multiplier.
        brightness: Largest intensity offset.
        noise: Largest noise standard deviation.

    Returns:
        A tensor shaped like ``x``.
    """
    n, d = x.shape[0], x.ndim - 2

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    # zoom, flip and shift through one affine sampling grid per image
    scale = uniform(*zoom, n)[:, None] * torch.where(torch.rand(n, d, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, d, d + 1)
    theta[:, range(d), range(d)] = scale
    theta[:, :, d] = uniform(-shift, shift, n, d)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    views = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # intensity: a * x + b + sigma * eps
    shape = (n,) + (1,) * (x.ndim - 1)
    a = uniform(*contrast, n).view(shape).to(x)
    b = uniform(-brightness, brightness, n).view(shape).to(x)
    sigma = uniform(0.0, noise, n).view(shape).to(x)
    eps = torch.randn(x.shape, generator=generator).to(x)
    return a * views + b + sigma * eps
