"""A feature encoder trained on the real training data alone (SimCLR-style contrastive learning).

Fréchet distance, KID and feature-space privacy checks need image features. ImageNet or
RadImageNet weights cannot be downloaded in many hospitals, so medsynth learns its own encoder
from the real training split and stores it with the dataset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from medsynth.data import LabelledArrays, infinite_batches
from medsynth.training.loop import train
from medsynth.transforms import random_views


class FeatureEncoder(nn.Module):
    """Strided convolutions and global average pooling: ``(N, C, *spatial) -> (N, channels[-1])``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels.
        channels: Output channels of each stride-2 block; the last is the feature size.
    """

    def __init__(self, *, spatial_dims: int, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            blocks.append(
                Convolution(
                    spatial_dims,
                    previous,
                    width,
                    strides=2,
                    kernel_size=3,
                    norm=("group", {"num_groups": min(8, width)}),
                    act="SWISH",
                )
            )
            previous = width
        self.body = nn.Sequential(*blocks)
        self.feature_dim = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(2).mean(dim=2)


class _Contrastive(nn.Module):
    def __init__(self, encoder: FeatureEncoder, projection_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = nn.Sequential(
            nn.Linear(encoder.feature_dim, encoder.feature_dim), nn.SiLU(), nn.Linear(encoder.feature_dim, projection_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Normalised temperature-scaled cross-entropy (Chen et al. 2020) for two views of one batch.

    Each view must pick out its partner among the other ``2N - 1`` embeddings by cosine similarity.
    """
    n = z1.shape[0]
    # cosine similarities of all 2N embeddings, self-pairs excluded
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    similarity = (z @ z.T) / temperature
    similarity.fill_diagonal_(float("-inf"))
    # the positive of view i is view i + N, and back
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(similarity, positives)


def train_encoder(
    data: LabelledArrays,
    *,
    spatial_dims: int,
    channels: Sequence[int] = (16, 32, 64),
    steps: int = 150,
    batch_size: int = 32,
    lr: float = 1e-3,
    temperature: float = 0.2,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> FeatureEncoder:
    """Train a :class:`FeatureEncoder` contrastively on ``data.images``.

    Args:
        data: Real training images (labels are ignored).
        spatial_dims: 2 or 3.
        channels: Encoder widths.
        steps: Optimiser steps.
        batch_size: Images per step (two views each).
        lr: AdamW learning rate.
        temperature: NT-Xent temperature.
        seed: Seed for initialisation, batches and augmentations.
        device: Where to train.
        progress: Show a progress bar.

    Returns:
        The trained encoder, in eval mode on the CPU.
    """
    torch.manual_seed(seed)
    model = _Contrastive(FeatureEncoder(spatial_dims=spatial_dims, channels=channels), projection_dim=32).to(device)
    augment = torch.Generator().manual_seed(seed + 1)
    batches = infinite_batches(data, batch_size=batch_size, seed=seed)

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
        images = batch[0]
        v1, v2 = random_views(images, generator=augment), random_views(images, generator=augment)
        return nt_xent(m(v1.to(device)), m(v2.to(device)), temperature=temperature)

    train(
        model,
        loss_fn=loss_fn,
        batches=batches,
        optimizer=torch.optim.AdamW(model.parameters(), lr=lr),
        max_steps=steps,
        progress=progress,
        desc="encoder",
    )
    return model.encoder.cpu().eval()


@torch.no_grad()
def encode(encoder: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Features of ``(N, C, *spatial)`` images, computed in batches where the encoder's weights are.

    Volumes with a 2D encoder (2.5D) are :func:`medsynth.evaluation.instruments.features`' business.

    Args:
        encoder: The feature encoder.
        images: ``(N, C, *spatial)`` images, on any device.
        batch_size: Images per forward pass.

    Returns:
        ``(N, D)`` features on the CPU.
    """
    encoder.eval()
    device = next(encoder.parameters()).device
    return torch.cat([encoder(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])
