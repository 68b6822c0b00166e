"""The denoising objective a training run minimises, and its validation loss on held-out records."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.networks.schedulers import Scheduler
from torch import nn

from medsynth.data import LabelledArrays, step_generator
from medsynth.diffusion import Denoiser, denoising_errors, diffusion_loss


def denoising_objective(
    model: Denoiser,
    scheduler: Scheduler,
    *,
    seed: int,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
    encoded: bool = False,
) -> Callable[[nn.Module, tuple[torch.Tensor, ...], int], torch.Tensor]:
    """The loss of one ``(images, labels, codes)`` batch, as :func:`medsynth.training.train` calls it.

    The condition dropout and the noise of batch ``draw`` come from generators fixed by
    ``(seed, draw)``, so a resumed run draws exactly what the uninterrupted run would have.

    Args:
        model: The denoiser (its condition and sample transforms; the forward pass is the module
            the loop passes in, which may wrap it for DDP or compilation).
        scheduler: The training noise schedule.
        seed: This rank's seed.
        device: Where the batches go.
        memory_format: The layout of the model (``channels_last`` for NHWC training).
        encoded: The batches hold the diffusion variable already (cached latents,
            :mod:`medsynth.training.latent_cache`), not images to encode.

    Returns:
        ``loss_fn(module, batch, draw)``.
    """

    def loss_fn(module: nn.Module, batch: tuple[torch.Tensor, ...], draw: int) -> torch.Tensor:
        images, labels = (x.to(device).contiguous(memory_format=memory_format) for x in batch[:2])
        # classifier-free guidance: drop conditions at the configured rate, fixed by the draw
        condition = model.drop_condition(
            model.condition(labels, batch[2].to(device)), generator=step_generator(seed, draw, stream=4)
        )
        # the diffusion loss at a random timestep with noise fixed by the draw
        x0 = images if encoded else model.to_sample(images, labels)
        return diffusion_loss(module, x0, condition, scheduler, generator=step_generator(seed, draw, stream=3))

    return loss_fn


def validation_timesteps(fractions: Sequence[float], num_train_timesteps: int) -> list[int]:
    """The timesteps ``trainer.validation.timestep_fractions`` name on a schedule of ``num_train_timesteps``."""
    return sorted({int(f * (num_train_timesteps - 1)) for f in fractions})


def validation_loss(
    model: Denoiser,
    data: LabelledArrays,
    scheduler: Scheduler,
    *,
    timesteps: Sequence[int],
    seed: int,
    on_batch: Callable[[int], object] | None = None,
) -> float:
    """Mean denoising error of ``model`` on ``data`` at fixed timesteps and fixed noise: lower is better,
    and comparable across the checkpoints of a run.

    Args:
        model: The model to validate (the EMA copy).
        data: The validation records.
        scheduler: The training noise schedule.
        timesteps: Where on the schedule to measure.
        seed: Seed of the noise, the same at every checkpoint.
        on_batch: Called with the number of records after each batch (progress).

    Returns:
        The mean error.
    """
    return float(
        denoising_errors(
            model, data.images, data.labels, scheduler, timesteps=list(timesteps), codes=data.codes, seed=seed, on_batch=on_batch
        ).mean()
    )
