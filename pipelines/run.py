"""All four stages in order under one MLflow pipeline run: preprocess, train, generate, evaluate."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from medsynth import __version__
from pipelines import evaluate, generate, preprocess, train
from pipelines.common import CONFIG_DIR, exit_on_user_error, log_config, make_tracker

log = logging.getLogger("medsynth")


def run(cfg: DictConfig) -> str:
    """Run the whole pipeline and return the MLflow id of the pipeline run."""
    tracker = make_tracker(cfg)
    start = time.perf_counter()
    tags = {"medsynth.stage": "pipeline", "medsynth.version": __version__, "medsynth.output": str(Path(cfg.paths.output).resolve())}
    with tracker.run(f"{cfg.name}-pipeline", tags=tags) as run_id:
        log_config(tracker, run_id, cfg)
        for stage in (preprocess, train, generate, evaluate):
            stage.run(cfg, tracker=tracker, parent_run_id=run_id)
        tracker.log_metrics(run_id, {"pipeline_seconds": time.perf_counter() - start})
    print(f"\nmedsynth run finished in {time.perf_counter() - start:.0f} s; outputs in {cfg.paths.output}")
    print(f"MLflow run id: {run_id} (experiment '{cfg.mlflow.experiment_name}')")
    print(f"See it with: mlflow ui --backend-store-uri {cfg.mlflow.tracking_uri}")
    return run_id


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    exit_on_user_error("run", run, cfg)


if __name__ == "__main__":
    main()
