"""Ancestral, DDIM and rectified-flow sampling with a MONAI scheduler (Song et al. 2021), with
classifier-free guidance (Ho & Salimans 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler, Scheduler

from medsynth.diffusion.denoiser import Denoiser


def initial_noise(seeds: Sequence[int], shape: Sequence[int], *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Stack one standard-normal draw of ``shape`` per seed, so each sample depends on its seed alone."""
    draws = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(draws).to(device)


@torch.no_grad()
def sample(
    model: Denoiser,
    scheduler: Scheduler,
    condition: torch.Tensor | None,
    *,
    seeds: Sequence[int],
    shape: Sequence[int],
    steps: int = 50,
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw one sample per seed by running the reverse process from pure noise.

    The scheduler's timesteps are set here, so any scheduler instance can be passed in. Each
    sample's starting noise and the noise of its stochastic steps come from its own seed, so a
    sample depends only on the model, its condition and its seed, not on the batch it was drawn
    in: any one sample can be regenerated alone.

    Args:
        model: The denoiser (in eval mode, usually the EMA copy).
        scheduler: A MONAI ``DDIMScheduler`` or ``DDPMScheduler`` matching the model's
            training schedule and prediction type, or an ``RFlowScheduler`` for a rectified-flow model.
        condition: What :meth:`Denoiser.condition` returns for ``N`` samples: label maps for
            ``mask``, attribute codes for ``class`` / ``attributes``, ``None`` for unconditional models.
        seeds: ``N`` seeds, one per sample: each fixes that sample's starting noise.
        shape: ``(C, *spatial)`` of one sample of the diffusion variable.
        steps: Number of reverse steps.
        eta: DDIM stochasticity (0 = deterministic); ignored by other schedulers.
        guidance_scale: Classifier-free guidance weight w: the prediction is
            ``uncond + w * (cond - uncond)``; 1 uses the conditional prediction alone (no extra pass).
        device: Where to sample (default: the condition's device, else the model's).

    Returns:
        ``(N, *shape)`` samples of the diffusion variable; :meth:`Denoiser.split` turns them into
        images and label maps.
    """
    if not isinstance(scheduler, (DDPMScheduler, DDIMScheduler, RFlowScheduler)):
        raise TypeError(f"sampling needs a DDPM, DDIM or RFlow scheduler, got {type(scheduler).__name__}")
    if condition is not None and len(seeds) != condition.shape[0]:
        raise ValueError(f"need one seed per condition, got {len(seeds)} seeds for {condition.shape[0]} conditions")
    null = None
    if guidance_scale != 1.0:
        if condition is None:
            raise ValueError("classifier-free guidance needs a condition")
        null = model.null_condition(condition)
    if steps < 1:
        raise ValueError(f"generate.steps must be >= 1, got {steps}")
    if device is None:
        device = condition.device if condition is not None else next(model.parameters()).device
    scheduler.set_timesteps(num_inference_steps=steps, device=device)
    # x_T ~ N(0, I), one seeded draw per sample
    x = initial_noise(seeds, tuple(shape), device=device)
    # the stochastic steps of DDPM (and DDIM with eta > 0) draw from one generator per sample
    noise_gens = [torch.Generator(device=device).manual_seed(int(s) + 1) for s in seeds]
    timesteps = [int(t) for t in scheduler.timesteps]
    for i, t in enumerate(timesteps):
        # the network's prediction at this step
        t_batch = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        if null is None or condition is None:
            output = model(x, t_batch, condition)
        else:
            # guidance: unconditional and conditional predictions in one pass, then extrapolate
            uncond, cond = model(torch.cat([x, x]), torch.cat([t_batch, t_batch]), torch.cat([null, condition])).chunk(2)
            output = uncond + guidance_scale * (cond - uncond)
        # x at the next (less noisy) timestep from x_t and the prediction
        if isinstance(scheduler, RFlowScheduler):
            x, _ = scheduler.step(output, t, x, timesteps[i + 1] if i + 1 < len(timesteps) else None)
        elif isinstance(scheduler, DDIMScheduler) and eta == 0.0:
            x, _ = scheduler.step(output, t, x, eta=0.0)
        else:
            options = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
            x = torch.cat(
                [
                    scheduler.step(output[i : i + 1], t, x[i : i + 1], generator=gen, **options)[0]
                    for i, gen in enumerate(noise_gens)
                ]
            )
    return x
