"""Pure metric functions: arrays in, numbers out. Each says what its number means and which way is better."""

from __future__ import annotations

from medsynth.metrics.distribution import (
    frechet_distance,
    gaussian_mmd,
    histogram_distance,
    kernel_inception_distance,
    label_intensity_stats,
)
from medsynth.metrics.membership import roc_auc, tpr_at_fpr
from medsynth.metrics.memorisation import dice_to_nearest_label_map, max_normalised_correlation
from medsynth.metrics.privacy import closer_to_train_fraction, nearest_neighbours
from medsynth.metrics.realism import mean_pairwise_ssim, tissue_intensity_distances

__all__ = [
    "closer_to_train_fraction",
    "dice_to_nearest_label_map",
    "frechet_distance",
    "gaussian_mmd",
    "histogram_distance",
    "kernel_inception_distance",
    "label_intensity_stats",
    "max_normalised_correlation",
    "mean_pairwise_ssim",
    "nearest_neighbours",
    "roc_auc",
    "tissue_intensity_distances",
    "tpr_at_fpr",
]
