"""What a training run updates and a checkpoint restores: the model, its EMA, the optimiser,
the LR schedule, the gradient scaler, the step and the best validation loss."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from medsynth import MedsynthError
from medsynth.config.settings import TrainerSettings
from medsynth.training.build import build_optimizer
from medsynth.training.checkpoint import (
    check_lr_scheduler_state,
    check_number,
    check_optimizer_state,
    check_plain,
    check_state_dict,
)
from medsynth.training.ema import EMA
from medsynth.training.loop import warmup_cosine


@dataclasses.dataclass
class TrainingState:
    """The objects a training run updates, and their checkpoint.

    Attributes:
        model: The model being trained (not its DDP or compiled wrapper).
        ema: Its exponential moving average, which is what samples.
        optimizer: Over the model's trainable parameters.
        lr_scheduler: Linear warm-up then cosine decay, stepped per optimiser step.
        scaler: The gradient scaler of ``fp16`` training, else ``None``.
        step: Optimiser steps taken.
        best_val_loss: The lowest validation loss of the run so far.
    """

    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None = None
    step: int = 0
    best_val_loss: float = math.inf

    @classmethod
    def create(cls, model: nn.Module, trainer: TrainerSettings, *, device: torch.device) -> TrainingState:
        """A fresh state for ``model`` (already on ``device`` in its memory layout) as ``trainer`` configures it.

        Args:
            model: The model to train; its frozen parameters are left out of the optimiser.
            trainer: Optimiser, LR schedule, EMA decay and precision.
            device: Where the model trains (the scaler's device type).

        Returns:
            The state at step 0.
        """
        optimizer = build_optimizer(trainer.optimizer, [p for p in model.parameters() if p.requires_grad])
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            functools.partial(
                warmup_cosine,
                warmup_steps=trainer.warmup_steps,
                max_steps=trainer.max_steps,
                min_factor=trainer.min_lr_factor,
            ),
        )
        scaler = torch.amp.GradScaler(device.type) if trainer.precision == "fp16" else None
        return cls(model, EMA(model, decay=trainer.ema_decay), optimizer, lr_scheduler, scaler)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's training part: ``model``, ``ema``, ``optimizer``, ``lr_scheduler``, ``scaler``,
        ``step`` and ``best_val_loss``."""
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "step": self.step,
            "best_val_loss": self.best_val_loss,
        }

    def load_state_dict(self, state: Mapping[str, Any], *, where: str | None = None) -> None:
        """Continue from a checkpoint written from :meth:`state_dict`.

        Everything is checked before anything is restored: the model and EMA weights must be
        exactly this model's tensors (names, shapes, dtypes), the optimiser, LR-schedule and
        scaler states plain data that fits them, the step and counters numbers.

        Args:
            state: The loaded checkpoint.
            where: The checkpoint, for messages (default: the file a
                :func:`~medsynth.training.checkpoint.load_checkpoint` result remembers).

        Raises:
            MedsynthError: One line naming the file and the key at fault.
        """
        where = where or f"checkpoint {getattr(state, 'path', '(in memory)')}"
        missing = [k for k in ("model", "ema", "optimizer", "lr_scheduler", "step") if k not in state]
        if missing:
            raise MedsynthError(f"{where} is not a medsynth training checkpoint: it lacks {missing}")
        model = check_state_dict(self.model, state["model"], where=f"{where}: model")
        ema = state["ema"]
        if not isinstance(ema, Mapping) or set(ema) != {"shadow", "updates", "decay"}:
            raise MedsynthError(f"{where}: ema must be a mapping with keys decay, shadow, updates")
        shadow = check_state_dict(self.ema.shadow, ema["shadow"], where=f"{where}: ema.shadow")
        updates = check_number(ema["updates"], where=f"{where}: ema.updates", integer=True, low=0)
        decay = check_number(ema["decay"], where=f"{where}: ema.decay", low=0.0, high=1.0)
        check_optimizer_state(self.optimizer, state["optimizer"], where=f"{where}: optimizer")
        check_lr_scheduler_state(self.lr_scheduler, state["lr_scheduler"], where=f"{where}: lr_scheduler")
        scaler = state.get("scaler") or {}
        check_plain(scaler, where=f"{where}: scaler")
        if self.scaler is not None and scaler:
            expected = self.scaler.state_dict()
            if not isinstance(scaler, Mapping) or set(scaler) != set(expected):
                raise MedsynthError(f"{where}: scaler must be a mapping with keys {sorted(expected)}")
            for key, value in scaler.items():
                check_number(value, where=f"{where}: scaler.{key}")
        step = check_number(state["step"], where=f"{where}: step", integer=True, low=0)
        best = check_number(state.get("best_val_loss", math.inf), where=f"{where}: best_val_loss")

        self.model.load_state_dict(model)
        self.ema.load_state_dict({"shadow": shadow, "updates": updates, "decay": decay})
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler is not None and scaler:
            self.scaler.load_state_dict(dict(scaler))
        self.step = int(step)
        self.best_val_loss = float(best)

    def record_validation(self, val_loss: float) -> bool:
        """Note a validation loss; whether it is the best so far."""
        improved = val_loss < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, val_loss)
        return improved
