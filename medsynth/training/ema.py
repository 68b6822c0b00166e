"""Exponential moving average of model weights, used for sampling."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps ``shadow = decay_k * shadow + (1 - decay_k) * weights`` after each optimiser step.

    The decay warms up as ``decay_k = min(decay, (1 + k) / (10 + k))`` for update ``k``, so a
    short run is not dominated by its random initial weights.

    Args:
        model: The model being trained; a frozen copy becomes the shadow.
        decay: Decay once warmed up, in [0, 1).
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"trainer.ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """Decay the next update will use."""
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow weights towards ``model``'s; buffers are copied."""
        d = self.current_decay()
        for shadow, param in zip(self.shadow.parameters(), model.parameters(), strict=True):
            if param.requires_grad:  # frozen parts (a latent model's autoencoder) never change
                shadow.lerp_(param.detach(), 1.0 - d)
        for shadow_buffer, buf in zip(self.shadow.buffers(), model.buffers(), strict=True):
            shadow_buffer.copy_(buf)
        self.updates += 1

    def state_dict(self) -> dict:
        """Shadow weights and the update count."""
        return {"shadow": self.shadow.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`."""
        self.shadow.load_state_dict(state["shadow"])
        self.updates = int(state["updates"])
        self.decay = float(state["decay"])
