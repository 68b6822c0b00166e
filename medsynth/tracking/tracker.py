"""A small MLflow tracker that passes run ids explicitly (no global active run).

A pipeline run is a top-level MLflow run; each stage is a nested run under it (tag
``mlflow.parentRunId``). A stage run alone is a top-level run of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlparse

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from medsynth import MedsynthError

_PARAM_BATCH = 100
_METRIC_BATCH = 500


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings to ``{"a.b.c": "value"}`` with string values (lists as their repr).

    Args:
        tree: Nested dicts, for example a resolved config.
        prefix: Key prefix used in recursion.

    Returns:
        The flat mapping.
    """
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def _default_artifact_location(tracking_uri: str) -> str | None:
    """Keep artifacts beside a local SQLite store instead of in the working directory."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite":
        return None
    db = Path(tracking_uri[len("sqlite:///") :])
    return (db.resolve().parent / "mlartifacts").as_uri()


class Tracker:
    """Logs to one MLflow experiment through an explicit run id.

    Args:
        tracking_uri: MLflow tracking URI; a ``sqlite:///file.db`` URI needs no server.
        experiment: Experiment name; created if missing.
        artifact_location: Where a newly created experiment stores artifacts; by default beside
            a SQLite store, otherwise MLflow's default.
    """

    def __init__(self, tracking_uri: str, experiment: str, *, artifact_location: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                location = artifact_location or _default_artifact_location(tracking_uri)
                try:
                    self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
                except Exception:
                    # another process (an array task) created it meanwhile: use theirs
                    found = self.client.get_experiment_by_name(experiment)
                    if found is None:
                        raise
                    self.experiment_id = found.experiment_id
            else:
                self.experiment_id = found.experiment_id
        except Exception as err:  # mlflow raises many types for a bad store
            raise MedsynthError(f"cannot open MLflow store mlflow.tracking_uri={tracking_uri}: {err}") from None
        self._pending: dict[str, list[Metric]] = {}

    def start_run(self, name: str, *, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None) -> str:
        """Create a run and return its id; nested under ``parent_run_id`` when given."""
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return run.info.run_id

    def end_run(self, run_id: str, *, status: str = "FINISHED") -> None:
        """Flush pending metrics and close the run with ``status`` (FINISHED, FAILED, KILLED)."""
        self.flush(run_id)
        self.client.set_terminated(run_id, status=status)

    def reopen_run(self, run_id: str) -> bool:
        """Mark an existing run of this store RUNNING again (to continue it); False if it is not here."""
        try:
            self.client.get_run(run_id)
        except Exception:  # mlflow raises its own error type for unknown ids
            return False
        self.client.update_run(run_id, status="RUNNING")
        return True

    @contextlib.contextmanager
    def run(
        self,
        name: str,
        *,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        resume_run_id: str | None = None,
    ) -> Iterator[str]:
        """Context manager around :meth:`start_run` / :meth:`end_run`; a failure marks the run FAILED.

        With ``resume_run_id`` naming a run of this store, that run is continued instead of a new one started.
        """
        if resume_run_id and self.reopen_run(resume_run_id):
            run_id = resume_run_id
        else:
            run_id = self.start_run(name, parent_run_id=parent_run_id, tags=tags)
        try:
            yield run_id
        except BaseException:
            self.end_run(run_id, status="FAILED")
            raise
        self.end_run(run_id)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log parameters in batches (values are stringified)."""
        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(run_id, params=items[start : start + _PARAM_BATCH])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set tags on a run."""
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], *, step: int = 0, buffered: bool = False) -> None:
        """Log metrics at ``step``; ``buffered=True`` queues them until :meth:`flush` (for per-step losses)."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._pending.setdefault(run_id, []).extend(items)
        if not buffered or len(self._pending[run_id]) >= _METRIC_BATCH:
            self.flush(run_id)

    def flush(self, run_id: str) -> None:
        """Send queued metrics of ``run_id``."""
        items = self._pending.pop(run_id, [])
        for start in range(0, len(items), _METRIC_BATCH):
            self.client.log_batch(run_id, metrics=items[start : start + _METRIC_BATCH])

    def log_artifact(self, run_id: str, path: str | os.PathLike[str], *, artifact_path: str | None = None) -> None:
        """Upload a file or folder as an artifact of the run."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path=artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path=artifact_path)

    def log_dataset(
        self, run_id: str, *, name: str, sha256: str, source: str | os.PathLike[str], context: str, num_records: int | None = None
    ) -> None:
        """Record a dataset as an input of the run (the MLflow UI lists it under the run's datasets).

        Args:
            run_id: The run.
            name: The dataset's name.
            sha256: SHA-256 of its manifest; the dataset's digest is its first 16 digits, the
                profile holds all of them.
            source: The dataset's folder.
            context: What the run did with it (``training``, ``synthetic``, ``evaluation``).
            num_records: How many records it holds, shown in its profile.
        """
        profile = {"sha256": sha256, **({"num_records": int(num_records)} if num_records is not None else {})}
        dataset = Dataset(
            name=name,
            digest=sha256[:16],
            source_type="local",
            source=json.dumps({"uri": Path(source).resolve().as_uri()}),
            profile=json.dumps(profile),
        )
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])


class NullTracker:
    """A tracker that records nothing: what the non-main processes of a data-parallel job use.

    It has exactly :class:`Tracker`'s logging methods (see :class:`TrackerLike`), so a misspelt
    call fails here as it would on the real tracker.
    """

    tracking_uri = ""

    @contextlib.contextmanager
    def run(
        self,
        name: str,
        *,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        resume_run_id: str | None = None,
    ) -> Iterator[str]:
        yield ""

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], *, step: int = 0, buffered: bool = False) -> None:
        pass

    def flush(self, run_id: str) -> None:
        pass

    def log_artifact(self, run_id: str, path: str | os.PathLike[str], *, artifact_path: str | None = None) -> None:
        pass

    def log_dataset(
        self, run_id: str, *, name: str, sha256: str, source: str | os.PathLike[str], context: str, num_records: int | None = None
    ) -> None:
        pass


@runtime_checkable
class TrackerLike(Protocol):
    """What the stages call on a tracker: :class:`Tracker` and :class:`NullTracker` both provide it."""

    tracking_uri: str

    def run(
        self,
        name: str,
        *,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        resume_run_id: str | None = None,
    ) -> contextlib.AbstractContextManager[str]: ...

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None: ...

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None: ...

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], *, step: int = 0, buffered: bool = False) -> None: ...

    def flush(self, run_id: str) -> None: ...

    def log_artifact(self, run_id: str, path: str | os.PathLike[str], *, artifact_path: str | None = None) -> None: ...

    def log_dataset(
        self, run_id: str, *, name: str, sha256: str, source: str | os.PathLike[str], context: str, num_records: int | None = None
    ) -> None: ...
