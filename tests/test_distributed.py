"""Data-parallel training across "nodes": torchrun's c10d rendezvous with two launchers on loopback,
SLURM's task variables turned into torchrun's, and the end-of-training check that every rank holds
the same weights."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from medsynth.training.distributed import Distributed, check_replicas, first_host, slurm_environment

from tests.servers import free_port
from tests.test_resume import assert_one_training, preprocessed_in_subprocess

STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2",
        "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[07-08]"}


def test_a_slurm_task_gets_torchrun_variables() -> None:
    assert slurm_environment(STEP) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                                       "MASTER_PORT": str(20_000 + 4242)}
    one_node = {**STEP, "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}
    assert slurm_environment(one_node)["MASTER_ADDR"] == "127.0.0.1"
    assert slurm_environment({**STEP, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})["MASTER_ADDR"] == "head"


@pytest.mark.parametrize("env", [
    {**STEP, "WORLD_SIZE": "4"},                                      # torchrun inside the job already set it up
    {k: v for k, v in STEP.items() if k != "SLURM_STEP_ID"},          # a batch script's own shell, not a task of a step
    {**STEP, "SLURM_STEP_NUM_TASKS": "1"},                            # one task: nothing to set up
    {},
], ids=["torchrun", "batch-shell", "one-task", "no-slurm"])
def test_nothing_is_set_outside_a_multi_task_step(env: dict[str, str]) -> None:
    assert slurm_environment(env) == {}


@pytest.mark.parametrize(("nodelist", "first"), [
    ("gpu[03-05,09],cpu1", "gpu03"), ("node7", "node7"), ("a-b[1-2]", "a-b1"), ("x1,x2", "x1"), ("n[10]", "n10")])
def test_first_host_of_a_slurm_host_list(nodelist: str, first: str) -> None:
    assert first_host(nodelist) == first


def test_replica_digest_is_of_the_weights() -> None:
    one = Distributed(0, 1, torch.device("cpu"))
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert check_replicas(a, one) == check_replicas(b, one)
    with torch.no_grad():
        b.bias[0] = torch.nextafter(b.bias[0], torch.tensor(1.0))  # one ulp
    assert check_replicas(a, one) != check_replicas(b, one)


def test_two_torchrun_launchers_train_as_two_nodes(phantom, tmp_path: Path) -> None:
    """`torchrun --nnodes=2 --rdzv-backend=c10d`, one launcher per "node", both on loopback: one
    MLflow run, one checkpoint, and the same weights on both ranks (checked bit for bit)."""
    uri, args, env = preprocessed_in_subprocess(phantom, tmp_path, "trainer.max_steps=4", "trainer.checkpoint_every=2",
                                                "device=cpu")
    port = free_port()
    env = {**env, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    launchers = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=medsynth-test", "--local-addr=127.0.0.1",
             "-m", "medsynth.cli", "train", *args],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = []
    for launcher in launchers:
        out, _ = launcher.communicate(timeout=600)
        outputs.append(out)
    for launcher, out in zip(launchers, outputs):
        assert launcher.returncode == 0, f"{[l.returncode for l in launchers]}" + "\n=====\n".join(o[-2500:] for o in outputs)
    both = "\n".join(outputs)
    assert "rank 0 of 2" in both and "rank 1 of 2" in both
    digests = re.findall(r"weights identical on all 2 ranks \(sha256 ([0-9a-f]+)\)", both)
    assert len(digests) == 2 and len(set(digests)) == 1
    assert_one_training(tmp_path / "out", uri, steps=4)
