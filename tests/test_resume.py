"""Full resume: a run stopped and resumed ends where the straight run ends, and survives SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import TINY, phantom_overrides, run_stage

ROOT = Path(__file__).resolve().parents[1]


def preprocessed_in_subprocess(phantom: tuple[Path, Path], tmp_path: Path, *overrides: str) -> tuple[str, list[str], dict[str, str]]:
    """Run `medsynth preprocess` on the phantom as a user would; return the MLflow URI, the arguments and the environment."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*TINY, *phantom_overrides(*phantom), f"paths.output={tmp_path / 'out'}", f"mlflow.tracking_uri={uri}", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "MEDSYNTH_DEBUG"}
    done = subprocess.run([sys.executable, "-m", "medsynth.cli", "preprocess", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return uri, args, env


@pytest.mark.parametrize("mode", [[], ["model.conditioning=attributes", "model.condition_dropout=0.5"]], ids=["mask", "attributes"])
def test_resumed_run_equals_straight_run(mode: list[str], tiny_config, phantom, tmp_path: Path) -> None:
    """4 steps straight == 2 steps, stop, resume for 2 more: same weights, EMA and optimiser state
    (condition dropout included: it is drawn per step, like batches and noise)."""
    common = [*phantom_overrides(*phantom), f"paths.data={tmp_path / 'data'}", "trainer.max_steps=4", *mode]
    run_stage("preprocess", tiny_config(*common))
    straight = run_stage("train", tiny_config(*common, f"paths.output={tmp_path / 'a'}"))
    with_checkpoints = tiny_config(*common, f"paths.output={tmp_path / 'b'}", "trainer.checkpoint_every=2", "trainer.keep_last=5")
    run_stage("train", with_checkpoints)
    halfway = Path(with_checkpoints.paths.checkpoints) / "step_0000002.pt"
    assert halfway.is_file()
    (tmp_path / "c" / "checkpoints").mkdir(parents=True)
    shutil.copy(halfway, tmp_path / "c" / "checkpoints" / "last.pt")
    resumed = run_stage("train", tiny_config(*common, f"paths.output={tmp_path / 'c'}", "trainer.resume=auto"))

    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in ("model",):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-5, atol=1e-6)
    for name, value in a["ema"]["shadow"].items():
        torch.testing.assert_close(b["ema"]["shadow"][name], value, rtol=1e-5, atol=1e-6)
    assert a["lr_scheduler"]["last_epoch"] == b["lr_scheduler"]["last_epoch"]


def test_checkpoint_policy_keeps_last_k_and_best(tiny_config, phantom, tmp_path: Path) -> None:
    cfg = tiny_config(*phantom_overrides(*phantom), "trainer.max_steps=5", "trainer.checkpoint_every=1", "trainer.keep_last=2")
    run_stage("preprocess", cfg)
    run_stage("train", cfg)
    folder = Path(cfg.paths.checkpoints)
    assert sorted(p.name for p in folder.glob("step_*.pt")) == ["step_0000004.pt", "step_0000005.pt"]
    last, best = torch.load(folder / "last.pt", weights_only=True), torch.load(folder / "best.pt", weights_only=True)
    assert last["step"] == 5
    assert best["val_loss"] == best["best_val_loss"] == last["best_val_loss"]
    assert not list(folder.glob(".*tmp*"))


def test_resume_refuses_another_model(tiny_config, phantom, tmp_path: Path) -> None:
    from medsynth import MedsynthError
    import pytest

    cfg = tiny_config(*phantom_overrides(*phantom))
    run_stage("preprocess", cfg)
    run_stage("train", cfg)
    with pytest.raises(MedsynthError, match="another `model` config"):
        run_stage("train", tiny_config(*phantom_overrides(*phantom), "trainer.resume=auto", "model.network.channels=[8,16]"))


def test_sigkill_then_resume_reaches_the_same_step_with_a_continuous_loss_curve(phantom, tmp_path: Path) -> None:
    """Kill `medsynth train` mid-run with SIGKILL; `trainer.resume=auto` finishes it in the same MLflow run."""
    uri, args, env = preprocessed_in_subprocess(
        phantom, tmp_path, "trainer.max_steps=150", "trainer.checkpoint_every=5", "trainer.resume=auto",
        "trainer.grid.every_checkpoint=false",
    )

    proc = subprocess.Popen([sys.executable, "-m", "medsynth.cli", "train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "out" / "checkpoints" / "step_0000015.pt"  # written after last.pt points at step 10
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 10 <= killed_at < 150

    resumed = subprocess.run([sys.executable, "-m", "medsynth.cli", "train", *args], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    final = torch.load(tmp_path / "out" / "checkpoints" / "last.pt", weights_only=True)
    assert final["step"] == 150

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("medsynth").experiment_id], "tags.`medsynth.stage` = 'train'")
    assert len(runs) == 1 and runs[0].info.run_id == final["run_id"]
    assert runs[0].info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(final["run_id"], "loss")}
    assert steps == set(range(1, 151))


def test_mixed_precision_accumulation_and_channels_last_resume_like_a_straight_run(tiny_config, phantom, tmp_path: Path) -> None:
    """bf16 autocast, 2 accumulated batches per step and NHWC layout: stop at step 2, resume, same as straight."""
    common = [*phantom_overrides(*phantom), f"paths.data={tmp_path / 'data'}", "trainer.max_steps=4",
              "trainer.precision=bf16", "trainer.accumulate=2", "trainer.channels_last=true"]
    run_stage("preprocess", tiny_config(*common))
    straight = run_stage("train", tiny_config(*common, f"paths.output={tmp_path / 'a'}", "trainer.checkpoint_every=2", "trainer.keep_last=5"))
    (tmp_path / "c" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "step_0000002.pt", tmp_path / "c" / "checkpoints" / "last.pt")
    resumed = run_stage("train", tiny_config(*common, f"paths.output={tmp_path / 'c'}", "trainer.resume=auto"))
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    assert a["step"] == b["step"] == 4
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-4, atol=1e-5)


def assert_one_training(output: Path, uri: str, *, steps: int) -> None:
    """One checkpoint at ``steps`` under ``output`` and one FINISHED train run with every step's loss."""
    final = torch.load(output / "checkpoints" / "last.pt", weights_only=True)
    assert final["step"] == steps
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("medsynth").experiment_id], "tags.`medsynth.stage` = 'train'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == list(range(1, steps + 1))
