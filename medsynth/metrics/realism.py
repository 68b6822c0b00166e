"""Realism: does the synthetic set look like the real one?"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import SSIMMetric
from scipy.stats import wasserstein_distance


def tissue_intensity_distances(
    real_images: np.ndarray,
    real_labels: np.ndarray,
    synthetic_images: np.ndarray,
    synthetic_labels: np.ndarray,
    *,
    label_names: Sequence[str],
) -> dict[str, float]:
    """Per-tissue distance between real and synthetic intensity distributions.

    For each label value except background (0), all intensities inside that label are pooled
    over the real set and over the synthetic set, and the 1-Wasserstein (earth mover's)
    distance between the two distributions is taken. Intensities are in the dataset's [0, 1]
    scale, so 0.05 means the distributions differ by about 5% of the intensity range on average.

    Lower is better; 0 means identical distributions.

    Args:
        real_images: Real images, any shape, matching ``real_labels``.
        real_labels: Integer label maps of the real images.
        synthetic_images: Synthetic images, matching ``synthetic_labels``.
        synthetic_labels: The label maps the synthetic images were generated for.
        label_names: Name of each label value; index = value.

    Returns:
        ``{name: distance}`` for every non-background label present in both sets (absent labels
        are left out rather than given a made-up value).
    """
    out: dict[str, float] = {}
    for value, name in enumerate(label_names):
        if value == 0:
            continue
        real = np.asarray(real_images)[np.asarray(real_labels) == value]
        synthetic = np.asarray(synthetic_images)[np.asarray(synthetic_labels) == value]
        if real.size and synthetic.size:
            out[name] = float(wasserstein_distance(real.ravel(), synthetic.ravel()))
    return out


def mean_pairwise_ssim(images: np.ndarray | torch.Tensor, *, spatial_dims: int, max_pairs: int = 2000, seed: int = 0) -> float:
    """Mean SSIM over pairs of distinct images of one set: a (inverse) measure of diversity.

    Compare the synthetic set's value with the real set's: a synthetic value well above the real
    one means the generator produces too little variety (mode collapse); close to the real value
    is best. Alone, lower means more diverse.

    Args:
        images: ``(N, C, *spatial)`` intensities in [0, 1], ``N >= 2``.
        spatial_dims: 2 or 3.
        max_pairs: Use at most this many pairs, drawn at random without repetition.
        seed: Seed for the pair draw.

    Returns:
        Mean SSIM in [-1, 1].
    """
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 images for pairwise SSIM, got {n}")
    i, j = torch.triu_indices(n, n, offset=1)
    if i.numel() > max_pairs:
        keep = torch.randperm(i.numel(), generator=torch.Generator().manual_seed(seed))[:max_pairs]
        i, j = i[keep], j[keep]
    win = min(7, *x.shape[2:])
    win -= 1 - win % 2  # odd window, no larger than the image
    metric = SSIMMetric(spatial_dims=spatial_dims, data_range=1.0, win_size=win)
    values = [metric(x[i[k : k + 256]], x[j[k : k + 256]]) for k in range(0, i.numel(), 256)]
    return float(torch.cat(values).mean())
