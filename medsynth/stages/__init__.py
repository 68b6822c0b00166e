"""The four stages and the pipeline that chains them, as library functions with typed settings.

Each stage reads only what earlier stages wrote under ``run.paths``, so any stage can be rerun
alone; each logs to its own MLflow run (nested under the pipeline run inside :func:`run_pipeline`).
"""

from __future__ import annotations

from medsynth.stages.evaluate import evaluate
from medsynth.stages.generate import generate
from medsynth.stages.pipeline import run_pipeline
from medsynth.stages.preprocess import preprocess
from medsynth.stages.train import train

__all__ = ["evaluate", "generate", "preprocess", "run_pipeline", "train"]
