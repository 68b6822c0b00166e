"""Realism: does the synthetic set look like the real one?"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric, SSIMMetric
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


def mean_pairwise_ssim(
    images: np.ndarray | torch.Tensor, *, spatial_dims: int, max_pairs: int = 2000, seed: int = 0, multiscale: bool = True
) -> float:
    """Mean (MS-)SSIM over pairs of distinct images of one set: an inverse measure of diversity.

    Compare the synthetic set's value with the real set's: a synthetic value well above the real
    one means the generator produces too little variety (mode collapse); close to the real value
    is best. Alone, lower means more diverse.

    With ``multiscale=True`` this is MS-SSIM with as many of the standard five scales as the image
    size allows for a 7-voxel window (at least one; one scale is plain SSIM).

    Args:
        images: ``(N, C, *spatial)`` intensities in [0, 1], ``N >= 2``.
        spatial_dims: 2 or 3.
        max_pairs: Use at most this many pairs, drawn at random without repetition.
        seed: Seed for the pair draw.
        multiscale: MS-SSIM (True) or single-scale SSIM (False).

    Returns:
        Mean (MS-)SSIM in [-1, 1].
    """
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 images for pairwise SSIM, got {n}")
    i, j = torch.triu_indices(n, n, offset=1)
    if i.numel() > max_pairs:
        keep = torch.randperm(i.numel(), generator=torch.Generator().manual_seed(seed))[:max_pairs]
        i, j = i[keep], j[keep]
    smallest = min(x.shape[2:])
    win = min(7, smallest)
    win -= 1 - win % 2  # odd window, no larger than the image
    scales = 1
    while multiscale and scales < len(_MS_SSIM_WEIGHTS) and (win - 1) * 2**scales < smallest:
        scales += 1
    metric: SSIMMetric | MultiScaleSSIMMetric
    if scales == 1:
        metric = SSIMMetric(spatial_dims=spatial_dims, data_range=1.0, win_size=win)
    else:
        weights = _MS_SSIM_WEIGHTS[:scales]
        metric = MultiScaleSSIMMetric(
            spatial_dims=spatial_dims, data_range=1.0, kernel_size=win, weights=[w / sum(weights) for w in weights]
        )
    values = [torch.as_tensor(metric(x[i[k : k + 256]], x[j[k : k + 256]])) for k in range(0, i.numel(), 256)]
    return float(torch.cat(values).mean())


# Scale weights of Wang et al. (2003) for MS-SSIM; truncated and renormalised for small images.
_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def orthogonal_slices(volumes: np.ndarray, *, step: int = 1) -> dict[str, np.ndarray]:
    """Cut ``(N, C, X, Y, Z)`` volumes into 2D slices along each axis (the 2.5D protocol of MAISI).

    2D metrics (features of a 2D encoder, SSIM) are then computed per orientation and reported
    side by side, so a 3D generator is judged in all three planes.

    Args:
        volumes: RAS volumes, channel-first.
        step: Keep every ``step``-th slice.

    Returns:
        ``{"sagittal": (N*X', C, Y, Z), "coronal": (N*Y', C, X, Z), "axial": (N*Z', C, X, Y)}``.
    """
    v = np.asarray(volumes)
    if v.ndim != 5:
        raise ValueError(f"expected (N, C, X, Y, Z) volumes, got shape {v.shape}")
    out = {}
    for name, axis in (("sagittal", 2), ("coronal", 3), ("axial", 4)):
        moved = np.moveaxis(v, axis, 1)[:, ::step]  # (N, S, C, a, b)
        out[name] = moved.reshape(-1, *moved.shape[2:])
    return out
