"""Distribution distances: does the synthetic set follow the same distribution as the real one?

The feature-set metrics (Fréchet distance, KID, Gaussian MMD) compare ``(N, D)`` feature vectors,
typically embeddings from a pretrained network; the histogram and label-statistics functions work
directly on intensities.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.linalg import sqrtm


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _feature_pair(
    real_features: np.ndarray | torch.Tensor, synthetic_features: np.ndarray | torch.Tensor, *, min_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets as float64 ``(N, D)`` arrays, checked for matching ``D`` and enough rows."""
    out = []
    for name, features in (("real_features", real_features), ("synthetic_features", synthetic_features)):
        x = _to_numpy(features).astype(np.float64)
        if x.ndim != 2:
            raise ValueError(f"{name} must be (N, D), got shape {x.shape}")
        if x.shape[0] < min_rows:
            raise ValueError(f"{name} needs at least {min_rows} rows, got {x.shape[0]}")
        out.append(x)
    if out[0].shape[1] != out[1].shape[1]:
        raise ValueError(f"feature dimensions differ: {out[0].shape[1]} vs {out[1].shape[1]}")
    return out[0], out[1]


def frechet_distance(real_features: np.ndarray | torch.Tensor, synthetic_features: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when the features are Inception's).

    Each set is summarised by its mean ``mu`` and covariance ``S``; the distance is
    ``|mu_r - mu_s|^2 + tr(S_r + S_s - 2 (S_r S_s)^(1/2))``, the squared 2-Wasserstein distance
    between the two Gaussians. It is in squared feature units: shifting every one of ``D``
    features by ``s`` (same covariance) gives ``D * s^2``. Estimates are biased upwards for small
    sets, so only compare values computed with the same number of samples.

    Lower is better; 0 means identical means and covariances.

    Args:
        real_features: ``(N, D)`` features of real images, ``N >= 2``.
        synthetic_features: ``(M, D)`` features of synthetic images, ``M >= 2``.

    Returns:
        The distance, ``>= 0``.
    """
    x, y = _feature_pair(real_features, synthetic_features, min_rows=2)
    diff = x.mean(axis=0) - y.mean(axis=0)
    cov_x = np.atleast_2d(np.cov(x, rowvar=False))
    cov_y = np.atleast_2d(np.cov(y, rowvar=False))
    covmean = sqrtm(cov_x @ cov_y)
    if not np.isfinite(covmean).all():
        # Singular product (e.g. fewer samples than dimensions): regularise both covariances slightly.
        offset = np.eye(cov_x.shape[0]) * 1e-6
        covmean = sqrtm((cov_x + offset) @ (cov_y + offset))
    # Rounding can leave a tiny imaginary part (eigenvalues of a PSD product just below zero).
    covmean = np.real(covmean)
    distance = float(diff @ diff + np.trace(cov_x) + np.trace(cov_y) - 2.0 * np.trace(covmean))
    return max(distance, 0.0)


def _polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the kernel ``(x.y / D + 1)^3`` between two equally sized sets."""
    d = x.shape[1]
    m = x.shape[0]
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    off_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    off_yy = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(off_xx + off_yy - 2.0 * k_xy.mean())


def kernel_inception_distance(
    real_features: np.ndarray | torch.Tensor,
    synthetic_features: np.ndarray | torch.Tensor,
    *,
    subset_size: int = 1000,
    num_subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel (Inception) distance: unbiased squared MMD with a cubic polynomial kernel, over random subsets.

    The kernel is ``k(x, y) = (x.y / D + 1)^3``. For each of ``num_subsets`` draws, ``subset_size``
    rows are taken without replacement from each set and the unbiased MMD^2 estimate is computed;
    the mean and standard deviation over draws are returned. Unlike the Fréchet distance the
    estimate is unbiased, so it does not depend systematically on the sample size, and it can be
    slightly negative when the sets come from the same distribution.

    Lower is better; about 0 means the same distribution.

    Args:
        real_features: ``(N, D)`` features of real images.
        synthetic_features: ``(M, D)`` features of synthetic images.
        subset_size: Rows per subset; capped at ``min(N, M)``, which must be at least 2.
        num_subsets: Number of random subsets to average over.
        seed: Seed for the subset draws.

    Returns:
        ``(mean, std)`` of the MMD^2 estimates over subsets.
    """
    x, y = _feature_pair(real_features, synthetic_features, min_rows=2)
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            _polynomial_mmd2_unbiased(x[rng.choice(x.shape[0], m, replace=False)], y[rng.choice(y.shape[0], m, replace=False)])
            for _ in range(num_subsets)
        ]
    )
    return float(values.mean()), float(values.std())


def gaussian_mmd(
    real_features: np.ndarray | torch.Tensor,
    synthetic_features: np.ndarray | torch.Tensor,
    *,
    bandwidth: float | None = None,
) -> float:
    """Squared maximum mean discrepancy with a Gaussian kernel (biased estimate).

    ``MMD^2 = mean k(r, r') + mean k(s, s') - 2 mean k(r, s)`` with
    ``k(a, b) = exp(-|a - b|^2 / (2 bandwidth^2))``, all pairs included (the biased, V-statistic
    form, which is always ``>= 0`` and 0 for identical sets up to rounding). Unlike the Fréchet
    distance it sees every kind of difference between the distributions, not only in mean and
    covariance.
    Values lie in ``[0, 2]``; they depend on the bandwidth, so only compare values computed with
    the same bandwidth (or the same heuristic on similar data). All pairwise distances are held
    in memory: ``(N + M)^2`` floats.

    (MONAI's ``MMDMetric`` is not used: it is the unbiased MMD^2 with a linear kernel, i.e. it
    only compares the means, and it requires equally many samples in both sets.)

    Lower is better; 0 means identical sets.

    Args:
        real_features: ``(N, D)`` features of real images.
        synthetic_features: ``(M, D)`` features of synthetic images.
        bandwidth: Kernel width ``sigma``, in feature units. ``None`` uses the median heuristic:
            the median of the non-zero pairwise distances in the pooled set (1.0 if all are 0).

    Returns:
        The MMD^2 estimate, in ``[0, 2]``.
    """
    x, y = _feature_pair(real_features, synthetic_features, min_rows=1)
    pooled = torch.from_numpy(np.concatenate([x, y]))
    sq_dist = torch.cdist(pooled, pooled).square()
    if bandwidth is None:
        i, j = torch.triu_indices(len(pooled), len(pooled), offset=1)
        pairs = sq_dist[i, j]
        nonzero = pairs[pairs > 0]
        bandwidth = float(nonzero.median().sqrt()) if nonzero.numel() else 1.0
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    kernel = torch.exp(-sq_dist / (2.0 * bandwidth**2))
    n = x.shape[0]
    mmd2 = kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2.0 * kernel[:n, n:].mean()
    return max(float(mmd2), 0.0)


def histogram_distance(
    real_values: np.ndarray | torch.Tensor,
    synthetic_values: np.ndarray | torch.Tensor,
    *,
    bins: int = 64,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> float:
    """Total-variation distance between the normalised intensity histograms of two sets of values.

    Both inputs are flattened and binned into ``bins`` equal bins over ``value_range``; values
    outside the range are clipped into the edge bins, so every value counts. The distance is
    ``1 - sum(min(p, q))`` (one minus the histogram intersection), which equals the total-variation
    distance ``0.5 * sum|p - q|``: the fraction of the probability mass that would have to move to
    turn one histogram into the other.

    Lower is better; 0 means identical histograms, 1 means no bin in common.

    Args:
        real_values: Real intensities, any shape.
        synthetic_values: Synthetic intensities, any shape.
        bins: Number of bins.
        value_range: ``(low, high)`` range covered by the bins.

    Returns:
        The distance, in ``[0, 1]``.
    """
    low, high = value_range
    if not high > low:
        raise ValueError(f"value_range must be increasing, got {value_range}")
    hists = []
    for name, values in (("real_values", real_values), ("synthetic_values", synthetic_values)):
        v = _to_numpy(values).astype(np.float64).ravel()
        if v.size == 0:
            raise ValueError(f"{name} is empty")
        counts, _ = np.histogram(np.clip(v, low, high), bins=bins, range=(low, high))
        hists.append(counts / counts.sum())
    return float(np.clip(1.0 - np.minimum(hists[0], hists[1]).sum(), 0.0, 1.0))


def label_intensity_stats(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    label_names: Sequence[str],
) -> dict[str, dict[str, float]]:
    """Summary statistics of the intensities inside each tissue label.

    For each label value except background (0), all intensities inside that label are pooled over
    the set and summarised. There is no better or worse on its own: compute it for the real and the
    synthetic set and compare; the closer the synthetic statistics are to the real ones, the better.

    Args:
        images: Intensities, any shape, matching ``labels``.
        labels: Integer label maps.
        label_names: Name of each label value; index = value.

    Returns:
        ``{name: {"mean", "std", "p05", "p50", "p95"}}`` for every non-background label present
        (absent labels are left out). ``std`` is the population standard deviation; ``pXX`` are
        percentiles with linear interpolation.
    """
    x = _to_numpy(images)
    lab = _to_numpy(labels)
    if x.shape != lab.shape:
        raise ValueError(f"images and labels differ in shape: {x.shape} vs {lab.shape}")
    out: dict[str, dict[str, float]] = {}
    for value, name in enumerate(label_names):
        if value == 0:
            continue
        inside = x[lab == value].astype(np.float64)
        if inside.size == 0:
            continue
        p05, p50, p95 = np.percentile(inside, [5, 50, 95])
        out[name] = {
            "mean": float(inside.mean()),
            "std": float(inside.std()),
            "p05": float(p05),
            "p50": float(p50),
            "p95": float(p95),
        }
    return out
