"""Atomic file writes: write to a temporary name in the same folder, then rename into place.

A crash mid-write leaves at most a stray ``.tmp`` file, never a half-written file under the
final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` if the block succeeds.

    Args:
        path: Final destination. Its parent folder is created if needed.

    Returns:
        A context manager yielding the temporary path to write to. The temporary name keeps
        the final suffixes (``x.nii.gz`` -> ``.x.<id>.tmp.nii.gz``) so libraries that choose a
        format from the extension behave the same.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffixes = "".join(final.suffixes)
    stem = final.name[: len(final.name) - len(suffixes)] if suffixes else final.name
    tmp = final.with_name(f".{stem}.{uuid.uuid4().hex[:8]}.tmp{suffixes}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically and return the path."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
