"""MONAI dict-transform chains: orientation, spacing, intensity, crop/pad, augmentation."""

from __future__ import annotations

from medsynth.transforms.batch import random_views
from medsynth.transforms.chains import (
    ForegroundPercentileScaled,
    intensity_scaling,
    label_augmentation,
    volume_preprocessing,
)

__all__ = ["ForegroundPercentileScaled", "intensity_scaling", "label_augmentation", "random_views", "volume_preprocessing"]
