"""Progress of long work: a bar on a terminal, a few whole lines in a log file.

A tqdm bar redraws itself with carriage returns; written to a file (a cluster job's log, ``make
demo > log``) that is one fragment per update, hundreds for one training. When the stream is not a
terminal, :func:`progress_bar` therefore returns a :class:`LineProgress` instead: one line at each
tenth of the work and at least every ``interval`` seconds, with the rate, the latest figures and
the time left.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class LineProgress:
    """Progress written as whole lines: ``train: 120/400 steps (30%), 1.52 step/s, loss=0.1234, 3m04s left``.

    It has the part of tqdm's interface that medsynth uses (``update``, ``set_postfix``, ``close``,
    use as a context manager), so callers need not know which one they have.

    Args:
        total: Units of work in all.
        desc: What is being done, the line's start.
        unit: The unit's name (``step``, ``sample``, ``case``).
        initial: Units already done (a resumed run).
        stream: Where lines go.
        fraction: A line each time this share of ``total`` is passed.
        interval: And at least every this many seconds while work goes on.
    """

    def __init__(
        self,
        *,
        total: int,
        desc: str,
        unit: str,
        initial: int = 0,
        stream: TextIO | None = None,
        fraction: float = 0.1,
        interval: float = 60.0,
    ) -> None:
        self.total, self.desc, self.unit, self.n = max(int(total), 0), desc, unit, int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._step = max(1, round(self.total * fraction))
        self._next = (self.n // self._step + 1) * self._step
        self._start_n, self._start = self.n, time.monotonic()
        self._last_line = self._start
        self._postfix = ""
        self._closed = False

    def set_postfix(self, **figures: Any) -> None:
        """Figures to show on the next line (``loss=0.12``), in the order given."""
        self._postfix = ", ".join(f"{k}={v}" for k, v in figures.items())

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units; write a line when a tenth is passed or the interval is over."""
        self.n += n
        now = time.monotonic()
        if self.n >= self._next or now - self._last_line >= self.interval:
            self._write(now)
            while self._next <= self.n:
                self._next += self._step

    def close(self) -> None:
        """Write the last line, unless the last one written already showed this count."""
        if not self._closed:
            self._closed = True
            if self._written_n != self.n:
                self._write(time.monotonic())

    _written_n: int | None = None

    def _write(self, now: float) -> None:
        elapsed = now - self._start
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [
            f"{self.desc}: {self.n}/{self.total} {self.unit}s" + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")
        ]
        if rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s")
        if self._postfix:
            parts.append(self._postfix)
        if rate > 0 and self.n < self.total:
            parts.append(f"{_duration((self.total - self.n) / rate)} left")
        elif self.n >= self.total:
            parts.append(f"done in {_duration(elapsed)}")
        self.stream.write(", ".join(parts) + "\n")
        self.stream.flush()
        self._last_line, self._written_n = now, self.n

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _duration(seconds: float) -> str:
    """``45s``, ``3m04s`` or ``1h02m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_bar(
    *, total: int, desc: str, unit: str, enabled: bool, initial: int = 0, leave: bool = True, stream: TextIO | None = None
) -> Any:
    """A progress display for ``total`` units of work on ``stream`` (standard error by default).

    Args:
        total: Units of work in all.
        desc: What is being done.
        unit: The unit's name.
        enabled: ``False``: show nothing (a disabled tqdm bar).
        initial: Units already done.
        leave: On a terminal, keep the finished bar on screen.
        stream: Where to write.

    Returns:
        A tqdm bar when ``stream`` is a terminal, else a :class:`LineProgress`; both take
        ``update``, ``set_postfix`` and ``close`` and work as context managers.
    """
    from tqdm.auto import tqdm

    stream = stream if stream is not None else sys.stderr
    if not enabled:
        return tqdm(total=total, initial=initial, disable=True)
    if _is_terminal(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=leave, file=stream)
    return LineProgress(total=total, desc=desc, unit=unit, initial=initial, stream=stream)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False
