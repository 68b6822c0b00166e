"""The one-node SLURM cluster of tests/slurm.py: multi-task job steps, concurrent jobs, requeue, the
``sacct`` stand-in, a Hydra sweep through the submitit launcher, and a clean stop.

Skipped, with the reason, only where SLURM cannot run (``slurm-wlm`` or ``munge`` not installed); see
:func:`tests.slurm.slurm_unavailable_reason`. The Hydra test needs ``hydra-submitit-launcher`` too.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm import Cluster, shell_quote, slurm_cluster, slurm_unavailable_reason, stray_processes

REASON = slurm_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

PRINT_RANK = ("import os; print(' '.join(f'{k}={os.environ.get(k)}' for k in "
              "('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID', 'SLURM_NODELIST', 'SLURM_LAUNCH_NODE_IPADDR')))")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def wait_for_file(path: Path, *, timeout: float = 30.0) -> str:
    """Wait until ``path`` exists and is not empty; its text."""
    deadline = time.monotonic() + timeout
    while not (path.is_file() and path.stat().st_size):
        assert time.monotonic() < deadline, f"{path} not written within {timeout} s"
        time.sleep(0.05)
    return path.read_text()


def test_two_tasks_run_through_srun(cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "ranks.out"
    script = f"#!/bin/bash\nsrun {shell_quote([sys.executable, '-c', PRINT_RANK])}\n"
    job = cluster.sbatch(script, "--ntasks=2", "--cpus-per-task=1", f"--output={out}")
    assert cluster.wait_job(job, timeout=30) == "COMPLETED", out.read_text() if out.exists() else ""
    ranks = [dict(word.split("=", 1) for word in line.split()) for line in out.read_text().splitlines()]
    assert sorted(rank["SLURM_PROCID"] for rank in ranks) == ["0", "1"]
    assert sorted(rank["SLURM_LOCALID"] for rank in ranks) == ["0", "1"]
    for rank in ranks:
        assert rank["SLURM_NTASKS"] == "2"
        assert rank["SLURM_NODELIST"] == cluster.node
        assert rank["SLURM_LAUNCH_NODE_IPADDR"] == "127.0.0.1"


def test_two_one_cpu_jobs_run_at_once(cluster: Cluster, tmp_path: Path) -> None:
    """Each job marks that it runs and waits (up to 20 s) for the other's mark: both complete only together."""
    jobs = []
    for me, other in (("a", "b"), ("b", "a")):
        script = (f"#!/bin/bash\ntouch {tmp_path}/{me}\n"
                  f"for i in $(seq 200); do [ -e {tmp_path}/{other} ] && exit 0; sleep 0.1; done\nexit 1\n")
        jobs.append(cluster.sbatch(script, "--ntasks=1", "--cpus-per-task=1"))
    assert [cluster.wait_job(job, timeout=40) for job in jobs] == ["COMPLETED", "COMPLETED"]


def requeue_script(marker: Path) -> str:
    """A job that appends its restart count to ``marker``; the first run then sleeps until requeued."""
    return (f"#!/bin/bash\necho \"${{SLURM_RESTART_COUNT:-0}}\" >> {marker}\n"
            "[ \"${SLURM_RESTART_COUNT:-0}\" = 0 ] && sleep 60\nexit 0\n")


def test_requeued_job_runs_again(cluster: Cluster, tmp_path: Path) -> None:
    """``scontrol requeue`` on a running job: it runs a second time (SLURM_RESTART_COUNT=1) and completes.

    slurmctld holds a requeued job back for cred_expire + 1 s (6 s here) before it runs again.
    """
    marker = tmp_path / "runs"
    job = cluster.sbatch(requeue_script(marker), "--requeue", "--open-mode=append", f"--output={tmp_path}/out")
    wait_for_file(marker)
    assert cluster.state(job) == "RUNNING"
    requeued = time.monotonic()
    cluster.run("scontrol", "requeue", job)
    cluster.wait_state(job, {"PENDING"}, timeout=20)
    assert cluster.wait_job(job, timeout=40) == "COMPLETED"
    waited = time.monotonic() - requeued
    assert marker.read_text().split() == ["0", "1"]
    assert cluster.job(job)["Restarts"] == "1"  # type: ignore[index]
    assert waited < 15, f"the requeued job took {waited:.1f} s to run again"


def test_sacct_stand_in_reports_job_and_array_states(cluster: Cluster) -> None:
    """The ``sacct`` on :attr:`Cluster.env`'s PATH answers submitit's query from ``scontrol show job``."""
    single = cluster.sbatch("#!/bin/bash\ntrue\n")
    array = cluster.sbatch("#!/bin/bash\ntrue\n", "--array=0-1")
    query = ["sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", single, "-j", array]
    deadline = time.monotonic() + 30
    while True:
        lines = cluster.run(*query).stdout.splitlines()
        if len(lines) == 4 and all(line.split("|")[1] == "COMPLETED" for line in lines[1:]):
            break
        assert time.monotonic() < deadline, lines
        time.sleep(0.2)
    assert lines[0] == "JobID|State|NodeList"
    assert sorted(line.split("|")[0] for line in lines[1:]) == sorted([single, f"{array}_0", f"{array}_1"])
    assert {line.split("|")[2] for line in lines[1:]} == {cluster.node}


HYDRA_APP = """
import os

import hydra


@hydra.main(version_base=None, config_path=None, config_name=None)
def main(cfg) -> None:
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "SLURM_NTASKS", "SUBMITIT_EXECUTOR")
    with open(os.environ["MARKS"], "a") as marks:
        marks.write(f"x={cfg.x} " + " ".join(f"{k}={os.environ.get(k)}" for k in keys) + "\\n")


if __name__ == "__main__":
    main()
"""


def test_hydra_submitit_launcher_sweeps_on_the_cluster(cluster: Cluster, tmp_path: Path) -> None:
    """``-m x=1,2 hydra/launcher=submitit_slurm``: one array job, both tasks run on the cluster, the sweep ends."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    app, marks, sweep = tmp_path / "app.py", tmp_path / "marks", tmp_path / "sweep"
    app.write_text(HYDRA_APP)
    result = subprocess.run(
        [sys.executable, str(app), "-m", "+x=1,2", "hydra/launcher=submitit_slurm", f"hydra.sweep.dir={sweep}",
         f"hydra.launcher.partition={cluster.partition}", "hydra.launcher.timeout_min=5",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"],
        cwd=tmp_path, env={**cluster.env, "MARKS": str(marks)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(marks.read_text().splitlines())
    assert [run.split()[0] for run in runs] == ["x=1", "x=2"]
    assert all("SUBMITIT_EXECUTOR=slurm" in run and "SLURM_PROCID=0" in run for run in runs)
    assert len(list(sweep.glob(".submitit/*_*/*_0_log.out"))) == 2


def test_stop_leaves_nothing_running(tmp_path: Path) -> None:
    """Leaving the context with a job still running ends the daemons, the job step and its tasks."""
    with slurm_cluster(tmp_path / "slurm") as running:
        job = running.sbatch("#!/bin/bash\nsrun sleep 300\n", "--ntasks=2")
        running.wait_state(job, {"RUNNING"}, timeout=20)
        processes = dict(running.processes)
        deadline = time.monotonic() + 20
        while len(stray_processes(running.conf)) < len(processes) + 4:  # slurmstepd, srun, 2 sleeps and more
            assert time.monotonic() < deadline, "the job's processes did not start"
            time.sleep(0.05)
    assert all(process.poll() is not None for process in processes.values())
    assert stray_processes(running.conf) == []
