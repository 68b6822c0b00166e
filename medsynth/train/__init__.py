"""The training loop and what it needs: EMA weights, LR schedule, checkpoints."""

from __future__ import annotations

from medsynth.train.checkpoint import file_sha256, link_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from medsynth.train.ema import EMA
from medsynth.train.loop import TrainResult, train, warmup_cosine

__all__ = [
    "EMA",
    "TrainResult",
    "file_sha256",
    "link_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
    "train",
    "warmup_cosine",
]
