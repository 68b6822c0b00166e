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


def link_checkpoint(source: str | os.PathLike[str], name: str | os.PathLike[str]) -> Path:
    """Point ``name`` (``last.pt``, ``best.pt``) at the checkpoint ``source`` without copying it.

    A hard link is made under a temporary name and renamed over ``name``, so ``name`` always holds
    a complete checkpoint; a copy is made where the file system has no hard links.
    """
    import shutil

    source, name = Path(source), Path(name)
    with atomic_path(name) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    return name


def prune_checkpoints(folder: str | os.PathLike[str], *, keep: int, pattern: str = "step_*.pt") -> list[Path]:
    """Delete all but the newest ``keep`` step checkpoints (names sort by step); return those deleted.

    ``last.pt`` and ``best.pt`` are separate links and survive the deletion of their step file.
    """
    steps = sorted(Path(folder).glob(pattern))
    doomed = steps[: max(0, len(steps) - keep)]
    for path in doomed:
        path.unlink()
    return doomed


def save_step_checkpoint(
    folder: str | os.PathLike[str], step: int, state: dict[str, Any], *, best: bool, keep: int
) -> Path:
    """Write ``step_<step>.pt``, point ``last.pt`` (and ``best.pt`` when ``best``) at it, keep the newest ``keep`` steps.

    Args:
        folder: The run's checkpoint folder.
        step: The optimiser step the state is at.
        state: What to store (see :func:`save_checkpoint`).
        best: Whether this step has the best validation loss so far.
        keep: Step checkpoints kept besides ``last.pt`` and ``best.pt``.

    Returns:
        The path of the step checkpoint.
    """
    folder = Path(folder)
    path = save_checkpoint(folder / f"step_{step:07d}.pt", state)
    link_checkpoint(path, folder / "last.pt")
    if best:
        link_checkpoint(path, folder / "best.pt")
    prune_checkpoints(folder, keep=keep)
    return path
