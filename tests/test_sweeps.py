"""Hydra multirun sweeps: every job in its own folder, every job its own MLflow run, one sweep id."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from medsynth.config import ConfigError
from medsynth.config.sweep import JOB_TAG, SWEEP_TAG, SweepJob, job_values
from mlflow.tracking import MlflowClient

from tests.conftest import TINY
from tests.test_cli import medsynth


def _runs(db: Path, stage: str) -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("medsynth")
    assert experiment is not None
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`medsynth.stage` = '{stage}'")


def test_a_train_sweep_gives_each_job_its_folder_and_run_and_one_sweep_id(tmp_path: Path) -> None:
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    common = [*TINY, f"paths.output={out}", f"mlflow.tracking_uri=sqlite:///{db}"]
    assert medsynth("preprocess", *common, cwd=tmp_path).returncode == 0

    result = medsynth("train", "-m", *common, "model.conditioning=mask,none", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    (sweep,) = (out / "sweeps").iterdir()
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:  # each job trained into its own folder, from the one dataset under paths.output
        assert (job / "checkpoints" / "last.pt").is_file()
        assert not (job / "data").exists()
    assert not (out / "checkpoints").exists()

    runs = _runs(db, "train")
    assert len(runs) == 2
    assert {r.data.tags[SWEEP_TAG] for r in runs} == {sweep.name}
    assert sorted(int(r.data.tags[JOB_TAG]) for r in runs) == [0, 1]
    assert {r.data.params["model.conditioning"] for r in runs} == {"mask", "none"}
    assert {r.data.tags["medsynth.output"] for r in runs} == {str(j.resolve()) for j in jobs}


@pytest.mark.slow
def test_a_pipeline_sweep_keeps_all_four_stages_in_each_job(tmp_path: Path) -> None:
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    result = medsynth("run", "-m", *TINY, f"paths.output={out}", f"mlflow.tracking_uri=sqlite:///{db}",
                      "seed=0,1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (out / "sweeps").iterdir()
    for job in ("0", "1"):
        assert (sweep / job / "data" / "manifest.json").is_file()
        assert (sweep / job / "synthetic" / "manifest.csv").is_file()
        assert (sweep / job / "evaluation" / "metrics.json").is_file()
    pipelines = _runs(db, "pipeline")
    assert sorted(r.data.tags[JOB_TAG] for r in pipelines) == ["0", "1"]
    assert {r.data.tags[SWEEP_TAG] for r in pipelines} == {sweep.name}
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    for parent in pipelines:  # the stage runs nest under their job's pipeline run and carry the same tags
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert len(children) == 4
        assert {c.data.tags[JOB_TAG] for c in children} == {parent.data.tags[JOB_TAG]}


def test_job_values_pin_earlier_stages_and_move_the_stage_own_folders() -> None:
    job = SweepJob(sweep_id="2026-12-06_10-00-00", number=3, folder="/o/sweeps/2026-12-06_10-00-00/3")
    raw = {k: f"${{paths.output}}/{k}" for k in ("data", "checkpoints", "synthetic", "evaluation")}
    paths = {k: f"/o/{k}" for k in raw}
    values = job_values(job, "generate", paths, raw)
    assert values["paths.output"] == job.folder
    assert values["paths.data"] == "/o/data" and values["paths.checkpoints"] == "/o/checkpoints"
    assert "paths.synthetic" not in values  # follows paths.output into the job's folder
    assert values[f"mlflow.tags.{SWEEP_TAG}"] == job.sweep_id and values[f"mlflow.tags.{JOB_TAG}"] == "3"
    with pytest.raises(ConfigError, match="paths.synthetic=/shared would be shared by every job"):
        job_values(job, "generate", {**paths, "synthetic": "/shared"}, {**raw, "synthetic": "/shared"})


def test_a_bad_value_in_a_sweep_is_one_line(tmp_path: Path) -> None:
    result = medsynth("train", "-m", *TINY, f"paths.output={tmp_path / 'o'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
                      "trainer.max_steps=2,-1", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("medsynth train: error:")


def test_the_slurm_launcher_is_refused_where_it_cannot_submit(tmp_path: Path) -> None:
    """Without -m Hydra would train right here (a login node); without sbatch and srun submitit has nothing to call."""
    here = medsynth("train", "hydra/launcher=slurm", *TINY, f"paths.output={tmp_path / 'o'}", cwd=tmp_path)
    assert here.returncode == 2
    assert here.stderr.strip().splitlines() == [
        "medsynth train: error: hydra/launcher=slurm submits a sweep: add -m (a sweep of one job is fine), or it would run here"]
    no_slurm = subprocess.run(
        [sys.executable, "-m", "medsynth.cli", "train", "-m", "hydra/launcher=slurm", *TINY, f"paths.output={tmp_path / 'o'}"],
        cwd=tmp_path, env={**os.environ, "PATH": str(Path(sys.executable).parent)}, capture_output=True, text=True, timeout=300)
    assert no_slurm.returncode == 2
    assert no_slurm.stderr.strip().splitlines() == [
        "medsynth train: error: hydra/launcher=slurm submits to SLURM, but sbatch and srun are not on PATH: "
        "run it on a machine of the cluster"]
    assert not (tmp_path / "o").exists()
