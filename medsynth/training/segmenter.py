"""A small MONAI segmentation network, trained to judge label consistency and utility."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch import nn

from medsynth.compute import layout
from medsynth.data import LabelledArrays, infinite_batches
from medsynth.training.loop import train


def train_segmenter(
    data: LabelledArrays,
    *,
    num_classes: int,
    spatial_dims: int,
    channels: Sequence[int] = (16, 32, 64),
    steps: int = 150,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    flip_dims: Sequence[int] = (0,),
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    progress: bool = False,
    desc: str = "segmenter",
) -> nn.Module:
    """Train a MONAI ``UNet`` with Dice + cross-entropy on ``data``'s images and label maps.

    Args:
        data: Images and label maps to learn from.
        num_classes: Label values including background.
        spatial_dims: 2 or 3.
        channels: UNet widths (stride 2 between levels).
        steps: Optimiser steps.
        batch_size: Examples per step.
        lr: AdamW learning rate.
        seed: Seed for initialisation and batches.
        flip_dims: Spatial axes of random flip augmentation.
        device: Where to train.
        precision: ``fp32``, or ``bf16`` autocast for the forward pass and loss (the weights and
            the optimiser stay in float32).
        progress: Show a progress bar.
        desc: Progress bar label.

    Returns:
        The trained network, in eval mode on the CPU.
    """
    torch.manual_seed(seed)
    model = UNet(
        spatial_dims=spatial_dims,
        in_channels=data.images.shape[1],
        out_channels=num_classes,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=1,
    ).to(device)
    memory_format = layout(spatial_dims)
    model.to(memory_format=memory_format)  # type: ignore[call-overload]  # torch accepts it; its stubs lack the keyword
    criterion = DiceCELoss(to_onehot_y=True, softmax=True)
    batches = infinite_batches(data, batch_size=batch_size, seed=seed, flip_dims=flip_dims)

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
        images, labels, _ = batch
        return criterion(m(images.to(device, memory_format=memory_format)).float(), labels.to(device))

    train(
        model,
        loss_fn=loss_fn,
        batches=batches,
        optimizer=torch.optim.AdamW(model.parameters(), lr=lr),
        max_steps=steps,
        precision=precision,
        progress=progress,
        desc=desc,
    )
    return model.cpu().eval()


@torch.no_grad()
def segment(model: nn.Module, images: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """Label maps ``(N, 1, *spatial)`` predicted for ``(N, C, *spatial)`` images (argmax over classes)."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        model(images[i : i + batch_size].to(device)).argmax(dim=1, keepdim=True).cpu() for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)
