"""One run per output folder: an exclusive lock file, ``<paths.output>/.medsynth.lock``.

The lock is an ``fcntl.flock`` on the open lock file, so the kernel releases it when its
process ends in any way (SIGKILL, a power cut of the job's node is another matter); the file holds
``{host, pid, started, stage}`` of its holder as JSON, for the message a refused run prints. A run
that ends normally deletes the file, so a file left behind with nobody locking it names a run that
crashed: the next run takes the lock over with a warning naming that run, and sweeps the
temporary files it left (:func:`medsynth.io.atomic.remove_temporaries`).

The lock is re-entrant within a process: ``medsynth run`` holds it for all four stages, and each
stage takes it again without blocking itself. Under ``torchrun`` only global rank 0 takes it (the
other ranks write nothing). On a file system without ``flock`` the holder's pid decides: a
holder on this host whose pid no longer runs is stale.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from medsynth import MedsynthError
from medsynth.io.atomic import remove_temporaries

log = logging.getLogger("medsynth")

LOCK_NAME = ".medsynth.lock"
"""The lock file's name inside ``paths.output``."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds (or held) an output folder's lock.

    Attributes:
        host: The machine's host name.
        pid: Its process id there.
        started: When it took the lock (ISO 8601, local time with offset).
        stage: The stage (or ``run``) it was running.
    """

    host: str
    pid: int
    started: str
    stage: str = ""

    def describe(self) -> str:
        """``medsynth train, pid 4242 on gpu-01, started 2026-01-31T09:12:00+01:00``."""
        what = f"medsynth {self.stage}" if self.stage else "medsynth"
        return f"{what}, pid {self.pid} on {self.host}, started {self.started}"

    def alive(self) -> bool | None:
        """Whether its process still runs: ``None`` when it is on another host (cannot tell)."""
        if self.host != socket.gethostname():
            return None
        return _pid_alive(self.pid)

    @classmethod
    def me(cls, stage: str) -> Holder:
        """This process, now."""
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        return cls(socket.gethostname(), os.getpid(), now, stage)

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """The holder a lock file's text names; ``None`` for an empty or unreadable one."""
        try:
            body = json.loads(text)
            return cls(str(body["host"]), int(body["pid"]), str(body["started"]), str(body.get("stage", "")))
        except (ValueError, KeyError, TypeError):
            return None


@dataclasses.dataclass
class _Held:
    """A lock this process holds: its open file, how many times it was taken, and by which pid."""

    fd: int | None
    count: int
    pid: int


_HELD: dict[str, _Held] = {}
_GUARD = threading.Lock()


def _pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def _follower() -> bool:
    """Whether this is a non-zero rank of a distributed job (rank 0 holds the lock for all)."""
    rank = os.environ.get("RANK")
    return rank is not None and rank.strip() not in ("", "0")


def read_holder(folder: str | os.PathLike[str]) -> Holder | None:
    """The holder named in ``folder``'s lock file, or ``None`` when there is none (or it is unreadable)."""
    try:
        return Holder.parse((Path(folder) / LOCK_NAME).read_text(encoding="utf-8"))
    except OSError:
        return None


def _unwritable(folder: Path, err: OSError, *, key: str) -> MedsynthError:
    """The one-line error for an output folder that cannot be written."""
    reason = "it is on a read-only file system" if err.errno == errno.EROFS else (err.strerror or str(err))
    return MedsynthError(
        f"{key}={folder} cannot be written ({reason}): medsynth writes its outputs there; choose a writable folder"
    )


def _open_lock(folder: Path, *, key: str) -> int:
    """Create the folder if needed and open its lock file for reading and writing."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise MedsynthError(f"{key}={folder} is a file, not a folder") from None
    except OSError as err:
        raise _unwritable(folder, err, key=key) from None


def _read_fd(fd: int) -> str:
    """The whole text of the open lock file."""
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 4096, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a finishing run may have deleted it)."""
    try:
        mine, now = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def _refusal(folder: Path, holder: Holder | None, *, key: str) -> MedsynthError:
    """The one-line error for a folder another run holds."""
    who = holder.describe() if holder is not None else "a run that is just starting"
    return MedsynthError(
        f"{key}={folder} is in use by another run ({who}); wait for it to end or choose another "
        f"{key} (lock file {folder / LOCK_NAME})"
    )


