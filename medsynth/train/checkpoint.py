"""Checkpoints: state dicts plus the resolved config, written atomically, loaded weights-only."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from medsynth import MedsynthError
from medsynth.io import atomic_path


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, state dicts and plain Python values only) to ``path`` atomically.

    Args:
        path: Destination, for example ``checkpoints/last.pt``.
        state: What to store; must load with ``weights_only=True``.

    Returns:
        The destination path.
    """
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` onto the CPU.

    Raises:
        MedsynthError: If the file is missing or not a readable checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise MedsynthError(f"checkpoint not found: {path}: run `medsynth train` first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise MedsynthError(f"cannot load checkpoint {path}: {err}") from None


def file_sha256(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
