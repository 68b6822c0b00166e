"""De-identification: pseudonymous keys from a per-project secret salt, and scrubbing of text and paths.

Nothing that identifies a patient may leave preprocessing. Every id medsynth writes for a patient,
study or series is a short HMAC-SHA256 of the DICOM identifier under a secret salt: the same
patient gets the same id in every run of a project, and without the salt the mapping cannot be
reversed (or recomputed from a guessed PatientID). Text that might carry header values (error
messages of libraries, file paths of a PACS export) goes through a :class:`Scrubber` first.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from medsynth import ConfigError, MedsynthError

SALT_ENV = "MEDSYNTH_SALT"
"""Environment variable that, when set, is the salt (its UTF-8 bytes) and overrides the salt file."""

_UID_LIKE = re.compile(r"\d+(\.\d+){3,}")
_LONG_DIGITS = re.compile(r"\d{6,}")
_DATE_LIKE = re.compile(r"(19|20)\d\d[-_.]?[01]\d[-_.]?[0-3]\d")
_DICOM_ROOT = "1.2.840.10008."  # the standard's own UIDs (transfer syntaxes, SOP classes) identify no one
_SAFE_SUFFIXES = (".dcm", ".dicom", ".ima", ".img", ".nii.gz", ".nii", ".txt", ".json", ".xml", ".csv")


def load_salt(path: str | os.PathLike[str] | None) -> bytes:
    """The project's secret salt: ``$MEDSYNTH_SALT`` if set, else the file ``path``, created on first use.

    The file holds 32 random bytes (``os.urandom``) and is created with mode 0600; it is never
    logged or copied. Keep it to get the same case ids in later runs; delete it to unlink them.

    Args:
        path: The salt file (for example ``<paths.output>/secret/salt``).

    Returns:
        The salt bytes.

    Raises:
        ConfigError: If neither the variable nor a path is given, or the file is empty.
    """
    env = os.environ.get(SALT_ENV)
    if env:
        return env.encode("utf-8")
    if not path:
        raise ConfigError(f"data.deid.salt_file is not set and ${SALT_ENV} is empty: de-identification needs a secret salt")
    salt = secret_file(path)
    if not salt:
        raise ConfigError(f"the salt file data.deid.salt_file={path} is empty; delete it to make a new one")
    return salt


def secret_file(path: str | os.PathLike[str], *, size: int = 32) -> bytes:
    """The bytes of the secret file ``path``; created on first use with ``size`` random bytes, mode 0600.

    Two processes that create it at once end with the same file (the second one reads the first's).

    Args:
        path: The file.
        size: Bytes of a new secret (``os.urandom``).

    Returns:
        The file's bytes (empty if someone emptied it: the caller decides what that means).
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # written whole under a temporary name, then linked into place: a process that starts meanwhile
        # (an array task) finds either no file or the whole secret, never an empty one
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(size))
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(temporary, 0o600)
            try:
                os.link(temporary, path)
            except FileExistsError:  # another process created it meanwhile: theirs is the secret
                pass
        finally:
            os.unlink(temporary)
    return path.read_bytes()


def pseudonym(value: str, salt: bytes, *, prefix: str = "", length: int = 12) -> str:
    """A short keyed hash of ``value``: ``prefix`` + the first ``length`` hex digits of HMAC-SHA256.

    Args:
        value: The identifier (PatientID, a UID, a file name).
        salt: The project's secret salt.
        prefix: A letter that says what kind of id it is (``p`` patient, ``s`` series).
        length: Hex digits kept (12 = 48 bits: collisions are negligible below millions of ids).

    Returns:
        The pseudonym.
    """
    digest = hmac.new(salt, value.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{prefix}{digest[:length]}"


class Scrubber:
    """Replaces known identifying values in text, and pseudonymises identifying path components.

    Args:
        salt: The project's salt (for path pseudonyms).
        identifiers: Identifying values seen in the input (names and name parts, ids, dates,
            UIDs, descriptions); values shorter than ``min_length`` are ignored, as replacing
            them would garble ordinary text.
        min_length: Shortest value that is scrubbed.
        hash_all_paths: Pseudonymise every path component, not only suspicious ones.
    """

    def __init__(
        self, salt: bytes, identifiers: Iterable[str] = (), *, min_length: int = 3, hash_all_paths: bool = False
    ) -> None:
        self.salt = salt
        self.min_length = min_length
        self.hash_all_paths = hash_all_paths
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(identifiers)

    def add(self, identifiers: Iterable[str]) -> None:
        """Learn more identifying values."""
        before = len(self._values)
        # UIDs are caught by their pattern; keeping them out keeps the expression small for big exports.
        self._values.update(
            v.strip() for v in identifiers if len(v.strip()) >= self.min_length and not _UID_LIKE.fullmatch(v.strip())
        )
        if len(self._values) != before:
            self._pattern = None

    def _regex(self) -> re.Pattern[str] | None:
        if self._pattern is None and self._values:
            ordered = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in ordered), re.IGNORECASE)
        return self._pattern

    def text(self, text: str) -> str:
        """``text`` with every known identifying value and every UID replaced by ``<removed>``."""
        pattern = self._regex()
        text = pattern.sub("<removed>", text) if pattern is not None else text
        return _UID_LIKE.sub(lambda m: m.group(0) if m.group(0).startswith(_DICOM_ROOT) else "<removed>", text)

    def suspicious(self, component: str) -> bool:
        """Whether a path component may identify someone: it holds a known value, a UID, a date or a long number."""
        pattern = self._regex()
        return bool(
            self.hash_all_paths
            or (pattern is not None and pattern.search(component))
            or _UID_LIKE.search(component)
            or _LONG_DIGITS.search(component)
            or _DATE_LIKE.search(component)
        )

    def component(self, component: str) -> str:
        """One path component, pseudonymised (keeping a known file suffix) when it is suspicious."""
        if not self.suspicious(component):
            return component
        suffix = next((s for s in _SAFE_SUFFIXES if component.lower().endswith(s)), "")
        return pseudonym(component, self.salt, prefix="~", length=10) + suffix

    def path(self, path: str | os.PathLike[str], root: str | os.PathLike[str]) -> str:
        """``path`` relative to ``root`` (POSIX separators) with suspicious components pseudonymised.

        Raises:
            MedsynthError: If ``path`` is not under ``root``.
        """
        try:
            relative = Path(path).resolve().relative_to(Path(root).resolve())
        except ValueError:
            raise MedsynthError("a file outside the input folder was given") from None
        return str(PurePosixPath(*[self.component(part) for part in relative.parts])) if relative.parts else "."
