"""MLflow tracking; the only module that imports mlflow."""

from __future__ import annotations

from medsynth.tracking.tracker import Tracker, flatten

__all__ = ["Tracker", "flatten"]
