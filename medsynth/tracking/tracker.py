"""A small MLflow tracker that passes run ids explicitly (no global active run).

A pipeline run is a top-level MLflow run; each stage is a nested run under it (tag
``mlflow.parentRunId``). A stage run alone is a top-level run of its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlparse

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from medsynth import MedsynthError
from medsynth.tracking.spool import (
    FAST_FAIL,
    LOCAL_PREFIX,
    Spool,
    apply,
    is_unreachable,
    new_local_id,
    process_folder,
    server_answers,
)

log = logging.getLogger("medsynth")

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

    With ``spool`` set (a folder) and a tracking server over HTTP, a server that stops answering
    does not stop the work: writes are journaled in ``spool`` and sent in order once it answers
    again (:mod:`medsynth.tracking.spool`), tried at most every ``retry_seconds``.

    Args:
        tracking_uri: MLflow tracking URI; a ``sqlite:///file.db`` URI needs no server.
        experiment: Experiment name; created if missing.
        artifact_location: Where a newly created experiment stores artifacts; by default beside
            a SQLite store, otherwise MLflow's default.
        spool: Where to journal writes during a server outage (``paths.output/mlflow-spool``; this
            process's journal is a folder of its own in there).
        retry_seconds: How often to look for the server again during an outage.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        *,
        artifact_location: str | None = None,
        spool: str | os.PathLike[str] | None = None,
        retry_seconds: float = 30.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        remote = urlparse(tracking_uri).scheme in ("http", "https")
        if remote:
            os.environ.update({k: v for k, v in FAST_FAIL.items() if k not in os.environ})
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
            raise MedsynthError(store_error(tracking_uri, experiment, err)) from None
        self._pending: dict[str, list[Metric]] = {}
        self.spool = Spool(process_folder(spool)) if spool is not None and remote else None
        self._retry_seconds = retry_seconds
        self._next_try = 0.0

    # ------------------------------------------------------------------ every write goes through here

    def _write(self, entry: dict[str, Any]) -> str | None:
        """Send one write (see :func:`medsynth.tracking.spool.apply`), or journal it while the server is away."""
        if self.spool is None:
            return apply(self.client, entry, ids={})
        if self._online():
            try:
                return apply(self.client, entry, ids=self.spool.ids())
            except Exception as err:
                if not is_unreachable(err):
                    raise
                log.warning(
                    "MLflow server %s does not answer (%s); journaling its writes in %s and going on",
                    self.tracking_uri,
                    _one_line(err),
                    self.spool.folder,
                )
                self._next_try = time.monotonic() + self._retry_seconds
        self.spool.add(entry, tracking_uri=self.tracking_uri)
        return None

    def _online(self, *, now: bool = False) -> bool:
        """Whether writes may go straight to the server: nothing is journaled, or the journal was just sent."""
        assert self.spool is not None
        if not self.spool.journal.is_file():
            return True
        if not now and time.monotonic() < self._next_try:
            return False
        self._next_try = time.monotonic() + self._retry_seconds
        if not server_answers(self.tracking_uri):
            return False
        pending, start = self.spool.pending(), time.perf_counter()
        try:
            self.spool.replay(self.client)
        except Exception as err:
            if not is_unreachable(err):
                raise
            return False
        log.info(
            "MLflow server %s answers again: sent %d journaled writes in %.1f s",
            self.tracking_uri,
            pending,
            time.perf_counter() - start,
        )
        return True

    def _run_id(self, run_id: str) -> str:
        """A run id as the server knows it (a run created during an outage has a local id until sent)."""
        return self.spool.server_id(run_id) if self.spool is not None else run_id

    # ------------------------------------------------------------------------------------ runs

    def start_run(self, name: str, *, parent_run_id: str | None = None, tags: Mapping[str, str] | None = None) -> str:
        """Create a run and return its id; nested under ``parent_run_id`` when given."""
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        local = new_local_id()
        entry = {
            "op": "create_run",
            "local": local,
            "experiment_id": self.experiment_id,
            "name": name,
            "tags": all_tags,
            "time": int(time.time() * 1000),
        }
        return self._write(entry) or local

    def end_run(self, run_id: str, *, status: str = "FINISHED") -> None:
        """Flush pending metrics and close the run with ``status`` (FINISHED, FAILED, KILLED).

        After an outage, the journal is sent now if the server answers; if not, a warning says where it is.
        """
        self.flush(run_id)
        self._write({"op": "status", "run": run_id, "status": status, "time": int(time.time() * 1000)})
        if self.spool is not None and self.spool.journal.is_file() and not self._online(now=True):
            log.warning(
                "MLflow server %s still does not answer: %d writes are journaled in %s; send them with: medsynth sync %s",
                self.tracking_uri,
                self.spool.pending(),
                self.spool.folder,
                self.spool.folder.parent.parent,
            )

    def reopen_run(self, run_id: str) -> str | None:
        """Mark an existing run of this store RUNNING again (to continue it).

        Returns:
            Its id (as the server knows it, or a local id still journaled), or ``None`` if it is not here.
        """
        run_id = self._run_id(run_id)
        if not run_id.startswith(LOCAL_PREFIX):
            try:
                self.client.get_run(run_id)
            except Exception as err:  # mlflow raises its own error type for unknown ids
                if self.spool is None or not is_unreachable(err):
                    return None
        elif self.spool is None or not any(e.get("local") == run_id for e in self.spool.entries()):
            return None
        self._write({"op": "status", "run": run_id, "status": "RUNNING"})
        return run_id

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
        run_id = (self.reopen_run(resume_run_id) if resume_run_id else None) or self.start_run(
            name, parent_run_id=parent_run_id, tags=tags
        )
        try:
            yield run_id
        except BaseException:
            self.end_run(run_id, status="FAILED")
            raise
        self.end_run(run_id)

    # ------------------------------------------------------------------------------------ logging

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log parameters in batches (values are stringified)."""
        items = [[k, str(v)] for k, v in params.items()]
        for start in range(0, len(items), _PARAM_BATCH):
            self._write({"op": "batch", "run": run_id, "params": items[start : start + _PARAM_BATCH]})

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set tags on a run."""
        self._write({"op": "batch", "run": run_id, "tags": [[k, str(v)] for k, v in tags.items()]})

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], *, step: int = 0, buffered: bool = False) -> None:
        """Log metrics at ``step``; ``buffered=True`` queues them until :meth:`flush` (for per-step losses)."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._pending.setdefault(run_id, []).extend(items)
        if not buffered or len(self._pending[run_id]) >= _METRIC_BATCH:
            self.flush(run_id)

    def flush(self, run_id: str) -> None:
        """Send queued metrics of ``run_id``."""
        items = [[m.key, m.value, m.timestamp, m.step] for m in self._pending.pop(run_id, [])]
        for start in range(0, len(items), _METRIC_BATCH):
            self._write({"op": "batch", "run": run_id, "metrics": items[start : start + _METRIC_BATCH]})

    def log_artifact(self, run_id: str, path: str | os.PathLike[str], *, artifact_path: str | None = None) -> None:
        """Upload a file or folder as an artifact of the run."""
        self._write({"op": "artifact", "run": run_id, "path": str(Path(path).absolute()), "artifact_path": artifact_path})

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
        dataset = {
            "name": name,
            "digest": sha256[:16],
            "source_type": "local",
            "source": json.dumps({"uri": Path(source).resolve().as_uri()}),
            "profile": json.dumps(profile),
        }
        self._write({"op": "dataset", "run": run_id, "dataset": dataset, "context": context})


def store_error(tracking_uri: str, experiment: str, err: BaseException) -> str:
    """One line for a tracking store that cannot be opened: no answer, credentials refused, no permission, or else."""
    code = getattr(err, "error_code", None)
    if code == "UNAUTHENTICATED":
        return (
            f"the MLflow server at {tracking_uri} refused the credentials: set MLFLOW_TRACKING_USERNAME and "
            f"MLFLOW_TRACKING_PASSWORD (or a netrc entry for its host) to an account of that server"
        )
    if code == "PERMISSION_DENIED":
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "this user")
        return (
            f"the MLflow server at {tracking_uri} gives {user} no permission on experiment {experiment!r}: "
            f"ask its administrator for EDIT on it, or pick another with mlflow.experiment_name"
        )
    if is_unreachable(err):
        return f"the MLflow server at {tracking_uri} does not answer (mlflow.tracking_uri): {_one_line(err)}"
    return f"cannot open MLflow store mlflow.tracking_uri={tracking_uri}: {_one_line(err)}"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:400] or type(err).__name__


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
