"""The training loop: one optimiser step per batch, EMA, clipping, LR schedule, progress, logging."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from medsynth.progress import progress_bar
from medsynth.training.ema import EMA

Batch = Any
"""What one step trains on: whatever ``batches`` yields and ``loss_fn`` (or ``gradient_fn``) takes; opaque to the loop."""


@dataclasses.dataclass
class TrainResult:
    """What a finished run reports.

    Attributes:
        steps: Optimiser steps taken.
        losses: Loss of every step, in order.
        examples: Examples seen (images or volumes).
        seconds: Wall time of the loop.
    """

    steps: int
    losses: list[float]
    examples: int
    seconds: float

    @property
    def examples_per_second(self) -> float:
        """Training throughput in examples per second."""
        return self.examples / max(self.seconds, 1e-9)


def warmup_cosine(step: int, *, warmup_steps: int, max_steps: int, min_factor: float = 0.1) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup_steps``, then cosine decay to ``min_factor``.

    Args:
        step: Current optimiser step (0-based).
        warmup_steps: Length of the warm-up.
        max_steps: Total steps of the run.
        min_factor: Multiplier reached at ``max_steps``.

    Returns:
        The multiplier for this step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train(
    model: nn.Module,
    *,
    loss_fn: Callable[[nn.Module, Batch, int], torch.Tensor],
    batches: Iterator[Batch],
    optimizer: torch.optim.Optimizer,
    max_steps: int,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ema: EMA | None = None,
    grad_clip: float | None = 1.0,
    accumulate: int = 1,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    progress: bool = True,
    desc: str = "train",
    start_step: int = 0,
    gradient_fn: Callable[[nn.Module, Batch, int], tuple[float, int]] | None = None,
) -> TrainResult:
    """Run optimiser steps ``start_step + 1`` to ``max_steps``.

    Args:
        model: The module being trained.
        loss_fn: ``loss_fn(model, batch, draw)`` returns the scalar loss of one batch; ``draw`` is
            the 1-based index of the batch in the run (``step`` when ``accumulate`` is 1). Seed
            per-batch randomness from it so a resumed run repeats it exactly.
        batches: Endless iterator of batches, positioned at batch ``start_step * accumulate``.
        optimizer: Optimiser over ``model``'s parameters.
        max_steps: Step count at the end of the run.
        lr_scheduler: Stepped after every optimiser step.
        ema: Updated after every optimiser step.
        grad_clip: Largest gradient norm; ``None`` disables clipping.
        accumulate: Batches whose gradients are averaged into one optimiser step.
        precision: ``fp32``, or ``bf16`` / ``fp16`` autocast for the forward pass and loss.
        scaler: Gradient scaler, required for ``fp16`` (keep it to checkpoint its state).
        on_step: Called as ``on_step(step, loss, lr)`` after each step (1-based step; loss averaged
            over the accumulated batches); it may evaluate or checkpoint, the model is put back in
            train mode before the next step.
        progress: Show a progress bar with step, loss and rate.
        desc: Label of the progress bar.
        start_step: Steps already taken (when resuming).
        gradient_fn: Replaces the forward and backward passes of ``loss_fn``: called as
            ``gradient_fn(model, batch, step)`` with one batch per step, it sets the parameters'
            ``.grad`` itself and returns the step's loss and number of examples (DP-SGD:
            :func:`medsynth.training.dp_sgd.private_gradient`; needs ``accumulate=1`` and no scaler).

    Returns:
        Steps taken in this call, their losses and wall time.
    """
    if max_steps < 1:
        raise ValueError(f"trainer.max_steps must be >= 1, got {max_steps}")
    if accumulate < 1:
        raise ValueError(f"trainer.accumulate must be >= 1, got {accumulate}")
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and scaler is None:
        raise ValueError("fp16 training needs a GradScaler")
    if gradient_fn is not None and (accumulate != 1 or scaler is not None):
        raise ValueError("a gradient_fn takes one batch per step and no gradient scaler")
    dtype = PRECISIONS[precision]
    device_type = next(model.parameters()).device.type
    losses: list[float] = []
    examples = 0
    bar = progress_bar(total=max_steps, initial=start_step, desc=desc, unit="step", enabled=progress)
    start = time.perf_counter()
    for step in range(start_step + 1, max_steps + 1):
        model.train()
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        if gradient_fn is not None:
            with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
                total, count = gradient_fn(model, next(batches), step)
            examples += count
        for micro in range(accumulate if gradient_fn is None else 0):
            batch = next(batches)
            with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn(model, batch, (step - 1) * accumulate + micro + 1)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower trainer.lr")
            scaled = loss / accumulate
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            total += float(loss.detach())
            examples += _examples(batch)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        if lr_scheduler is not None:
            lr_scheduler.step()
        if ema is not None:
            ema.update(model)
        value = total / accumulate
        losses.append(value)
        if on_step is not None:
            on_step(step, value, lr)
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{value:.4f}", img_s=f"{examples / max(elapsed, 1e-9):.1f}")
        bar.update(1)
    bar.close()
    return TrainResult(steps=len(losses), losses=losses, examples=examples, seconds=time.perf_counter() - start)


def _examples(batch: object) -> int:
    """Examples in a batch: the first dimension of its (first) tensor."""
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if isinstance(first, torch.Tensor) else 0
