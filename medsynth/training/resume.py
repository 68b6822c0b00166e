"""Which checkpoint a training run continues from, and whether it may."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medsynth import MedsynthError
from medsynth.diffusion.generator import read_generator_state
from medsynth.training.checkpoint import STEP_PATTERN, Checkpoint, DamagedCheckpointError, load_checkpoint, same_file
from medsynth.training.privacy import read_privacy

log = logging.getLogger("medsynth")

CHECKED_SECTIONS: tuple[str, ...] = ("model", "scheduler")
"""Config sections a resumed run must share with its checkpoint (the trainer's may change, e.g. ``max_steps``)."""


def resume_state(
    resume: str | None, *, checkpoints: str | Path, config: Mapping[str, Any]
) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint ``trainer.resume`` asks to continue from, loaded; ``(None, None)`` for a fresh start.

    Args:
        resume: ``trainer.resume``: null or empty (fresh start), ``auto`` (``checkpoints/last.pt``
            when it exists, else a fresh start; a damaged ``last.pt`` falls back, with a warning,
            to the newest step checkpoint that reads back whole) or the path of a checkpoint.
        checkpoints: The run's checkpoint folder.
        config: The current ``{"model": ..., "scheduler": ...}`` as plain mappings.

    Returns:
        The checkpoint's path and its contents.

    The checkpoint's config and facts are checked as data first (allow-listed classes, plain
    values; see :func:`medsynth.diffusion.generator.read_generator_state`); its weights and training state
    are checked when they are restored (:meth:`medsynth.training.state.TrainingState.load_state_dict`).

    Raises:
        MedsynthError: For a named checkpoint that does not exist or is damaged, one whose config names a class
            off the allow-list or holds something but plain values (its ``privacy`` entry too), one made with another model
            or noise schedule (naming the differing section), or ``auto`` with no checkpoint that reads back whole.
    """
    if not resume:
        return None, None
    if resume == "auto":
        found = _newest_whole(Path(checkpoints))
        if found is None:
            return None, None
        path, state = found
    else:
        path = Path(resume)
        if not path.is_file():
            raise MedsynthError(f"trainer.resume={resume}: no checkpoint at {path}")
        state = load_checkpoint(path)
    saved = state.get("config")
    if not isinstance(saved, Mapping):
        raise MedsynthError(f"cannot resume from {path}: it is not a medsynth training checkpoint (no config)")
    # a checkpoint is data: its config may name only allow-listed classes, with plain values, and
    # the facts it carries (labels, image size, sampling, run id) must be well formed
    read_generator_state(state, where=str(path), required=("config",))
    read_privacy(state.get("privacy"), where=str(path))  # a DP record must be plain, well-formed data
    for section in CHECKED_SECTIONS:
        if saved.get(section) != config[section]:
            raise MedsynthError(f"cannot resume from {path}: it was trained with another `{section}` config")
    return path, state


def _newest_whole(folder: Path) -> tuple[Path, Checkpoint] | None:
    """``last.pt`` loaded, or when it is damaged the newest step checkpoint that loads whole (a warning
    names each damaged file); ``None`` when there is no ``last.pt``.

    Raises:
        MedsynthError: If ``last.pt`` and every step checkpoint are damaged.
    """
    last = folder / "last.pt"
    if not last.is_file():
        return None
    damaged: list[Path] = []
    for path in [last, *(p for p in sorted(folder.glob(STEP_PATTERN), reverse=True) if not same_file(p, last))]:
        try:
            state = load_checkpoint(path)
        except DamagedCheckpointError as err:
            log.warning("trainer.resume=auto: %s", err)
            damaged.append(path)
            continue
        if damaged:
            log.warning(
                "trainer.resume=auto: %s cannot be used; resuming from %s, the newest checkpoint that reads back whole",
                ", ".join(str(p) for p in damaged),
                path,
            )
        return path, state
    raise MedsynthError(
        f"trainer.resume=auto: {last} is damaged and no step checkpoint in {folder} reads back whole: "
        "delete them to train from the start, or set trainer.resume to a good checkpoint"
    )
