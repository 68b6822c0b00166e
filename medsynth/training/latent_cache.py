"""Latent diffusion trains on latents encoded once, not on every batch.

The autoencoder is frozen while the diffusion model trains, so the latent of a training image
never changes: encoding each batch at every step repeats the same work. The training set is
encoded once, in every orientation the flip augmentation can produce (the flips act on the image,
before the encoder, exactly as without the cache), and the steps draw their batches from those
latents with the same indices and flips as :func:`medsynth.data.infinite_batches`.

The cache is kept beside the checkpoints as ``latent_cache.pt`` (tensors only), named by a hash
of the autoencoder's weights, the latent scale, the training images and the flip axes; a resumed
run with the same hash reads it instead of encoding again, anything else encodes afresh.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from medsynth.data import LabelledArrays
from medsynth.data.dataset import batch_draws, flip_where
from medsynth.diffusion import Denoiser
from medsynth.io.atomic import atomic_path
from medsynth.progress import progress_bar

log = logging.getLogger("medsynth")

CACHE_FILE = "latent_cache.pt"


def flip_variants(flip_dims: Sequence[int]) -> list[tuple[bool, ...]]:
    """Every combination of flips along ``flip_dims``; variant ``v`` flips axis ``i`` when bit ``i`` of ``v`` is set."""
    return [tuple(bool(v >> i & 1) for i in range(len(flip_dims))) for v in range(2 ** len(flip_dims))]


def cache_key(model: Denoiser, data: LabelledArrays, flip_dims: Sequence[int]) -> str:
    """SHA-256 of what the cached latents depend on: autoencoder weights, latent scale, images, flip axes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.autoencoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    digest.update(repr((float(model.latent_scale), list(flip_dims), tuple(data.images.shape))).encode())
    digest.update(data.images.to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def encode_training_set(
    model: Denoiser,
    data: LabelledArrays,
    *,
    flip_dims: Sequence[int],
    device: torch.device,
    batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """The scaled latents of every training image in every flip orientation.

    Returns:
        ``(variants, N, C, *latent)`` float32 on the CPU, variants as :func:`flip_variants`.
    """
    variants = flip_variants(flip_dims)
    out: torch.Tensor | None = None
    bar = progress_bar(total=len(variants) * len(data), desc="latent cache", unit="image", enabled=progress)
    model.autoencoder.eval()
    for v, flips in enumerate(variants):
        for start in range(0, len(data), batch_size):
            images = data.images[start : start + batch_size]
            for axis, flip in zip(flip_dims, flips):
                images = images.flip(axis + 2) if flip else images
            z = model.to_sample(images.to(device), data.labels[start : start + batch_size].to(device)).float().cpu()
            if out is None:
                out = torch.empty((len(variants), len(data), *z.shape[1:]), dtype=torch.float32)
            out[v, start : start + len(z)] = z
            bar.update(len(z))
    bar.close()
    assert out is not None
    return out


def latent_cache(
    model: Denoiser,
    data: LabelledArrays,
    *,
    flip_dims: Sequence[int],
    device: torch.device,
    folder: str | os.PathLike[str],
    save: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """The cached latents of ``data`` for ``model``'s autoencoder: read from ``folder`` when its hash matches, else encoded.

    Args:
        model: A latent denoiser with its trained autoencoder and latent scale.
        data: The training split.
        flip_dims: ``trainer.flip_dims``.
        device: Where to encode.
        folder: The checkpoint folder (``latent_cache.pt`` lives there).
        save: Whether to write the cache (rank 0 only).
        progress: Show a progress bar while encoding.

    Returns:
        ``(variants, N, C, *latent)`` latents, as :func:`encode_training_set`.
    """
    key = cache_key(model, data, flip_dims)
    path = Path(folder) / CACHE_FILE
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(stored, dict) and stored.get("key") == key and isinstance(stored.get("latents"), torch.Tensor):
                log.info("train: %d cached latents read from %s", stored["latents"].shape[1], path)
                return stored["latents"]
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
            log.warning("train: ignoring the unreadable latent cache %s (%s); encoding again", path, err)
    latents = encode_training_set(model, data, flip_dims=flip_dims, device=device, progress=progress)
    if save:
        try:
            with atomic_path(path) as tmp:
                torch.save({"key": key, "latents": latents}, tmp)
        except (OSError, RuntimeError) as err:  # torch reports a full disk as RuntimeError
            log.warning("train: could not keep the latent cache at %s (%s); a resumed run encodes again", path, err)
    log.info("train: %d training images encoded once (%d flip orientations) -> %s", len(data), latents.shape[0], path)
    return latents


def cached_latent_batches(
    latents: torch.Tensor, data: LabelledArrays, *, batch_size: int, seed: int, flip_dims: Sequence[int], start_step: int = 0
) -> Iterator[tuple[torch.Tensor, ...]]:
    """``(latents, labels, codes)`` batches: the draws of :func:`medsynth.data.infinite_batches`, latents from the cache.

    Each example's latent is the one encoded from its image in the orientation the step's flips
    give it; its label map is flipped the same way.
    """
    weights = torch.tensor([1 << i for i in range(len(flip_dims))], dtype=torch.long)
    for idx, flips in batch_draws(len(data), batch_size=batch_size, seed=seed, flip_dims=flip_dims, start_step=start_step):
        variant = (torch.stack(flips, dim=1).long() * weights).sum(dim=1) if flips else torch.zeros(len(idx), dtype=torch.long)
        labels = data.labels[idx]
        for axis, flip in zip(flip_dims, flips):
            labels = flip_where(labels, flip, axis)
        yield latents[variant, idx], labels, data.codes[idx]


__all__ = ["CACHE_FILE", "cache_key", "cached_latent_batches", "encode_training_set", "flip_variants", "latent_cache"]
