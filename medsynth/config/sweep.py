"""One job of a Hydra sweep (``medsynth <stage> -m ...``): its own output folder and the sweep's id.

Hydra runs each job of a sweep in ``hydra.sweep.dir/<job number>`` (``conf/config.yaml`` puts the
sweep under ``paths.output/sweeps/<time>``). A job writes everything its stage makes there, so no
two jobs share a file or a lock, and reads what earlier stages made from the sweep's base folder:
``medsynth train -m model.conditioning=mask,joint`` trains two models from the one dataset that
``preprocess`` wrote under ``paths.output``, while ``medsynth run -m ...`` keeps all four stages in
the job's folder. Every MLflow run of the sweep carries the tag ``medsynth.sweep`` (the sweep's id)
and ``medsynth.sweep.job`` (the job's number), so the sweep's runs are one filter away in the UI.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medsynth import ConfigError

SWEEP_TAG = "medsynth.sweep"
JOB_TAG = "medsynth.sweep.job"

STAGE_FOLDERS: dict[str, tuple[str, ...]] = {
    "preprocess": ("data",),
    "train": ("checkpoints",),
    "generate": ("synthetic",),
    "evaluate": ("evaluation",),
    "run": ("data", "checkpoints", "synthetic", "evaluation"),
}
"""The folders of ``paths`` each stage writes into, besides ``paths.output`` itself."""


@dataclasses.dataclass(frozen=True)
class SweepJob:
    """Where one job of a sweep stands.

    Attributes:
        sweep_id: The sweep's id: the name of its folder (the time it started).
        number: The job's number in the sweep, from 0.
        folder: The job's own folder (Hydra's output folder for it).
    """

    sweep_id: str
    number: int
    folder: str


def current_job() -> SweepJob | None:
    """The sweep job this process runs, or ``None`` outside a Hydra multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN:
        return None
    return SweepJob(sweep_id=Path(hydra.sweep.dir).name, number=int(hydra.job.num), folder=str(hydra.runtime.output_dir))


def job_values(job: SweepJob, stage: str, paths: Mapping[str, Any], raw_paths: Mapping[str, Any]) -> dict[str, Any]:
    """The config values that place ``job`` in its own folder.

    Args:
        job: The sweep job.
        stage: The stage it runs (``run`` for all four).
        paths: The job's ``paths`` group, resolved.
        raw_paths: The same group before interpolation (to see which folders follow ``paths.output``).

    Returns:
        ``{"paths.output": ..., "paths.<folder>": ..., "mlflow.tags.<tag>": ...}``: the job's folder as
        ``paths.output``; the folders of earlier stages pinned to where they are now (the sweep's
        inputs); the sweep's tags.

    Raises:
        ConfigError: When a folder the stage writes is set outside ``paths.output``: every job would
            write into the same place.
    """
    writes = STAGE_FOLDERS.get(stage, ())
    values: dict[str, Any] = {"paths.output": job.folder}
    for name in ("data", "checkpoints", "synthetic", "evaluation"):
        if name not in writes:
            values[f"paths.{name}"] = paths[name]
        elif "${paths.output}" not in str(raw_paths[name]):
            raise ConfigError(
                f"paths.{name}={paths[name]} would be shared by every job of the sweep; "
                f"leave it under paths.output (each job gets its own) or run the jobs one at a time"
            )
    values[f"mlflow.tags.{SWEEP_TAG}"] = job.sweep_id
    values[f"mlflow.tags.{JOB_TAG}"] = str(job.number)
    return values
