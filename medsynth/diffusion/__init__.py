"""Diffusion loss and sampling around MONAI schedulers; the same code for 2D and 3D."""

from __future__ import annotations

from medsynth.diffusion.denoiser import CONDITIONING_MODES, Denoiser, from_unit_range, to_unit_range
from medsynth.diffusion.loss import denoising_errors, diffusion_loss, prediction_target
from medsynth.diffusion.sampling import sample

__all__ = [
    "CONDITIONING_MODES",
    "Denoiser",
    "denoising_errors",
    "diffusion_loss",
    "from_unit_range",
    "prediction_target",
    "sample",
    "to_unit_range",
]
