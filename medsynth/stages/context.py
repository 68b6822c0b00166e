"""What every stage shares: its MLflow run, the device, the shared settings, and the claim on
``paths.output`` (writable, and held by this run alone: :func:`claim_output`)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from medsynth import MedsynthError, __version__
from medsynth.config.schema import to_mapping
from medsynth.config.settings import RunSettings
from medsynth.config.sweep import STAGE_FOLDERS
from medsynth.io import output_lock, write_text
from medsynth.io.lock import check_readable, check_writable
from medsynth.tracking import Tracker, TrackerLike, flatten
from medsynth.tracking.spool import SPOOL_FOLDER

log = logging.getLogger("medsynth")


def make_tracker(run: RunSettings) -> Tracker:
    """The MLflow tracker that ``run.mlflow`` configures; during a server outage it journals its
    writes under ``paths.output/mlflow-spool`` (:mod:`medsynth.tracking.spool`)."""
    m = run.mlflow
    return Tracker(
        m.tracking_uri,
        m.experiment_name,
        artifact_location=m.artifact_location,
        spool=Path(run.paths.output) / SPOOL_FOLDER,
        retry_seconds=m.retry_seconds,
    )


def log_config(tracker: TrackerLike, run_id: str, config: Mapping[str, Any], *, folder: str | Path) -> None:
    """Log ``config`` flattened as params and as ``config.yaml`` (written to ``folder`` first)."""
    import yaml

    tracker.log_params(run_id, flatten(config))
    path = write_text(Path(folder) / "config.yaml", yaml.safe_dump(dict(config), sort_keys=False))
    tracker.log_artifact(run_id, path)


def stage_tags(run: RunSettings, stage: str) -> dict[str, str]:
    """The tags every medsynth run carries: its stage, medsynth's version, the output folder,
    ``mlflow.tags`` (a sweep's id among them, :mod:`medsynth.config.sweep`), and under SLURM the job's id
    (``<array job>_<task>`` for a task of an array), to find its log with ``sacct``/``scontrol``."""
    tags = {
        **run.mlflow.tags,
        "medsynth.stage": stage,
        "medsynth.version": __version__,
        "medsynth.output": str(Path(run.paths.output).resolve()),
    }
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        tags["slurm.job_id"] = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    elif os.environ.get("SLURM_JOB_ID"):
        tags["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
    return tags


def check_folders(run: RunSettings, stage: str) -> None:
    """Refuse, before any work, folders the stage cannot use: an output folder it cannot write
    (a read-only file system, no permission) or an input it cannot read.

    Args:
        run: The run's settings (its ``paths``).
        stage: The stage, or ``run`` for all four.

    Raises:
        MedsynthError: One line naming the config key and the folder.
    """
    paths = run.paths
    check_writable(paths.output, key="paths.output")
    for name in STAGE_FOLDERS.get(stage, ()):
        check_writable(getattr(paths, name), key=f"paths.{name}")
    if paths.input and stage in ("preprocess", "run"):
        check_readable(paths.input, key="paths.input")


@contextlib.contextmanager
def claim_output(run: RunSettings, stage: str) -> Iterator[None]:
    """Check the stage's folders (:func:`check_folders`) and hold ``paths.output``'s lock for the block.

    One run at a time writes under an output folder: a second is refused with one line naming
    the holder; a lock left by a run that crashed is taken over with a warning
    (:func:`medsynth.io.lock.output_lock`). Re-entrant: ``medsynth run`` holds it for its stages.

    Args:
        run: The run's settings.
        stage: The stage, or ``run``.

    Raises:
        MedsynthError: For an unusable folder or an output folder another live run holds.
    """
    check_folders(run, stage)
    with output_lock(run.paths.output, stage=stage):
        yield


@contextlib.contextmanager
def stage_run(
    run: RunSettings,
    stage: str,
    config: Mapping[str, Any],
    *,
    tracker: TrackerLike | None = None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
) -> Iterator[tuple[TrackerLike, str]]:
    """An MLflow run for one stage, nested under ``parent_run_id`` when the stage is part of a pipeline.

    A top-level stage run logs the shared settings (``run``) and ``config`` (the stage's own
    groups, e.g. ``{"data": ...}``) as params and ``config.yaml``; a nested one leaves that to its
    pipeline run, which logs the whole config once. ``resume_run_id`` continues an
    earlier run of the stage (a resumed training) when the store has it. The stage holds
    ``paths.output`` throughout (:func:`claim_output`; a pipeline or the command line may hold it already).

    Yields:
        The tracker and the stage's run id (``""`` with a :class:`~medsynth.tracking.NullTracker`).
    """
    with (
        claim_output(run, stage),
        _tracked(run, stage, config, tracker=tracker, parent_run_id=parent_run_id, resume_run_id=resume_run_id) as (
            tracker,
            run_id,
        ),
    ):
        yield tracker, run_id


@contextlib.contextmanager
def _tracked(
    run: RunSettings,
    stage: str,
    config: Mapping[str, Any],
    *,
    tracker: TrackerLike | None,
    parent_run_id: str | None,
    resume_run_id: str | None,
) -> Iterator[tuple[TrackerLike, str]]:
    """The stage's MLflow run (see :func:`stage_run`)."""
    tracker = tracker or make_tracker(run)
    with tracker.run(stage, parent_run_id=parent_run_id, tags=stage_tags(run, stage), resume_run_id=resume_run_id) as run_id:
        if parent_run_id is None and run_id and run_id != resume_run_id:
            log_config(tracker, run_id, {**to_mapping(run), **config}, folder=run.paths.output)
        if run_id:
            log.info("%s: MLflow run %s", stage, run_id)
        yield tracker, run_id


def pick_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; other names are passed to torch.

    Raises:
        MedsynthError: If a CUDA device is asked for and none is available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MedsynthError(f"device={name} was asked for, but no CUDA device is available")
    return device
