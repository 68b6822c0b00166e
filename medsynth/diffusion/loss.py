"""The denoising training loss (Ho et al. 2020; v-prediction from Salimans & Ho 2022)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from monai.networks.schedulers import RFlowScheduler, Scheduler

from medsynth.diffusion.denoiser import Denoiser


def diffusion_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    label: torch.Tensor | None,
    scheduler: Scheduler,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean squared error between the model's prediction and the scheduler's target.

    Args:
        model: The conditioned denoiser (a :class:`Denoiser`, or one wrapped for DDP or ``torch.compile``).
        x0: ``(N, C, *spatial)`` clean samples in model range [-1, 1] (:meth:`Denoiser.to_sample`).
        label: The network's condition (:meth:`Denoiser.condition`): label maps, codes, or ``None``.
        scheduler: A MONAI DDPM, DDIM or RFlow scheduler; it fixes the noising and the target.
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
    # target: eps, x0, v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0, or the flow x0 - eps
    target = prediction_target(scheduler, x0, eps, t)
    prediction = model(x_t, t, label)
    return F.mse_loss(prediction.float(), target.float())


def prediction_target(scheduler: Scheduler, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network regresses: for DDPM/DDIM schedules their ``prediction_type`` (eps, x0 or
    velocity); for rectified flow (Liu et al. 2023, as in MAISI) the straight-line velocity ``x0 - eps``.
    """
    if isinstance(scheduler, RFlowScheduler):
        return x0 - eps
    if scheduler.prediction_type == "epsilon":
        return eps
    if scheduler.prediction_type == "sample":
        return x0
    return scheduler.get_velocity(sample=x0, noise=eps, timesteps=t)


@torch.no_grad()
def denoising_errors(
    model: Denoiser,
    images: torch.Tensor,
    labels: torch.Tensor,
    scheduler: Scheduler,
    *,
    timesteps: list[int],
    codes: torch.Tensor | None = None,
    seed: int = 0,
    batch_size: int = 64,
    on_batch: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """Per-example denoising error at fixed timesteps with fixed noise: a membership-inference score.

    A model tends to denoise the images it was trained on better than new ones, so a low error
    hints that an example was in the training set (Carlini et al. 2023). The same noise draw is
    used for every example at a given timestep, so the errors of different sets are comparable.

    Args:
        model: The trained denoiser (EMA weights).
        images: ``(N, C, *spatial)`` images in [0, 1].
        labels: ``(N, 1, *spatial)`` their label maps.
        scheduler: The training scheduler.
        timesteps: Timesteps to average over.
        codes: ``(N, A)`` attribute codes for ``class`` / ``attributes`` models.
        seed: Seed of the noise draws.
        batch_size: Examples per forward pass.
        on_batch: Called with the number of examples after each batch (a progress bar's ``update``).

    Returns:
        ``(N,)`` mean squared error of each example, averaged over ``timesteps``.
    """
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(images.shape[0])
    for start in range(0, images.shape[0], batch_size):
        label = labels[start : start + batch_size].to(device)
        code = codes[start : start + batch_size].to(device) if codes is not None else None
        x = model.to_sample(images[start : start + batch_size].to(device), label)
        for k, step in enumerate(timesteps):
            # one noise draw per timestep, shared by every example
            e = torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(seed + k)).expand_as(x).to(device)
            t = torch.full((x.shape[0],), int(step), device=device, dtype=torch.long)
            x_t = scheduler.add_noise(original_samples=x, noise=e, timesteps=t)
            error = (model(x_t, t, model.condition(label, code)).float() - prediction_target(scheduler, x, e, t)) ** 2
            total[start : start + batch_size] += error.flatten(1).mean(dim=1).cpu()
        if on_batch is not None:
            on_batch(label.shape[0])
    return total / len(timesteps)
