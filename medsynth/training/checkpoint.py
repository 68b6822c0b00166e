"""Checkpoints: state dicts plus the resolved config, written atomically, loaded weights-only.

A checkpoint is data from outside. ``weights_only=True`` stops pickled code; the checks here stop
the rest before anything is used: :func:`check_state_dict` takes weights only when they are
exactly the tensors a module holds (same names, shapes and dtypes), and :func:`check_plain`,
:func:`check_optimizer_state` and :func:`check_lr_scheduler_state` take the training state only
as plain containers that fit the objects they restore. Each refusal is one line naming the file
and the key.

A checkpoint is also a file a crash or a failing disk can damage: it is written to a temporary name
and renamed into place (a full disk is one line, and ``last.pt`` keeps the last good step), and
:func:`load_checkpoint` checks the archive's checksums, so a truncated or corrupted file is refused
as :class:`DamagedCheckpointError` instead of loading wrong weights.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import math
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medsynth import MedsynthError
from medsynth.io import DiskFullError, atomic_path

_MAX_DEPTH = 32
"""Nesting deeper than this is not a checkpoint medsynth wrote."""


STEP_PATTERN = "step_*.pt"
"""The names of step checkpoints (``step_0000040.pt``); they sort by step."""


class DamagedCheckpointError(MedsynthError):
    """A checkpoint file that cannot be read back whole: truncated, corrupted, or not a checkpoint archive."""


class Checkpoint(dict):
    """A loaded checkpoint: its top-level mapping, and the file it came from (``path``), so checks
    made later (resuming, say) can name the file.

    It saves as a plain mapping (an ``OrderedDict``), so a loaded checkpoint saved again still
    loads with ``weights_only=True``.
    """

    path: Path

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return (collections.OrderedDict, (), None, None, iter(self.items()))


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, state dicts and plain Python values only) to ``path`` atomically.

    Args:
        path: Destination, for example ``checkpoints/last.pt``.
        state: What to store; must load with ``weights_only=True``.

    Returns:
        The destination path.

    Raises:
        DiskFullError: If the disk fills while writing; ``path`` keeps what it held.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # through a file object: a full disk is an OSError
        try:
            torch.save(state, fh)
        except RuntimeError as err:  # torch's archive writer, closing after a failed write, hides the OSError
            if isinstance(err.__context__, OSError):
                raise err.__context__ from None
            raise
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a checkpoint with ``weights_only=True`` onto the CPU.

    The archive's checksums are verified, so a truncated or corrupted file is refused rather
    than loaded with wrong weights. Only its top level is checked here (a mapping with string
    keys); each user checks the parts it reads (see :func:`check_state_dict`).

    Args:
        path: The checkpoint file.

    Returns:
        Its mapping, which remembers ``path``.

    Raises:
        DamagedCheckpointError: If the file cannot be read back whole (truncated, corrupted, foreign).
        MedsynthError: If the file is missing or not a mapping of names.
    """
    path = Path(path)
    if not path.is_file():
        raise MedsynthError(f"checkpoint not found: {path}: run `medsynth train` first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise DamagedCheckpointError(f"cannot load checkpoint {path}: {_one_line(str(err))}") from None
    damage = _damage(path)
    if damage:
        raise DamagedCheckpointError(f"checkpoint {path} is damaged: {damage}; it was corrupted after it was written")
    if not isinstance(state, dict):
        raise MedsynthError(f"checkpoint {path} holds {_kind(state)}, not a medsynth checkpoint (a mapping of names to values)")
    odd = next((k for k in state if not isinstance(k, str)), None)
    if odd is not None:
        raise MedsynthError(f"checkpoint {path} has a key that is not a name: {_kind(odd)}")
    loaded = Checkpoint(state)
    loaded.path = path
    return loaded


def _damage(path: Path) -> str:
    """What fails the archive's own checks (each entry's CRC-32); ``""`` when it is whole."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"its archive cannot be read ({_one_line(str(err), 120)})"
    return f"the checksum of its entry {bad!r} does not match its data" if bad else ""


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` with its white space collapsed, cut to ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    """What ``value`` is, for a message: ``a list``, ``a str 'abc'``, ``None``."""
    if value is None:
        return "None"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (bool, int, float, str)):
        return f"a {type(value).__name__} {_one_line(repr(value), 60)}"
    return f"a {type(value).__name__}"


def check_state_dict(module: nn.Module, state: Any, *, where: str) -> dict[str, torch.Tensor]:
    """The weights ``state`` holds for ``module``, if they are exactly what it holds.

    ``module.load_state_dict`` casts dtypes and accepts any tensor-like value; this takes a
    mapping of exactly the module's keys, each a plain CPU tensor of exactly the module's shape
    and dtype, and nothing else.

    Args:
        module: The module the weights are for (built from the checkpoint's checked config).
        state: What the checkpoint holds for it.
        where: The file and key, for messages, e.g. ``checkpoint last.pt: ema.shadow``.

    Returns:
        The weights as a plain dict in the module's key order, ready for ``load_state_dict``.

    Raises:
        MedsynthError: One line naming ``where`` and the first key at fault: a missing or extra
            key, a value that is not a tensor, or a wrong shape or dtype.
    """
    expected = module.state_dict()
    if not isinstance(state, Mapping):
        raise MedsynthError(f"{where} must be a mapping of parameter names to tensors, got {_kind(state)}")
    odd = next((k for k in state if not isinstance(k, str)), None)
    if odd is not None:
        raise MedsynthError(f"{where} has a key that is not a parameter name: {_kind(odd)}")
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    for keys, what in ((missing, "lacks"), (extra, "has an unexpected key")):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise MedsynthError(f"{where} {what} {keys[0]!r}{more}: the weights do not fit the network its config describes")
    for key, want in expected.items():
        value = state[key]
        if type(value) not in (torch.Tensor, nn.Parameter) or value.layout != torch.strided or value.is_meta:
            raise MedsynthError(f"{where}[{key!r}] must be a tensor, got {_kind(value)}")
        if value.dtype != want.dtype:
            raise MedsynthError(f"{where}[{key!r}] has dtype {value.dtype}, expected {want.dtype}")
        if value.shape != want.shape:
            raise MedsynthError(
                f"{where}[{key!r}] has shape {list(value.shape)}, expected {list(want.shape)}: the "
                "weights do not fit the network its config describes"
            )
    return {key: state[key] for key in expected}


def load_weights(module: nn.Module, state: Any, *, where: str) -> nn.Module:
    """Load ``state`` into ``module`` after :func:`check_state_dict`; returns ``module``."""
    module.load_state_dict(check_state_dict(module, state, where=where))
    return module


def check_plain(value: Any, *, where: str, _depth: int = 0) -> None:
    """Refuse anything in ``value`` but plain data: mappings with string or integer keys, lists,
    tuples, tensors, numbers, strings, booleans and ``None``.

    Args:
        value: Part of a loaded checkpoint (an optimiser's state, say).
        where: The file and key, for messages.

    Raises:
        MedsynthError: Naming the first key that holds something else, or nests too deep.
    """
    if _depth > _MAX_DEPTH:
        raise MedsynthError(f"{where} nests deeper than {_MAX_DEPTH} levels: not a checkpoint medsynth wrote")
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if type(value) in (torch.Tensor, nn.Parameter):
        if value.layout != torch.strided or value.is_meta:
            raise MedsynthError(f"{where} must be a plain tensor, got a {value.layout} tensor on {value.device}")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise MedsynthError(f"{where} has a key that is neither a name nor an index: {_kind(key)}")
            check_plain(item, where=f"{where}[{key!r}]", _depth=_depth + 1)
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain(item, where=f"{where}[{i}]", _depth=_depth + 1)
        return
    raise MedsynthError(f"{where} must hold plain values (numbers, strings, tensors, lists, mappings), got {_kind(value)}")


def _plain_with_keys_of(current: Mapping[str, Any], state: Any, *, where: str) -> Mapping[str, Any]:
    """Refuse ``state`` unless it is plain data with exactly the keys of ``current``; return ``current``."""
    check_plain(state, where=where)
    if not isinstance(state, Mapping) or set(state) != set(current):
        raise MedsynthError(
            f"{where} must be a mapping with keys {sorted(current)}, got {_kind(state)}"
            + (f" with keys {sorted(map(str, state))}" if isinstance(state, Mapping) else "")
        )
    return current


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: Any, *, where: str) -> None:
    """Refuse an optimiser state that is not plain data fitting ``optimizer``.

    It must have the optimiser's ``state`` and ``param_groups``, the same number of groups, each
    with the same options and number of parameters, and per-parameter tensors (moments) of their
    parameter's shape and dtype.

    Args:
        optimizer: The optimiser the state is for.
        state: What the checkpoint holds for it.
        where: The file and key, for messages.

    Raises:
        MedsynthError: One line naming the key at fault.
    """
    current = _plain_with_keys_of(optimizer.state_dict(), state, where=where)
    groups, mine = state["param_groups"], current["param_groups"]
    if not isinstance(groups, (list, tuple)) or len(groups) != len(mine):
        raise MedsynthError(f"{where}['param_groups'] must be a list of {len(mine)} group(s), got {_kind(groups)}")
    for i, (group, own) in enumerate(zip(groups, mine)):
        at = f"{where}['param_groups'][{i}]"
        if not isinstance(group, Mapping) or set(group) != set(own):
            raise MedsynthError(
                f"{at} must have the options {sorted(own)} of {type(optimizer).__name__}, got {_kind(group)}"
                + (f" with {sorted(map(str, group))}" if isinstance(group, Mapping) else "")
            )
        ids = group["params"]
        if (
            not isinstance(ids, (list, tuple))
            or len(ids) != len(own["params"])
            or not all(isinstance(p, int) and not isinstance(p, bool) for p in ids)
        ):
            raise MedsynthError(f"{at}['params'] must list {len(own['params'])} parameter indices, got {_kind(ids)}")
    params = dict(
        zip(
            itertools.chain.from_iterable(g["params"] for g in groups),
            itertools.chain.from_iterable(g["params"] for g in optimizer.param_groups),
        )
    )
    per_param = state["state"]
    if not isinstance(per_param, Mapping):
        raise MedsynthError(f"{where}['state'] must be a mapping of parameter indices, got {_kind(per_param)}")
    for index, entry in per_param.items():
        at = f"{where}['state'][{index!r}]"
        if index not in params:
            raise MedsynthError(f"{at}: no parameter has that index in param_groups")
        if not isinstance(entry, Mapping):
            raise MedsynthError(f"{at} must be a mapping, got {_kind(entry)}")
        param = params[index]
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if value.shape != param.shape or value.dtype != param.dtype:
                    raise MedsynthError(
                        f"{at}[{name!r}] has shape {list(value.shape)} and dtype {value.dtype}, "
                        f"its parameter {list(param.shape)} and {param.dtype}"
                    )


def check_lr_scheduler_state(scheduler: Any, state: Any, *, where: str) -> None:
    """Refuse an LR-schedule state that is not plain data with ``scheduler``'s keys.

    A ``LambdaLR`` copies its saved ``lr_lambdas`` entries onto its functions' attributes, so
    those must equal the schedule's own.

    Args:
        scheduler: The LR schedule the state is for.
        state: What the checkpoint holds for it.
        where: The file and key, for messages.

    Raises:
        MedsynthError: One line naming the key at fault.
    """
    current = _plain_with_keys_of(scheduler.state_dict(), state, where=where)
    if "lr_lambdas" in current and state["lr_lambdas"] != current["lr_lambdas"]:
        raise MedsynthError(
            f"{where}['lr_lambdas'] must be {current['lr_lambdas']!r} (the schedule's own), got {_kind(state['lr_lambdas'])}"
        )
    for key in ("last_epoch", "_step_count"):
        if key in state and (not isinstance(state[key], int) or isinstance(state[key], bool)):
            raise MedsynthError(f"{where}[{key!r}] must be an integer, got {_kind(state[key])}")


def check_number(value: Any, *, where: str, integer: bool = False, low: float = -math.inf, high: float = math.inf) -> float:
    """``value`` if it is a number (an integer with ``integer``) in ``[low, high]``; booleans are refused.

    Raises:
        MedsynthError: Naming ``where`` and what was expected.
    """
    kinds = (int,) if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or not (low <= value <= high):
        what = "an integer" if integer else "a number"
        bounds = "" if (low, high) == (-math.inf, math.inf) else f" in [{low}, {high}]"
        raise MedsynthError(f"{where} must be {what}{bounds}, got {_kind(value)}")
    return value


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


def prune_checkpoints(folder: str | os.PathLike[str], *, keep: int, pattern: str = STEP_PATTERN) -> list[Path]:
    """Delete all but the newest ``keep`` step checkpoints (names sort by step); return those deleted.

    ``last.pt`` and ``best.pt`` are separate links and survive the deletion of their step file.
    """
    steps = sorted(Path(folder).glob(pattern))
    doomed = steps[: max(0, len(steps) - keep)]
    for path in doomed:
        path.unlink()
    return doomed


def save_step_checkpoint(folder: str | os.PathLike[str], step: int, state: dict[str, Any], *, best: bool, keep: int) -> Path:
    """Write ``step_<step>.pt``, point ``best.pt`` (when ``best``) and ``last.pt`` at it, keep the newest ``keep`` steps.

    ``best.pt`` moves before ``last.pt``: a run killed between the two resumes from the step
    before, repeats this step and moves both, so ``best.pt`` never lags a ``last.pt`` it should
    follow.

    Args:
        folder: The run's checkpoint folder.
        step: The optimiser step the state is at.
        state: What to store (see :func:`save_checkpoint`).
        best: Whether this step has the best validation loss so far.
        keep: Step checkpoints kept besides ``last.pt`` and ``best.pt``.

    Returns:
        The path of the step checkpoint.

    Raises:
        DiskFullError: If the disk fills; the message names the last good checkpoint, which is intact.
    """
    folder = Path(folder)
    try:
        path = save_checkpoint(folder / f"step_{step:07d}.pt", state)
        if best:
            link_checkpoint(path, folder / "best.pt")
        link_checkpoint(path, folder / "last.pt")
    except DiskFullError as err:
        raise DiskFullError(err.filename, err.strerror, err.errno, note=_last_good(folder)) from None
    prune_checkpoints(folder, keep=keep)
    return path


def _last_good(folder: Path) -> str:
    """Where a run stopped by a full disk can continue from, in words."""
    last = folder / "last.pt"
    if not last.is_file():
        return "there is no earlier checkpoint to continue from"
    step = next(
        (
            m.group(1)
            for p in sorted(folder.glob(STEP_PATTERN), reverse=True)
            if (m := re.fullmatch(r"step_(\d+)\.pt", p.name)) and same_file(p, last)
        ),
        None,
    )
    at = f" (step {int(step)})" if step is not None else ""
    return f"the last good checkpoint {last}{at} is intact: rerun with trainer.resume=auto to continue from it"


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths are one file (``last.pt`` is a hard link to its step), without raising."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
