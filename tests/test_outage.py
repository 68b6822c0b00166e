"""A tracking server outage loses nothing: a real `mlflow server` is stopped during training, and what
was logged meanwhile reaches it in order once it is back (or with `medsynth sync` after the stage)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from medsynth import MedsynthError
from medsynth.tracking.spool import SPOOL_FOLDER, Spool
from mlflow.tracking import MlflowClient

from tests.conftest import TINY, phantom_overrides
from tests.servers import TrackingServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[TrackingServer]:
    (tmp_path / "server").mkdir()
    tracking = TrackingServer(tmp_path / "server")
    tracking.start()
    try:
        yield tracking
    finally:
        tracking.stop()


def _journaled(output: Path) -> int:
    """Writes waiting in the journals under ``output`` (one folder per process)."""
    return sum(Spool(p).pending() for p in (output / SPOOL_FOLDER).glob("*") if p.is_dir())


def _args(phantom: tuple[Path, Path], tmp_path: Path, uri: str, *extra: str) -> list[str]:
    return [*TINY, *phantom_overrides(*phantom), f"paths.output={tmp_path / 'out'}", f"mlflow.tracking_uri={uri}",
            "mlflow.retry_seconds=1", "device=cpu", *extra]


def _medsynth(*args: str, cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "medsynth.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _wait_for(path_glob: str, folder: Path, process: subprocess.Popen, *, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not list(folder.glob(path_glob)):
        assert process.poll() is None, f"training ended before {path_glob} appeared:\n{process.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {path_glob} after {timeout} s"
        time.sleep(0.05)


def _train_run(uri: str):
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("medsynth")
    (run,) = client.search_runs([experiment.experiment_id], "tags.`medsynth.stage` = 'train'")
    return client, run


STEPS = 150


def test_training_goes_on_through_a_server_restart_and_every_step_arrives(phantom, server: TrackingServer, tmp_path: Path) -> None:
    args = _args(phantom, tmp_path, server.uri, f"trainer.max_steps={STEPS}", "trainer.checkpoint_every=30",
                 "trainer.keep_last=10", "trainer.grid.every_checkpoint=true")
    done = subprocess.run([sys.executable, "-m", "medsynth.cli", "preprocess", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoints = tmp_path / "out" / "checkpoints"

    training = _medsynth("train", *args, cwd=tmp_path)
    _wait_for("step_0000030.pt", checkpoints, training)
    server.stop()
    _wait_for("step_0000090.pt", checkpoints, training)  # two checkpoints while the server is away
    # the server takes seconds to start again, the training's last 60 steps may take less: pause the training
    # meanwhile, so that it meets the restarted server instead of ending first
    training.send_signal(signal.SIGSTOP)
    try:
        assert training.poll() is None
        assert _journaled(tmp_path / "out") > 0
        server.start()
    finally:
        training.send_signal(signal.SIGCONT)
    output, _ = training.communicate(timeout=600)
    assert training.returncode == 0, output[-3000:]
    assert "does not answer" in output and "answers again" in output

    client, run = _train_run(server.uri)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, STEPS + 1))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [30, 60, 90, 120, 150]
    pictures = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {f"samples/samples_step{s:07d}.png" for s in (30, 60, 90, 120, 150)} <= pictures
    assert (tmp_path / "out" / SPOOL_FOLDER).is_dir() and _journaled(tmp_path / "out") == 0  # all sent
    assert not list((tmp_path / "out" / SPOOL_FOLDER).glob("*/journal.jsonl"))


def test_a_server_still_away_at_the_end_is_synced_later(phantom, server: TrackingServer, tmp_path: Path) -> None:
    args = _args(phantom, tmp_path, server.uri, "trainer.max_steps=60", "trainer.checkpoint_every=20")
    done = subprocess.run([sys.executable, "-m", "medsynth.cli", "preprocess", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    training = _medsynth("train", *args, cwd=tmp_path)
    _wait_for("step_0000020.pt", tmp_path / "out" / "checkpoints", training)
    server.stop()
    output, _ = training.communicate(timeout=600)
    assert training.returncode == 0, output[-3000:]
    assert f"medsynth sync {tmp_path / 'out'}" in output
    assert _journaled(tmp_path / "out") > 0

    refused = subprocess.run([sys.executable, "-m", "medsynth.cli", "sync", str(tmp_path / "out")], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "does not answer" in refused.stderr and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    server.start()
    synced = subprocess.run([sys.executable, "-m", "medsynth.cli", "sync", str(tmp_path / "out")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert synced.returncode == 0, synced.stderr
    assert synced.stdout.strip().splitlines()[-1].startswith("sent ")
    client, run = _train_run(server.uri)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 61))
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"samples"}

    again = subprocess.run([sys.executable, "-m", "medsynth.cli", "sync", str(tmp_path / "out")], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1].startswith("nothing to send")


class _NothingMaySend:
    """A client that fails the test if the journal tries to send anything."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the journal called client.{name} for a line it should have refused")


@pytest.mark.parametrize(("line", "problem"), [
    ({"op": "artifact", "run": "r", "path": "/etc/passwd", "artifact_path": None}, "an artifact outside the journal's files/"),
    ({"op": "artifact", "run": "r", "path": "files/../../secret.txt", "artifact_path": None},
     "an artifact outside the journal's files/"),
    ({"op": "batch", "run": "r", "metrics": [["loss", "1.0", 0, 1]]}, "in the wrong shape"),
    ({"op": "status", "run": "r", "status": "DELETED", "time": 0}, "a run status other than"),
    ({"op": "exec", "run": "r"}, "unknown write 'exec'"),
    (["not", "an", "object"], "not an object"),
], ids=["absolute-path", "dot-dot", "metric-as-text", "status", "unknown-op", "not-object"])
def test_a_tampered_journal_line_is_refused_before_anything_is_sent(tmp_path: Path, line: object, problem: str) -> None:
    spool = Spool(tmp_path / SPOOL_FOLDER / "1-host-1")
    spool.folder.mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("not for the tracking server")
    spool.journal.write_text(json.dumps(line) + "\n")
    with pytest.raises(MedsynthError, match=re.escape(problem)) as refused:
        spool.replay(_NothingMaySend())  # type: ignore[arg-type]
    assert "line 1 is not a write medsynth journals" in str(refused.value)
    assert spool.pending() == 1  # kept for a person to look at


def test_a_damaged_journal_is_named_and_a_line_cut_by_a_crash_is_dropped(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "1-host-1")
    spool.folder.mkdir()
    good = json.dumps({"op": "status", "run": "r", "status": "RUNNING"})
    spool.journal.write_text(f"{good}\n{{\"op\": \"bat")  # the process died mid-write: only whole lines count
    assert spool.pending() == 1
    spool.journal.write_text(f"{good}\nnot json\n{good}\n")
    with pytest.raises(MedsynthError, match="line 2 is not JSON; the journal was damaged"):
        spool.pending()
