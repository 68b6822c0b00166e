"""One run per output folder: a second run is refused naming the holder, a crashed run's lock is taken
over with a warning, and the stages of one ``medsynth run`` do not block each other."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medsynth import MedsynthError
from medsynth.io.lock import LOCK_NAME, output_lock, read_holder
from tests.conftest import TINY, phantom_overrides

HOLD = """
import sys, time
from medsynth.io.lock import output_lock
with output_lock(sys.argv[1], stage="train"):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(folder: Path) -> subprocess.Popen[str]:
    """Another process holding ``folder``'s lock (as a training run would) until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(phantom, tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        env = {k: v for k, v in os.environ.items() if k != "MEDSYNTH_DEBUG"}
        done = subprocess.run([sys.executable, "-m", "medsynth.cli", "preprocess", *TINY, *phantom_overrides(*phantom),
                               f"paths.output={out}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"paths.output={out} is in use by another run (medsynth train, pid {holder.pid} on {socket.gethostname()}, " \
           "started 20" in lines[0]
    assert not (out / "data").exists(), "the refused run did some work"


def test_the_kernel_drops_a_killed_holders_lock_and_the_next_run_takes_it_over(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    holder = _holder(tmp_path)
    stale = read_holder(tmp_path)
    assert stale is not None and stale.pid == holder.pid
    with pytest.raises(MedsynthError, match=f"pid {holder.pid}"):
        with output_lock(tmp_path, stage="generate"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    leftover = tmp_path / "synthetic" / ".sample_000.1a2b3c4d.tmp.nii.gz"  # what a writer killed mid-write leaves
    leftover.parent.mkdir()
    leftover.write_bytes(b"half")

    with caplog.at_level(logging.WARNING, logger="medsynth"), output_lock(tmp_path, stage="generate"):
        now = read_holder(tmp_path)
        assert now is not None and now.pid == os.getpid() and now.stage == "generate"
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "taking over the lock of a run that ended without releasing it" in warning
    assert f"pid {holder.pid}" in warning
    assert not leftover.exists()
    assert not (tmp_path / LOCK_NAME).exists(), "a clean end leaves no lock file"


def test_a_lock_file_naming_a_dead_process_is_stale(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"host": socket.gethostname(), "pid": pid, "started": "2026-01-01T00:00:00+00:00", "stage": "run"}))
    with caplog.at_level(logging.WARNING, logger="medsynth"), output_lock(tmp_path, stage="train"):
        pass
    assert f"medsynth run, pid {pid}" in caplog.text


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    with output_lock(tmp_path, stage="run"), output_lock(tmp_path, stage="train"):
        holder = read_holder(tmp_path)
        assert holder is not None and holder.stage == "run"
    assert not (tmp_path / LOCK_NAME).exists()


def test_of_two_runs_started_together_exactly_one_holds_the_folder(tmp_path: Path) -> None:
    racer = """
import sys, time
from medsynth import MedsynthError
from medsynth.io.lock import output_lock
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    with output_lock(sys.argv[1], stage="run"):
        print("won", flush=True)
        time.sleep(3)
except MedsynthError as err:
    print("refused", flush=True)
"""
    start = time.time() + 2.0
    racers = [subprocess.Popen([sys.executable, "-c", racer, str(tmp_path), str(start)], stdout=subprocess.PIPE, text=True)
              for _ in range(4)]
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in racers)
    assert outcomes == ["refused", "refused", "refused", "won"]
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_pipeline_holds_the_folder_for_all_its_stages(tiny_config, phantom, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``medsynth run``'s own stages take the lock again without blocking; another process is refused throughout."""
    from medsynth.stages import pipeline

    seen: list[str] = []
    original = pipeline.train

    def train_and_probe(*args, **kwargs):
        probe = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path / "out")], capture_output=True, text=True,
                               timeout=120)
        seen.append(probe.stderr)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "train", train_and_probe)
    pipeline.run_pipeline(tiny_config(*phantom_overrides(*phantom)))
    assert len(seen) == 1 and "is in use by another run (medsynth run, pid" in seen[0]
    assert not (tmp_path / "out" / LOCK_NAME).exists()
