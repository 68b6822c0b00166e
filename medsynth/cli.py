"""The command line: ``medsynth <stage> [hydra overrides]`` and ``python pipelines/<stage>.py``.

Both go through :func:`hydra_entry`: it composes ``conf/config.yaml`` with the overrides and checks
it into typed settings (:func:`medsynth.config.compose`) before Hydra starts the job, so a typo or a
bad value stops the command before anything is read or written. Hydra then runs the job as usual
(its run folder, sweeps with ``-m``), and :func:`run_stage` calls the stage's library function.
A user error (:class:`medsynth.MedsynthError`) prints one line and exits with status 2, no traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medsynth import MedsynthError
from medsynth.config import PipelineSettings, compose, config_dir, expand_aliases, load_settings, resolve

STAGES = ("preprocess", "train", "generate", "evaluate", "run")

USAGE = f"""usage: medsynth <stage> [key=value ...]
       medsynth verify PATH [--audit METRICS_JSON]
       medsynth sync PATH

stages: {" | ".join(STAGES)}   (run = all four in order)
verify: is the synthetic set at PATH (a run's output folder or its synthetic folder) exactly the
        set its audit (evaluation/metrics.json) checked, and did it pass? Prints PASS or FAIL and
        why; exit status 0 on PASS, 1 on FAIL. Run it before data leaves the hospital.
sync:   send what a tracking server outage left journaled under PATH (a run's paths.output) to
        that server, into the same runs; exit status 0 once all is sent, 2 if it still does not answer.

common overrides:
  experiment=NAME             a preset from conf/experiment (default: demo, CPU demo on MNI152 brain MRI)
  paths.input=DIR             raw scans
  paths.output=DIR            where the run writes everything
  mlflow.tracking_uri=URI     MLflow store (default: sqlite:///mlflow.db in the working directory)
  trainer.max_steps=N  generate.num_samples=N  generate.steps=N  device=cpu|cuda

presets (experiment=NAME): {{presets}}

Hydra flags work too: `medsynth <stage> --help` lists every config group and its options,
`medsynth train --cfg job` prints the composed config, `-m` runs a sweep.
Config folder: {{config}}
Docs: README.md and docs/ in the source repository (how-it-works.md: every stage and setting;
audit.md: what PASS and FAIL rest on; own-data.md: running on your scans)
"""


def _presets() -> str:
    """The names of ``conf/experiment``'s presets, comma-separated."""
    return ", ".join(sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml")))


def _call(stage: str, settings: PipelineSettings) -> Any:
    """Call the library function of ``stage`` with its part of ``settings``."""
    import medsynth

    run = settings.run
    if stage == "preprocess":
        return medsynth.preprocess(settings=settings.data, run=run)
    if stage == "train":
        return medsynth.train(model=settings.model, scheduler=settings.scheduler, trainer=settings.trainer, run=run)
    if stage == "generate":
        return medsynth.generate(settings=settings.generate, encoder=settings.encoder, privacy=settings.privacy, run=run)
    if stage == "evaluate":
        return medsynth.evaluate(settings=settings.evaluate, encoder=settings.encoder, privacy=settings.privacy, run=run)
    return medsynth.run_pipeline(settings)


def run_stage(stage: str, cfg: Any) -> Any:
    """Check the composed Hydra config ``cfg`` and run ``stage`` with it.

    Args:
        stage: One of :data:`STAGES`.
        cfg: The config Hydra composed (a DictConfig).

    Returns:
        What the stage function returns.

    A :class:`MedsynthError` (a bad config value, a bad input file) ends the process with its
    message alone and status 2; set ``MEDSYNTH_DEBUG=1`` to see the traceback instead.
    """
    logging.getLogger("medsynth").setLevel(logging.INFO)
    quiet_libraries()
    adopt_slurm_task()  # a job the submitit launcher started: this process is one task of it
    with user_errors(stage):
        place_sweep_job(stage, cfg)
        return _call(stage, load_settings(resolve(cfg)))


def check_launcher(args: Sequence[str]) -> None:
    """Refuse ``hydra/launcher=slurm`` where it cannot submit: without ``-m`` (Hydra would run the
    job right here, say on a login node) or without SLURM's ``sbatch`` and ``srun`` on PATH.

    Raises:
        MedsynthError: One line saying what to do.
    """
    import shutil

    if "hydra/launcher=slurm" not in args:
        return
    if not any(a in ("-m", "--multirun") for a in args):
        raise MedsynthError("hydra/launcher=slurm submits a sweep: add -m (a sweep of one job is fine), or it would run here")
    if not (shutil.which("sbatch") and shutil.which("srun")):
        raise MedsynthError(
            "hydra/launcher=slurm submits to SLURM, but sbatch and srun are not on PATH: run it on a machine of the cluster"
        )


def adopt_slurm_task() -> None:
    """In a task of a multi-task SLURM job step, set torchrun's variables from SLURM's
    (:func:`medsynth.training.distributed.slurm_environment`), so the output lock and the process
    group know this process's rank from the start."""
    from medsynth.training.distributed import slurm_environment

    os.environ.update(slurm_environment(os.environ))


def place_sweep_job(stage: str, cfg: Any) -> None:
    """In a job of a ``-m`` sweep, give it its own output folder and the sweep's tags
    (:func:`medsynth.config.sweep.job_values`); outside a sweep, do nothing.

    Args:
        stage: The stage the job runs.
        cfg: The job's composed config (a DictConfig), changed in place.
    """
    from omegaconf import OmegaConf, open_dict

    from medsynth.config.sweep import current_job, job_values

    job = current_job()
    if job is None:
        return
    paths = resolve(cfg.paths)
    raw = OmegaConf.to_container(cfg.paths, resolve=False)
    with open_dict(cfg):
        for key, value in job_values(job, stage, paths, raw).items():  # type: ignore[arg-type]
            if key.startswith("mlflow.tags."):
                cfg.mlflow.tags[key.removeprefix("mlflow.tags.")] = value
            else:
                OmegaConf.update(cfg, key, value, merge=False)


# Libraries whose INFO records (highdicom: ~20 "copy attributes of module ..." lines per DICOM volume)
# would bury medsynth's own log; their warnings and errors still show.
CHATTY_LIBRARIES = ("highdicom", "pydicom", "mlflow", "alembic", "urllib3", "matplotlib", "PIL", "nilearn")
LIBRARY_LOGS_ENV = "MEDSYNTH_LIBRARY_LOGS"


def quiet_libraries() -> None:
    """Keep third-party INFO and DEBUG records out of the log, unless ``MEDSYNTH_LIBRARY_LOGS=1``."""
    if os.environ.get(LIBRARY_LOGS_ENV) == "1":
        return
    for name in CHATTY_LIBRARIES:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)
    # urllib3 warns of each retry of a tracking server that is away; medsynth says it once (tracking.spool)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


@contextmanager
def user_errors(stage: str) -> Iterator[None]:
    """Turn a :class:`MedsynthError` raised inside into one line on stderr and exit status 2.

    Args:
        stage: The stage named in the message.
    """
    try:
        yield
    except MedsynthError as err:
        if os.environ.get("MEDSYNTH_DEBUG"):
            raise
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"medsynth {stage}: error: {message or type(err).__name__}", file=sys.stderr)
        sys.exit(2)


def check_overrides(stage: str, overrides: Sequence[str]) -> PipelineSettings | None:
    """Compose and check the config with ``overrides`` before Hydra starts a job.

    Hydra itself rejects an unknown key in several lines with status 1, and the checks in
    :func:`run_stage` come after Hydra made its run folder; this makes both one line, status 2,
    before anything is written. Skipped when a Hydra flag (``-m``, ``--cfg``, ``--help``, ...) is
    given: a sweep's values are checked per job in :func:`run_stage`.

    Args:
        stage: The stage named in an error message.
        overrides: The command line after the stage.

    Returns:
        The checked settings, or ``None`` when skipped.
    """
    if any(arg.startswith("-") for arg in overrides):
        return None
    with user_errors(stage):
        return compose(overrides)


@contextmanager
def claimed(stage: str, settings: PipelineSettings | None) -> Iterator[None]:
    """Hold ``paths.output`` for the whole command (:func:`medsynth.stages.context.claim_output`):
    its folders checked and its lock taken before Hydra writes its run folder there, so a
    read-only or busy output folder is one line, status 2, before any work. A sweep (``None``)
    claims per job, in the stage itself.

    Args:
        stage: The stage (or ``run``).
        settings: What :func:`check_overrides` returned.
    """
    if settings is None:
        yield
        return
    from medsynth.stages.context import claim_output
    from medsynth.stages.preprocess import holds_output

    if stage == "preprocess" and not holds_output(settings.data):  # one shard: the stage holds its shard's lock
        yield
        return
    with user_errors(stage), claim_output(settings.run, stage):
        yield


def hydra_entry(stage: str) -> Callable[[], Any]:
    """The entry point of ``stage``: what ``medsynth <stage>`` and ``pipelines/<stage>.py`` run.

    Args:
        stage: One of :data:`STAGES`.

    Returns:
        A function of no arguments that reads the overrides from ``sys.argv[1:]``, checks them
        (:func:`check_overrides`) and runs the stage as a Hydra job.
    """
    import hydra

    def job(cfg: Any) -> None:
        run_stage(stage, cfg)

    job.__module__ = f"medsynth.stages.{stage}"  # Hydra names the job (and its log file) after this module
    hydra_main = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")(job)

    def entry() -> Any:
        adopt_slurm_task()
        sys.argv[1:] = expand_aliases(sys.argv[1:])
        with user_errors(stage):
            check_launcher(sys.argv[1:])
        with claimed(stage, check_overrides(stage, sys.argv[1:])):
            return hydra_main()

    return entry


def verify_command(args: Sequence[str]) -> int:
    """``medsynth verify PATH [--audit METRICS_JSON]``: re-check a synthetic set against its audit.

    Args:
        args: The arguments after ``verify``.

    Returns:
        0 on PASS, 1 on FAIL, 2 for a usage error (no path, no audit found).
    """
    from medsynth.evaluation.provenance import verify

    usage = "usage: medsynth verify PATH [--audit METRICS_JSON]"
    rest, audit = list(args), None
    if "--audit" in rest:
        i = rest.index("--audit")
        if i + 1 >= len(rest):
            print(f"medsynth verify: error: --audit needs a file; {usage}", file=sys.stderr)
            return 2
        audit = rest[i + 1]
        del rest[i : i + 2]
    if len(rest) != 1 or rest[0].startswith("-"):
        print(f"medsynth verify: error: give one PATH; {usage}", file=sys.stderr)
        return 2
    try:
        result = verify(rest[0], audit=audit)
    except MedsynthError as err:
        if os.environ.get("MEDSYNTH_DEBUG"):
            raise
        print(f"medsynth verify: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(result)
    return 0 if result.passed else 1


def sync_command(args: Sequence[str]) -> int:
    """``medsynth sync PATH``: send a run's journaled MLflow writes (:func:`medsynth.tracking.spool.sync`).

    Args:
        args: The arguments after ``sync``.

    Returns:
        0 once everything is sent (or nothing was journaled), 2 for a usage error or a server that
        does not answer or refuses.
    """
    if len(args) != 1 or args[0].startswith("-"):
        print("medsynth sync: error: give one PATH (a run's paths.output); usage: medsynth sync PATH", file=sys.stderr)
        return 2
    from medsynth.io import output_lock
    from medsynth.tracking.spool import SPOOL_FOLDER, sync

    folder = Path(args[0])
    output = folder.parent if folder.name == SPOOL_FOLDER else folder
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    try:
        if not output.is_dir():
            raise MedsynthError(f"no folder {output}: give a run's paths.output")
        with output_lock(output, stage="sync"):  # not while a stage of that run still writes to the journal
            print(sync(output))
    except MedsynthError as err:
        if os.environ.get("MEDSYNTH_DEBUG"):
            raise
        print(f"medsynth sync: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``medsynth <stage> [overrides]`` to the stage's Hydra entry (``medsynth verify PATH``
    runs without Hydra: :func:`verify_command`).

    Args:
        argv: The arguments after ``medsynth`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status (a failing stage exits itself, with status 2 for a user error).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE.format(config=config_dir(), presets=_presets()))
        return 0 if args else 2
    stage, overrides = args[0], args[1:]
    if stage == "verify":
        return verify_command(overrides)
    if stage == "sync":
        return sync_command(overrides)
    if stage not in STAGES:
        print(
            f"medsynth: unknown stage {stage!r}; choose one of: {', '.join(STAGES)} (or verify PATH, sync PATH)", file=sys.stderr
        )
        return 2
    sys.argv = [f"medsynth-{stage}", *overrides]
    hydra_entry(stage)()
    return 0


if __name__ == "__main__":
    sys.exit(main())
