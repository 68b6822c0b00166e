"""Pure metric functions: arrays in, numbers out. Each says what its number means and which way is better."""

from __future__ import annotations

from medsynth.metrics.privacy import closer_to_train_fraction, nearest_neighbours
from medsynth.metrics.realism import mean_pairwise_ssim, tissue_intensity_distances

__all__ = [
    "closer_to_train_fraction",
    "mean_pairwise_ssim",
    "nearest_neighbours",
    "tissue_intensity_distances",
]
