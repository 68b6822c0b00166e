"""medsynth on a real SLURM through Hydra's submitit launcher (`hydra/launcher=slurm`): a sweep submits
one SLURM job per training, a 2-task job trains data-parallel from SLURM's own variables, and a job that
SLURM requeues (preemption) or warns of its time limit resumes from its checkpoint.

The one-node cluster (slurmctld, slurmd and munged of Debian's slurm-wlm and munge) runs on loopback
for this module (tests/slurm.py); the runs log to an `mlflow server` on loopback, as on a cluster.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import TINY, phantom_overrides, write_phantom
from tests.servers import TrackingServer
from tests.slurm import Cluster, slurm_cluster, slurm_unavailable_reason

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is a dependency of medsynth")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = slurm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture(scope="module")
def setup(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A tracking server, and the phantom preprocessed once: every job trains from it."""
    root = tmp_path_factory.mktemp("slurm-runs")
    (root / "server").mkdir()
    server = TrackingServer(root / "server")
    server.start()
    try:
        image, label = write_phantom(root / "raw")
        common = [*TINY, *phantom_overrides(image, label), f"mlflow.tracking_uri={server.uri}", "device=cpu",
                  f"paths.data={root / 'base' / 'data'}"]
        done = subprocess.run([sys.executable, "-m", "medsynth.cli", "preprocess", *common, f"paths.output={root / 'base'}"],
                              cwd=root, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        env = {**cluster.env, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
        env.pop("MEDSYNTH_DEBUG", None)
        yield SimpleNamespace(root=root, server=server, common=common, env=env, cluster=cluster)
    finally:
        server.stop()


def _launcher(cluster: Cluster, *extra: str) -> list[str]:
    return ["hydra/launcher=slurm", f"hydra.launcher.partition={cluster.partition}", "hydra.launcher.timeout_min=5",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "hydra.launcher.signal_delay_s=30", *extra]


def _sweep(setup: SimpleNamespace, name: str, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "medsynth.cli", "train", "-m", *setup.common, f"paths.output={setup.root / name}",
         *_launcher(setup.cluster), *overrides],
        cwd=setup.root, env=setup.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, *, timeout: float = 600) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def _train_runs(setup: SimpleNamespace, output: Path) -> list:
    client = MlflowClient(tracking_uri=setup.server.uri)
    experiment = client.get_experiment_by_name("medsynth")
    runs = client.search_runs([experiment.experiment_id], "tags.`medsynth.stage` = 'train'")
    return [r for r in runs if r.data.tags["medsynth.output"].startswith(str(output.resolve()))]


def _job_folders(output: Path) -> list[Path]:
    (sweep,) = (output / "sweeps").iterdir()
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def _logs(output: Path) -> str:
    """Every log the jobs left: Hydra's per job and submitit's per SLURM task."""
    return "\n".join(p.read_text(errors="replace") for p in output.rglob("*") if p.suffix in (".log", ".out", ".err"))


def test_a_sweep_submits_one_slurm_job_per_training(setup: SimpleNamespace) -> None:
    output = setup.root / "sweep"
    _finish(_sweep(setup, "sweep", "trainer.max_steps=2,3"))
    jobs = _job_folders(output)
    assert [p.name for p in jobs] == ["0", "1"]
    assert [torch.load(p / "checkpoints" / "last.pt", weights_only=True)["step"] for p in jobs] == [2, 3]
    runs = _train_runs(setup, output)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["medsynth.sweep"] for r in runs}) == 1
    slurm_ids = sorted(r.data.tags["slurm.job_id"] for r in runs)  # two tasks of one SLURM array job
    assert slurm_ids[0].endswith("_0") and slurm_ids[1].endswith("_1")
    assert slurm_ids[0].split("_")[0] == slurm_ids[1].split("_")[0]


def test_a_two_task_job_trains_data_parallel_into_one_run(setup: SimpleNamespace) -> None:
    output = setup.root / "ddp"
    _finish(_sweep(setup, "ddp", "hydra.launcher.tasks_per_node=2", "trainer.max_steps=4", "trainer.checkpoint_every=2"))
    (job,) = _job_folders(output)
    assert torch.load(job / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    logs = _logs(output)
    assert "rank 0 of 2" in logs and "rank 1 of 2" in logs
    assert "weights identical on all 2 ranks" in logs
    (run,) = _train_runs(setup, output)
    assert run.info.status == "FINISHED"
    history = MlflowClient(tracking_uri=setup.server.uri).get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]


def _wait_for(path: Path, process: subprocess.Popen, *, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the sweep ended before {path.name}:\n{process.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.1)


def _resumed_steps(log: Path, process: subprocess.Popen, *, timeout: float = 300) -> int:
    """The step a restarted job resumed from, once its log says so."""
    deadline = time.monotonic() + timeout
    while not (found := re.search(r"train: resuming from \S+ at step (\d+)", log.read_text())):
        assert process.poll() is None, f"the sweep ended before resuming:\n{process.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no resume in {log} after {timeout} s"
        time.sleep(0.1)
    return int(found.group(1))


def test_a_preempted_and_a_timed_out_job_resume_from_their_checkpoints(setup: SimpleNamespace) -> None:
    """SLURM requeues the job (preemption: the job is killed and starts again), then warns it of its time
    limit (USR2: submitit requeues it itself); each time it resumes with trainer.resume=auto."""
    output, cluster = setup.root / "requeue", setup.cluster
    steps = 600  # about 15 s of training: a tiny network trains some 40 steps a second
    sweep = _sweep(setup, "requeue", f"trainer.max_steps={steps}", "trainer.checkpoint_every=100", "trainer.keep_last=20",
                   "trainer.resume=auto", "hydra.launcher.max_num_timeout=3")
    checkpoints = lambda: _job_folders(output)[0] / "checkpoints"  # noqa: E731
    deadline = time.monotonic() + 300
    while not (output / "sweeps").is_dir() or not _job_folders(output):
        assert sweep.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    _wait_for(checkpoints() / "step_0000100.pt", sweep)
    (job_id,) = cluster.jobs()
    cluster.run("scontrol", "requeue", job_id)  # preemption with PreemptMode=REQUEUE
    cluster.wait_state(job_id, {"PENDING"}, timeout=60)  # SLURM holds it a few seconds (cred_expire + 1), then starts it
    # submitit lets the first start train on through SIGTERM until SIGKILL (KillWait), so its last checkpoint
    # is only known once the second start has resumed from it; one more checkpoint, then the warning
    resumed = _resumed_steps(_job_folders(output)[0] / "train.log", sweep)
    assert resumed + 100 < steps, f"the first start trained on to step {resumed} after the requeue"
    _wait_for(checkpoints() / f"step_{resumed + 100:07d}.pt", sweep)
    cluster.run("scancel", "--signal=USR2", job_id)  # the warning SLURM sends signal_delay_s before the time limit
    _finish(sweep)

    assert torch.load(checkpoints() / "last.pt", weights_only=True)["step"] == steps
    record = cluster.job(job_id)
    assert record is not None and int(record["Restarts"]) == 2
    hydra_log = (_job_folders(output)[0] / "train.log").read_text()  # the job's log, appended by each start
    assert hydra_log.count("train: resuming from") == 2, hydra_log[-3000:]
    (run,) = _train_runs(setup, output)  # the resumed jobs continued the first job's run
    assert run.info.status == "FINISHED"
    history = MlflowClient(tracking_uri=setup.server.uri).get_metric_history(run.info.run_id, "loss")
    assert {m.step for m in history} == set(range(1, steps + 1))
    assert os.path.isdir(output)
