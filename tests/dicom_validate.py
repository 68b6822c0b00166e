"""Run Debian's dicom3tools validator ``dciodvfy`` on a DICOM file and sort what it says."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Verdict:
    """What ``dciodvfy`` said about one file: its error and warning lines."""

    path: Path
    errors: list[str]
    warnings: list[str]


def dciodvfy_or_skip() -> str:
    """Path of ``dciodvfy``; skips the test without it, or fails it when the env var ``CI`` is set."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        reason = "dciodvfy (Debian package dicom3tools) is not installed; `make tools` installs it"
        if os.environ.get("CI"):
            pytest.fail(reason + " and CI requires the DICOM validation tests")
        pytest.skip(reason)
    return exe


def dciodvfy(path: str | os.PathLike[str]) -> Verdict:
    """Validate ``path`` with ``dciodvfy``.

    Args:
        path: A DICOM file.

    Returns:
        The lines with ``Error`` and those with ``Warning`` (it prints both on stderr).
    """
    exe = dciodvfy_or_skip()
    done = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = [line.strip() for line in (done.stderr + "\n" + done.stdout).splitlines() if line.strip()]
    return Verdict(
        Path(path),
        errors=[line for line in lines if "Error" in line],
        warnings=[line for line in lines if "Warning" in line],
    )
