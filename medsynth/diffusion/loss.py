"""The denoising training loss (Ho et al. 2020; v-prediction from Salimans & Ho 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.schedulers import Scheduler

from medsynth.diffusion.denoiser import Denoiser


def diffusion_loss(
    model: Denoiser,
    x0: torch.Tensor,
    label: torch.Tensor,
    scheduler: Scheduler,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean squared error between the model's prediction and the scheduler's target.

    Args:
        model: The conditioned denoiser.
        x0: ``(N, C, *spatial)`` clean images in model range [-1, 1].
        label: ``(N, 1, *spatial)`` label maps.
        scheduler: A MONAI DDPM-style scheduler; its ``prediction_type`` picks the target.
        generator: Optional source of randomness for t and noise.

    Returns:
        Scalar loss.
    """
    n = x0.shape[0]
    # t ~ U{0, ..., T-1}, one per example
    t = torch.randint(0, scheduler.num_train_timesteps, (n,), generator=generator).to(x0.device)
    # eps ~ N(0, I)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    # x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
    x_t = scheduler.add_noise(original_samples=x0, noise=eps, timesteps=t)
    # target: eps, x0, or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0
    if scheduler.prediction_type == "epsilon":
        target = eps
    elif scheduler.prediction_type == "sample":
        target = x0
    else:
        target = scheduler.get_velocity(sample=x0, noise=eps, timesteps=t)
    prediction = model(x_t, t, label)
    return F.mse_loss(prediction.float(), target.float())
