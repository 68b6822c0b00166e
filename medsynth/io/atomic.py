"""Atomic file writes: write to a temporary name in the same folder, then rename into place.

A crash mid-write leaves at most a stray temporary file (``.<name>.<8 hex>.tmp<suffixes>``),
never a half-written file under the final name; :func:`remove_temporaries` sweeps such debris
from a folder that no other run is writing to. A full disk (or quota) while writing raises
:class:`DiskFullError`: one line naming the file, and the file under the final name untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medsynth import MedsynthError

_FULL = (errno.ENOSPC, errno.EDQUOT)
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp(?:\.[^.]+)*$")
"""The names :func:`atomic_path` gives its temporary files."""


class DiskFullError(MedsynthError, OSError):
    """No space left (or the quota is spent) while writing a file.

    Both a :class:`~medsynth.MedsynthError` (the command line prints one line and exits with
    status 2) and an :class:`OSError` with ``errno`` ENOSPC or EDQUOT (code that handles a full
    disk itself still sees one).

    Args:
        path: The file that could not be written (its final name).
        reason: The system's words for it.
        code: ``errno.ENOSPC`` or ``errno.EDQUOT``.
        note: What the caller adds (where to continue from, say).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        reason: str | None = "No space left on device",
        code: int | None = errno.ENOSPC,
        *,
        note: str = "",
    ) -> None:
        super().__init__(code or errno.ENOSPC, reason or "No space left on device", str(path))
        self.note = note

    def __str__(self) -> str:
        name = Path(str(self.filename)).name
        return (
            f"no space left while writing {self.filename} ({self.strerror}): free space or choose a folder with room, "
            f"then rerun ({name} is unchanged)" + (f"; {self.note}" if self.note else "")
        )

    def with_note(self, note: str) -> DiskFullError:
        """The same error with ``note`` added to what it says."""
        return DiskFullError(self.filename, self.strerror, self.errno, note=f"{self.note}; {note}" if self.note else note)

    def __reduce__(self) -> tuple[Any, ...]:  # rebuilt whole when it crosses a process boundary
        return _rebuild_disk_full, (self.filename, self.strerror, self.errno, self.note)


def _rebuild_disk_full(path: str, reason: str, code: int, note: str) -> DiskFullError:
    """A pickled :class:`DiskFullError` again."""
    return DiskFullError(path, reason, code, note=note)


def temporary_name(final: Path) -> Path:
    """The temporary file :func:`atomic_path` writes before renaming it to ``final``.

    The name keeps the final suffixes (``x.nii.gz`` -> ``.x.<id>.tmp.nii.gz``) so libraries that
    choose a format from the extension behave the same.
    """
    suffixes = "".join(final.suffixes)
    stem = final.name[: len(final.name) - len(suffixes)] if suffixes else final.name
    return final.with_name(f".{stem}.{uuid.uuid4().hex[:8]}.tmp{suffixes}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds.

    Args:
        path: Final destination. Its parent folder is created if needed.

    Returns:
        A context manager yielding the temporary path to write to (see :func:`temporary_name`).

    Raises:
        DiskFullError: If the disk (or quota) is full while writing or renaming; ``path`` then
            holds what it held before.
    """
    final = Path(path)
    tmp = temporary_name(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, final)
    except OSError as err:
        if err.errno in _FULL and not isinstance(err, DiskFullError):
            raise DiskFullError(final, err.strerror or os.strerror(err.errno), err.errno) from None
        raise
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists() or tmp.is_symlink():
                tmp.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically and return the path."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def is_temporary(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` has the name of an :func:`atomic_path` temporary file."""
    return _TEMPORARY.match(Path(path).name) is not None


def remove_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that writers killed mid-write left anywhere under ``folder``.

    Call it only while no other process writes there (a run holding the folder's lock,
    :func:`medsynth.io.lock.output_lock`): a live writer's temporary file looks the same.

    Args:
        folder: The folder to sweep (a missing folder has nothing to sweep).

    Returns:
        The files deleted.
    """
    removed = []
    for root, _, files in os.walk(folder):
        for name in files:
            if _TEMPORARY.match(name):
                path = Path(root) / name
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed
