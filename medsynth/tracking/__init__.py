"""MLflow tracking; the only module that imports mlflow."""

from __future__ import annotations

from medsynth.tracking.tracker import NullTracker, Tracker, TrackerLike, flatten

__all__ = ["NullTracker", "Tracker", "TrackerLike", "flatten"]
