"""``medsynth run``: the four stages in order under one MLflow pipeline run."""

from __future__ import annotations

import logging
import time

from medsynth.config import PipelineSettings, to_mapping
from medsynth.config.settings import require_label_source
from medsynth.stages.context import claim_output, log_config, make_tracker, stage_tags
from medsynth.stages.evaluate import evaluate
from medsynth.stages.generate import generate
from medsynth.stages.preprocess import preprocess
from medsynth.stages.train import train
from medsynth.tracking import TrackerLike

log = logging.getLogger("medsynth")


def run_pipeline(settings: PipelineSettings, *, tracker: TrackerLike | None = None) -> str:
    """Preprocess, train, generate and evaluate, each as a nested run of one pipeline run.

    Args:
        settings: The whole checked config (:func:`medsynth.config.compose` or the dataclasses).
        tracker: Tracker to log to (default: from ``settings.mlflow``).

    Returns:
        The MLflow id of the pipeline run.

    Raises:
        MedsynthError: For an output folder that another run holds or that cannot be written
            (before any work), and for what the stages raise.

    The run holds ``paths.output`` for all four stages (:func:`~medsynth.stages.context.claim_output`),
    so no other run writes there between them, and its own stages do not block each other.
    """
    run = settings.run
    if settings.generate.checkpoint == f"{run.paths.checkpoints}/last.pt":  # generating from the model trained here
        require_label_source(settings.model.conditioning, settings.generate.labels)
    with claim_output(run, "run"):
        return _run_stages(settings, tracker=tracker or make_tracker(run))


def _run_stages(settings: PipelineSettings, *, tracker: TrackerLike) -> str:
    """The body of :func:`run_pipeline`, inside its claim on the output folder."""
    run = settings.run
    start = time.perf_counter()
    with tracker.run(f"{settings.name}-pipeline", tags=stage_tags(run, "pipeline")) as run_id:
        log_config(tracker, run_id, to_mapping(settings), folder=run.paths.output)
        preprocess(settings=settings.data, run=run, tracker=tracker, parent_run_id=run_id)
        train(
            model=settings.model,
            scheduler=settings.scheduler,
            trainer=settings.trainer,
            run=run,
            tracker=tracker,
            parent_run_id=run_id,
        )
        generate(
            settings=settings.generate,
            encoder=settings.encoder,
            privacy=settings.privacy,
            run=run,
            tracker=tracker,
            parent_run_id=run_id,
        )
        evaluate(
            settings=settings.evaluate,
            encoder=settings.encoder,
            privacy=settings.privacy,
            run=run,
            tracker=tracker,
            parent_run_id=run_id,
        )
        tracker.log_metrics(run_id, {"pipeline_seconds": time.perf_counter() - start})
    print(f"\nmedsynth run finished in {time.perf_counter() - start:.0f} s; outputs in {run.paths.output}")
    print(f"MLflow run id: {run_id} (experiment '{run.mlflow.experiment_name}')")
    print(f"See it with: mlflow ui --backend-store-uri {run.mlflow.tracking_uri}")
    return run_id