def _take(folder: Path, stage: str, *, key: str) -> int | None:
    """Lock ``folder`` for this process; returns the open lock file (``None``: no flock here, pid-checked).

    Raises:
        MedsynthError: If another live run holds it, or the folder cannot be written.
    """
    path = folder / LOCK_NAME
    for _ in range(10):
        fd = _open_lock(folder, key=key)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Holder.parse(_read_fd(fd))
            os.close(fd)
            raise _refusal(folder, holder, key=key) from None
        except OSError:  # no flock on this file system: the holder's pid decides
            previous = Holder.parse(_read_fd(fd))
            if previous is not None and previous.pid != os.getpid() and previous.alive() is not False:
                os.close(fd)
                raise _refusal(folder, previous, key=key) from None
            _claim(fd, folder, stage, previous)
            os.close(fd)
            return None
        if not _same_file(fd, path):  # deleted by a run that just ended: lock the new file
            os.close(fd)
            continue
        _claim(fd, folder, stage, Holder.parse(_read_fd(fd)))
        return fd
    raise MedsynthError(f"{key}={folder}: could not take the lock {path}: other runs keep replacing it")


def _claim(fd: int, folder: Path, stage: str, previous: Holder | None) -> None:
    """Write this process as the holder; warn about, and clean up after, a run that crashed holding it."""
    if previous is not None:
        log.warning(
            "%s: taking over the lock of a run that ended without releasing it (%s): it crashed or was killed, "
            "so its last stage may be incomplete; rerunning that stage completes it",
            folder,
            previous.describe(),
        )
    body = json.dumps(dataclasses.asdict(Holder.me(stage))).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, body, 0)
    removed = remove_temporaries(folder)
    if removed:
        log.info("%s: removed %d temporary file(s) that an interrupted run left", folder, len(removed))


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike[str], *, stage: str, key: str = "paths.output") -> Iterator[Path]:
    """Hold ``folder``'s lock for the block: the one run writing there.

    Re-entrant within a process (a pipeline's stages take it again); a non-zero rank of a
    distributed job does not take it.

    Args:
        folder: The run's output folder; created if missing.
        stage: The stage taking it, named to a run that is refused.
        key: The config key that names the folder, for messages.

    Returns:
        A context manager yielding the lock file's path.

    Raises:
        MedsynthError: One line: another live run holds the folder (naming its stage, pid, host
            and start time), or the folder cannot be created or written.
    """
    folder = Path(folder).absolute()
    path = folder / LOCK_NAME
    if _follower():
        yield path
        return
    name = str(Path(os.path.realpath(folder)))
    with _GUARD:
        held = _HELD.get(name)
        if held is not None and held.pid == os.getpid():
            held.count += 1
        else:
            held = _HELD[name] = _Held(_take(folder, stage, key=key), 1, os.getpid())
    try:
        yield path
    finally:
        with _GUARD:
            held.count -= 1
            if held.count == 0:
                _HELD.pop(name, None)
                _release(held, path)


def _release(held: _Held, path: Path) -> None:
    """Delete the lock file, then close it (which drops the lock): a clean end leaves no lock file."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    if held.fd is not None:
        os.close(held.fd)


def check_writable(folder: str | os.PathLike[str], *, key: str) -> None:
    """Refuse a folder this run must write to but cannot: on a read-only file system, or without write permission.

    A missing folder is judged by its nearest existing parent (where it would be created).

    Args:
        folder: The folder.
        key: The config key naming it, for the message.

    Raises:
        MedsynthError: One line naming ``key``, the folder and why.
    """
    folder = Path(folder).absolute()
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise MedsynthError(f"{key}={folder}: {probe} is a file, not a folder")
    if os.access(probe, os.W_OK | os.X_OK):
        return
    code = errno.EROFS if _read_only(probe) else errno.EACCES
    raise _unwritable(folder, OSError(code, os.strerror(code)), key=key)


def check_readable(path: str | os.PathLike[str], *, key: str) -> None:
    """Refuse an input this run must read but cannot (a missing one is left to the stage, which says what it expected).

    Raises:
        MedsynthError: One line naming ``key`` and the path.
    """
    path = Path(path)
    if path.exists() and not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise MedsynthError(f"{key}={path} cannot be read (permission denied): medsynth reads its input there")


def _read_only(path: Path) -> bool:
    """Whether ``path`` is on a file system mounted read-only."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
