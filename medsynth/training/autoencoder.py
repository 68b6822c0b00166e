"""The first stage of latent diffusion: a KL-regularised autoencoder (Rombach et al. 2022)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import PatchDiscriminator
from torch import nn

from medsynth.config.settings import AutoencoderModelSettings, AutoencoderTrainingSettings
from medsynth.data import LabelledArrays, infinite_batches, step_generator
from medsynth.diffusion import Denoiser, from_unit_range
from medsynth.training.loop import TrainResult, train

log = logging.getLogger("medsynth")


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) summed over latent elements, averaged over the batch."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2).clamp_min(1e-12)) - 1.0)
    return kl.flatten(1).sum(dim=1).mean()


def train_autoencoder(
    autoencoder: nn.Module,
    data: LabelledArrays,
    *,
    settings: AutoencoderTrainingSettings,
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
    on_step: Callable[[int, float, float], None] | None = None,
) -> TrainResult:
    """Train ``autoencoder`` to reconstruct ``data``'s images with L1 + KL (+ patch-adversarial) loss.

    Args:
        autoencoder: A MONAI ``AutoencoderKL`` (on ``device``), trained in place.
        data: Training images in [0, 1]; the model sees them in [-1, 1].
        settings: Steps, batch, learning rate, loss weights and flips (``trainer.autoencoder``).
        device: Where to train.
        seed: Seed of batches and latent draws.
        progress: Show a progress bar.
        on_step: Called as ``on_step(step, loss, lr)``.

    Returns:
        The losses and timing of the run.
    """
    spatial_dims = data.images.ndim - 2
    batches = infinite_batches(data, batch_size=settings.batch_size, seed=seed, flip_dims=list(settings.flip_dims))
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=settings.lr)
    adversarial = settings.adversarial_weight > 0
    if adversarial:
        discriminator = PatchDiscriminator(
            spatial_dims=spatial_dims, in_channels=data.images.shape[1], channels=32, num_layers_d=2
        ).to(device)
        d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=settings.lr)
        criterion = PatchAdversarialLoss(criterion="least_squares")

    def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...], draw: int) -> torch.Tensor:
        x = from_unit_range(batch[0].to(device))
        # the encoder's reparameterised draw uses torch's global generator: seed it per batch, locally
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=step_generator(seed, draw, stream=5))))
            reconstruction, z_mu, z_sigma = model(x)
        loss = F.l1_loss(reconstruction.float(), x.float()) + settings.kl_weight * kl_divergence(z_mu.float(), z_sigma.float())
        if adversarial:
            # discriminator step on real images and detached reconstructions
            d_optimizer.zero_grad(set_to_none=True)
            d_loss = 0.5 * (
                criterion(discriminator(reconstruction.detach())[-1], target_is_real=False, for_discriminator=True)
                + criterion(discriminator(x)[-1], target_is_real=True, for_discriminator=True)
            )
            d_loss.backward()
            d_optimizer.step()
            # the autoencoder is rewarded for reconstructions the discriminator takes for real
            loss = loss + settings.adversarial_weight * criterion(
                discriminator(reconstruction)[-1], target_is_real=True, for_discriminator=False
            )
        return loss

    return train(
        autoencoder,
        loss_fn=loss_fn,
        batches=batches,
        optimizer=optimizer,
        max_steps=settings.max_steps,
        grad_clip=1.0,
        on_step=on_step,
        progress=progress,
        desc="autoencoder",
    )


def fit_autoencoder(
    model: Denoiser,
    data: LabelledArrays,
    *,
    network: AutoencoderModelSettings,
    settings: AutoencoderTrainingSettings,
    path: str | os.PathLike[str],
    device: torch.device,
    seed: int = 0,
    progress: bool = True,
    save: bool = True,
    on_step: Callable[[int, float, float], None] | None = None,
) -> float:
    """Latent diffusion's first stage: train ``model.autoencoder`` on ``data``'s images (or reuse
    the one saved at ``path`` with the same settings), freeze it, and set ``model.latent_scale``.

    Every rank of a data-parallel job trains with the same seed, so all hold the same weights;
    only the one with ``save`` writes them.

    Args:
        model: A latent denoiser (``model.autoencoder`` set), on ``device``.
        data: The training images.
        network: ``model.autoencoder``: the autoencoder's network settings.
        settings: ``trainer.autoencoder``: how it is trained.
        path: Where the trained autoencoder is kept (``checkpoints/autoencoder.pt``).
        device: Where to train.
        seed: Seed of batches and latent draws.
        progress: Show a progress bar.
        save: Write the trained weights to ``path``.
        on_step: Called as ``on_step(step, loss, lr)``.

    Returns:
        The latent scale factor.
    """
    from medsynth.config.schema import to_mapping
    from medsynth.diffusion.latent import latent_scale_factor
    from medsynth.training.checkpoint import save_checkpoint

    path = Path(path)
    wanted = {"network": to_mapping(network), "settings": to_mapping(settings)}
    autoencoder = model.autoencoder
    if path.is_file() and (weights := saved_autoencoder(path, autoencoder, wanted=wanted)) is not None:
        autoencoder.load_state_dict(weights)
        log.info("train: autoencoder from %s", path)
    else:
        autoencoder.train().requires_grad_(True)
        result = train_autoencoder(
            autoencoder, data, settings=settings, device=device, seed=seed, progress=progress, on_step=on_step
        )
        log.info("train: autoencoder %d steps in %.0f s, final L1+KL %.4f", result.steps, result.seconds, result.losses[-1])
        if save:
            save_checkpoint(path, {"weights": autoencoder.state_dict(), "config": wanted})
    autoencoder.requires_grad_(False).eval()
    scale = latent_scale_factor(autoencoder, from_unit_range(data.images))
    model.latent_scale.fill_(scale)
    log.info("train: latent scale factor %.4g", scale)
    return scale


def saved_autoencoder(
    path: str | os.PathLike[str], autoencoder: nn.Module, *, wanted: Mapping[str, Any]
) -> dict[str, torch.Tensor] | None:
    """The weights ``checkpoints/autoencoder.pt`` keeps for ``autoencoder``, if it was trained with ``wanted``.

    The file is data: it must be a mapping of ``config`` (the network and training settings, plain
    values naming only allow-listed classes) and ``weights`` (exactly the autoencoder's tensors).

    Args:
        path: The saved autoencoder.
        autoencoder: The autoencoder the current settings build.
        wanted: ``{"network": ..., "settings": ...}``: the current ``model.autoencoder`` and
            ``trainer.autoencoder`` as plain mappings.

    Returns:
        The checked weights, or ``None`` when the file was trained with other settings (it is then
        trained again and overwritten).

    Raises:
        MedsynthError: One line naming the file and the key, for a file that is not a medsynth
            autoencoder or holds weights that do not fit.
    """
    from medsynth import ConfigError, MedsynthError
    from medsynth.diffusion.generator import check_targets
    from medsynth.training.checkpoint import check_state_dict, load_checkpoint

    saved = load_checkpoint(path)
    config = saved.get("config")
    if not {"config", "weights"} <= set(saved) or not isinstance(config, Mapping) or set(config) != {"network", "settings"}:
        raise MedsynthError(
            f"{path} is not a medsynth autoencoder (a mapping of config with network and settings, and "
            "weights): delete it to train the autoencoder again"
        )
    try:
        check_targets(config["network"], key="model.autoencoder")
        check_targets(config["settings"], key="trainer.autoencoder")
    except ConfigError as err:
        raise MedsynthError(f"checkpoint {path}: config: {err}") from None
    if config != wanted:
        log.info("train: %s was trained with other settings; training the autoencoder again", path)
        return None
    return check_state_dict(autoencoder, saved["weights"], where=f"checkpoint {path}: weights")
