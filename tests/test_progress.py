"""Progress reports: a bar on a terminal, a few whole lines in a log file."""

from __future__ import annotations

import io

import pytest
from tqdm.auto import tqdm

from medsynth.progress import LineProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_a_line_per_tenth_not_per_step() -> None:
    """400 steps written to a file: 10 whole lines (no carriage returns), each with the count, the
    latest figures and, but for the last, the time left."""
    log = io.StringIO()
    with progress_bar(total=400, desc="train", unit="step", enabled=True, stream=log) as bar:
        assert isinstance(bar, LineProgress)
        for step in range(400):
            bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [line.split(",")[0] for line in lines] == [f"train: {n}/400 steps ({n // 4}%)" for n in range(40, 401, 40)]
    assert "loss=0.0250" in lines[0] and "left" in lines[0]
    assert "loss=0.0025" in lines[-1] and "done in" in lines[-1]


def test_a_resumed_run_counts_from_where_it_was_and_a_slow_one_reports_by_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines continue at the next tenth after ``initial``; with a minute between steps every step gets a line."""
    log = io.StringIO()
    bar = LineProgress(total=100, desc="generate", unit="sample", initial=35, stream=log)
    bar.update(4)  # 39: no tenth passed yet
    assert log.getvalue() == ""
    bar.update(1)
    assert log.getvalue().startswith("generate: 40/100 samples (40%)")
    clock = iter(float(t) for t in range(0, 10_000, 61))
    monkeypatch.setattr("medsynth.progress.time.monotonic", lambda: next(clock))
    log = io.StringIO()
    slow = LineProgress(total=1000, desc="train", unit="step", stream=log)
    for _ in range(3):
        slow.update(1)
    slow.close()
    assert [line.split(",")[0] for line in log.getvalue().splitlines()] == [
        "train: 1/1000 steps (0%)", "train: 2/1000 steps (0%)", "train: 3/1000 steps (0%)"]


def test_close_writes_the_last_count_once() -> None:
    """A run that stops early still says where it stopped; a finished one is not repeated."""
    log = io.StringIO()
    bar = LineProgress(total=50, desc="preprocess: cases", unit="case", stream=log)
    bar.update(7)
    bar.close()
    bar.close()
    assert log.getvalue().splitlines() == [log.getvalue().splitlines()[0]]
    assert log.getvalue().startswith("preprocess: cases: 7/50 cases (14%)")


def test_a_terminal_gets_a_bar_and_disabled_shows_nothing() -> None:
    screen = Terminal()
    bar = progress_bar(total=10, desc="train", unit="step", enabled=True, stream=screen)
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()
    quiet = io.StringIO()
    off = progress_bar(total=10, desc="train", unit="step", enabled=False, stream=quiet)
    off.update(10)
    off.close()
    assert quiet.getvalue() == ""
