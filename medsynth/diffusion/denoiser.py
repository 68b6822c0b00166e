"""A network wrapped with its conditioning, so loss, sampler, EMA and checkpoints see one module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medsynth import ConfigError

CONDITIONING_MODES: tuple[str, ...] = ("mask", "joint")


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Map model-space intensities in [-1, 1] to dataset intensities in [0, 1]."""
    return (x + 1.0) * 0.5


def from_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Map dataset intensities in [0, 1] to the model's [-1, 1]."""
    return x * 2.0 - 1.0


class Denoiser(nn.Module):
    """A diffusion network plus the rule that ties it to the label map.

    - ``mask``: the label map, one-hot encoded, is concatenated to the noisy image along the
      channel axis; the network learns an image *for a given label map*.
    - ``joint``: image and one-hot label map (scaled to [-1, 1]) are one diffusion variable; the
      network generates a *labelled pair from noise*, so no patient's label map is reused.

    Args:
        network: Maps ``(x, timesteps)`` to a tensor with :meth:`generated_channels` channels, for
            example MONAI's ``DiffusionModelUNet`` with :meth:`in_channels` input channels.
        conditioning: One of :data:`CONDITIONING_MODES`.
        num_classes: Number of label values including background.
        image_channels: Channels of the image.
    """

    def __init__(self, network: nn.Module, *, conditioning: str, num_classes: int, image_channels: int = 1) -> None:
        super().__init__()
        _check_mode(conditioning)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background and one label), got {num_classes}")
        self.network = network
        self.conditioning = conditioning
        self.num_classes = num_classes
        self.image_channels = image_channels

    @staticmethod
    def in_channels(*, conditioning: str, image_channels: int, num_classes: int) -> int:
        """Input channels the wrapped network needs for this conditioning mode."""
        _check_mode(conditioning)
        return image_channels + num_classes

    @staticmethod
    def generated_channels(*, conditioning: str, image_channels: int, num_classes: int) -> int:
        """Channels of the diffusion variable (and of the network's output)."""
        _check_mode(conditioning)
        return image_channels + (num_classes if conditioning == "joint" else 0)

    @property
    def sample_channels(self) -> int:
        """Channels of this model's diffusion variable."""
        return self.generated_channels(
            conditioning=self.conditioning, image_channels=self.image_channels, num_classes=self.num_classes
        )

    def to_sample(self, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The clean diffusion variable x0 in model range for ``image`` in [0, 1] and its ``label`` map."""
        x0 = from_unit_range(image)
        if self.conditioning == "joint":
            x0 = torch.cat([x0, from_unit_range(self._one_hot(label, x0.dtype))], dim=1)
        return x0

    def condition(self, label: torch.Tensor) -> torch.Tensor | None:
        """What the network is given besides the noisy sample: the label map for ``mask``, nothing for ``joint``."""
        return label if self.conditioning == "mask" else None

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A generated sample as ``(image in [0, 1], label map or None)``; ``joint`` labels are the argmax of their channels."""
        image = to_unit_range(x[:, : self.image_channels]).clamp(0.0, 1.0)
        if self.conditioning != "joint":
            return image, None
        return image, x[:, self.image_channels :].argmax(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the scheduler's target for noisy samples ``x`` at ``timesteps``.

        Args:
            x: ``(N, C, *spatial)`` noisy samples (C = :meth:`generated_channels`).
            timesteps: ``(N,)`` integer timesteps.
            label: ``(N, 1, *spatial)`` integer label maps for ``mask``; ignored for ``joint``.

        Returns:
            ``(N, C, *spatial)`` prediction.
        """
        if self.conditioning == "mask":
            if label is None:
                raise ValueError("mask conditioning needs a label map")
            x = torch.cat([x, self._one_hot(label, x.dtype)], dim=1)
        return self.network(x, timesteps)

    def _one_hot(self, label: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.one_hot(label[:, 0].long(), self.num_classes).movedim(-1, 1).to(dtype)


def _check_mode(conditioning: str) -> None:
    if conditioning not in CONDITIONING_MODES:
        raise ConfigError(f"model.conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}")
