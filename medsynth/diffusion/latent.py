"""Latent diffusion helpers (Rombach et al. 2022): the latent scale and a tiled decoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import torch
from monai.inferers import sliding_window_inference

if TYPE_CHECKING:
    from monai.networks.nets import AutoencoderKL


@torch.no_grad()
def latent_scale_factor(autoencoder: AutoencoderKL, images: torch.Tensor, *, batch_size: int = 4) -> float:
    """``1 / std`` of the autoencoder's latent means over ``images``: the factor that gives the
    diffusion model latents of unit variance, as its noise schedule assumes.

    Args:
        autoencoder: A trained MONAI ``AutoencoderKL``.
        images: ``(N, C, *spatial)`` images in the autoencoder's input range.
        batch_size: Images per forward pass.

    Returns:
        The scale factor.
    """
    device = next(autoencoder.parameters()).device
    latents = [
        autoencoder.encode(images[i : i + batch_size].to(device))[0].float().cpu() for i in range(0, images.shape[0], batch_size)
    ]
    std = torch.cat(latents).std()
    return float(1.0 / std.clamp_min(1e-6))


@torch.no_grad()
def decode_latents(
    autoencoder: AutoencoderKL,
    z: torch.Tensor,
    *,
    tile: Sequence[int] | None = None,
    overlap: float = 0.25,
) -> torch.Tensor:
    """Decode latents ``z``, in overlapping tiles when ``tile`` (a latent-grid size) is smaller than ``z``.

    Tiles are blended with Gaussian weights, so a volume too large for the GPU in one pass still
    decodes. The decoder's group normalisation then sees one tile at a time, so tiled output is
    close to, not identical with, a decode in one pass.

    Args:
        autoencoder: The MONAI ``AutoencoderKL``.
        z: ``(N, C, *latent_spatial)`` unscaled latents.
        tile: Latent-grid size of a tile; ``None`` decodes in one pass.
        overlap: Fraction of a tile shared with its neighbours.

    Returns:
        ``(N, C_image, *spatial)`` decoded images.
    """
    if tile is None or all(t >= s for t, s in zip(tile, z.shape[2:])):
        return autoencoder.decode(z)
    return cast(
        torch.Tensor,
        sliding_window_inference(
            z, roi_size=list(tile), sw_batch_size=1, predictor=autoencoder.decode, overlap=overlap, mode="gaussian"
        ),
    )
