"""A network wrapped with its conditioning, so loss, sampler, EMA and checkpoints see one module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medsynth import ConfigError

CONDITIONING_MODES: tuple[str, ...] = ("mask",)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Map model-space intensities in [-1, 1] to dataset intensities in [0, 1]."""
    return (x + 1.0) * 0.5


def from_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Map dataset intensities in [0, 1] to the model's [-1, 1]."""
    return x * 2.0 - 1.0


class Denoiser(nn.Module):
    """A diffusion network plus the rule that feeds it its condition.

    ``conditioning="mask"``: the label map, one-hot encoded, is concatenated to the noisy image
    along the channel axis, so the network learns an image *for a given label map*.

    Args:
        network: Maps ``(x, timesteps)`` to a tensor shaped like the image, for example MONAI's
            ``DiffusionModelUNet`` with ``in_channels = image_channels + num_classes``.
        conditioning: One of :data:`CONDITIONING_MODES`.
        num_classes: Number of label values including background.
    """

    def __init__(self, network: nn.Module, *, conditioning: str, num_classes: int) -> None:
        super().__init__()
        if conditioning not in CONDITIONING_MODES:
            raise ConfigError(f"model.conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background and one label), got {num_classes}")
        self.network = network
        self.conditioning = conditioning
        self.num_classes = num_classes

    @staticmethod
    def in_channels(*, conditioning: str, image_channels: int, num_classes: int) -> int:
        """Input channels the wrapped network needs for this conditioning mode."""
        if conditioning not in CONDITIONING_MODES:
            raise ConfigError(f"model.conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}")
        return image_channels + num_classes

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Predict the scheduler's target for noisy images ``x`` at ``timesteps`` given ``label``.

        Args:
            x: ``(N, C, *spatial)`` noisy images.
            timesteps: ``(N,)`` integer timesteps.
            label: ``(N, 1, *spatial)`` integer label maps.

        Returns:
            ``(N, C, *spatial)`` prediction.
        """
        one_hot = F.one_hot(label[:, 0].long(), self.num_classes).movedim(-1, 1).to(x.dtype)
        return self.network(torch.cat([x, one_hot], dim=1), timesteps)
