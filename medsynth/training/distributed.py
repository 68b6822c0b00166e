"""Data-parallel training under torchrun or SLURM: process group set-up, the rank that writes, and
the check that every rank ends with the same weights.

torchrun describes a process's place with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``. A SLURM job step started by ``srun`` (as the submitit launcher starts one task
per process) says the same with its own variables; :func:`slurm_environment` translates them, so a
multi-task SLURM job trains data-parallel without torchrun inside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Mapping

import torch
import torch.distributed as dist

log = logging.getLogger("medsynth")


@dataclasses.dataclass(frozen=True)
class Distributed:
    """Where this process stands in a data-parallel job.

    Attributes:
        rank: Global rank (0 when not distributed).
        world_size: Number of processes (1 when not distributed).
        device: The device this process trains on.
    """

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only the main process logs to MLflow and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: torch.device) -> Distributed:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), if any.

    Gloo is used on the CPU and NCCL on CUDA, where each process takes the GPU of its local rank.

    Args:
        device: The device the config asks for.

    Returns:
        This process's rank, the world size and its device.
    """
    os.environ.update(slurm_environment(os.environ))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), device)


def teardown_distributed() -> None:
    """Wait for every process, then leave the process group (no-op when not distributed)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def slurm_environment(env: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables for a task of a SLURM job step with more than one task.

    Nothing is returned when torchrun (``WORLD_SIZE``) already describes the process, outside a job
    step (a batch script's own shell has ``SLURM_PROCID`` but no step of several tasks), or for a
    step of one task. The rendezvous is the first node of the step on a port derived from the job id
    (``MASTER_ADDR``/``MASTER_PORT`` set by the user win); a one-node step meets on 127.0.0.1.

    Args:
        env: The process's environment.

    Returns:
        ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, or nothing.
    """
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if "WORLD_SIZE" in env or "SLURM_STEP_ID" not in env or tasks <= 1:
        return {}
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
    single_node = int(env.get("SLURM_STEP_NUM_NODES", "1") or 1) == 1
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or ("127.0.0.1" if single_node else first_host(nodes)),
        "MASTER_PORT": env.get("MASTER_PORT") or str(20_000 + int(env.get("SLURM_JOB_ID", "0")) % 20_000),
    }


_HOSTLIST = re.compile(r"^([^,\[]*)(?:\[([^\]]*)\])?")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``gpu[03-05,09],cpu1`` gives ``gpu03``.

    Args:
        nodelist: A host list as SLURM writes it.

    Returns:
        The first host name.

    Raises:
        ValueError: For an empty list.
    """
    match = _HOSTLIST.match(nodelist.strip())
    if not match or not (match.group(1) or match.group(2)):
        raise ValueError(f"cannot read the SLURM host list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def check_replicas(model: torch.nn.Module, ddp: Distributed) -> str:
    """Check that every rank holds the same weights, bit for bit, and return their digest.

    Data-parallel training keeps the replicas equal by construction; this makes it a checked fact
    at the end of training (a rank that diverged, through a non-deterministic layer or a lost
    update, would otherwise go unnoticed, since only rank 0 saves).

    Args:
        model: The trained model (not the DDP wrapper).
        ddp: This process's place in the job.

    Returns:
        The SHA-256 of the weights (in the order of ``state_dict``), in hexadecimal.

    Raises:
        RuntimeError: When the ranks' weights differ.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    hexdigest = digest.hexdigest()
    if not ddp.enabled:
        return hexdigest
    digests: list[str | None] = [None] * ddp.world_size
    dist.all_gather_object(digests, hexdigest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"the ranks ended with different weights: {digests}")
    log.info("train: weights identical on all %d ranks (sha256 %s)", ddp.world_size, hexdigest[:16])
    return hexdigest
