"""The training loop and what it needs: EMA weights, LR schedule, checkpoints, the optimiser
and resume rules, the latent autoencoder stage; also the networks the audit trains (feature
encoder, segmenter).

The package is ``medsynth.training`` so that ``medsynth.train`` stays the train stage function.
"""

from __future__ import annotations

from medsynth.training.checkpoint import (
    file_sha256,
    link_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    save_step_checkpoint,
)
from medsynth.training.ema import EMA
from medsynth.training.loop import TrainResult, train, warmup_cosine

__all__ = [
    "EMA",
    "TrainResult",
    "file_sha256",
    "link_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
    "save_step_checkpoint",
    "train",
    "warmup_cosine",
]
