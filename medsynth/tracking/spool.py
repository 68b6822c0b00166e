"""What a tracking outage leaves behind: a journal of MLflow writes, kept on disk and sent in order later.

When the tracking server stops answering (stopped, restarting, unreachable), :class:`~medsynth.tracking.Tracker`
stops waiting for it: every write from then on (metrics, params, tags, artifacts, new runs, run ends)
is appended to a journal under ``paths.output/mlflow-spool/<process>/`` (one per process, so the array
tasks of a sharded preprocess never write into one file) and training goes on. Once the server
answers again, the journal is sent in the order it was written, and writes go straight to the server
again. If it is still gone when the stage ends, the stage finishes anyway and says where the journal
is; ``medsynth sync PATH`` sends it, and any journal a killed process left, later into the same runs.

The journal is one JSON object per line (``journal.jsonl``, flushed to disk line by line); ``sent``
holds how many lines the server has (written atomically after each), so a sync that is itself cut
off resumes where it stopped; ``ids.json`` maps the ids of runs created during the outage (``local-...``)
to the ids the server gave them; ``files/`` holds a copy of every artifact spooled (a hard link where
the file system allows), since the original may be replaced before it is sent. Nothing in the spool
holds a credential: they come from the environment at send time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID

from medsynth import MedsynthError
from medsynth.io import write_json, write_text

log = logging.getLogger("medsynth")

SPOOL_FOLDER = "mlflow-spool"
LOCAL_PREFIX = "local-"

# MLflow's client retries a dead server for about 4 minutes per call; a tracker whose server may be
# away spools instead, so it gives up after a few seconds (unless the user set these). The timeout of
# one request stays MLflow's (120 s): a large checkpoint's upload through the artifact proxy needs it.
FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def is_unreachable(err: BaseException) -> bool:
    """Whether ``err`` says the tracking server did not answer (refused, timed out, 5xx after retries),
    as opposed to an answer that refuses the request (bad credentials, no permission, a bad value)."""
    import requests

    if isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)):
        return True
    if isinstance(err, MlflowException):
        message = str(err)
        if "failed with exception" in message or "failed with timeout exception" in message:
            return True
        return any(f"error code {code}" in message for code in (502, 503, 504)) or err.error_code == "TEMPORARILY_UNAVAILABLE"
    return False


def server_answers(tracking_uri: str, *, timeout: float = 3.0) -> bool:
    """Whether the server at ``tracking_uri`` answers HTTP at all (any status), in one short try."""
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, if only to refuse
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` to ``target`` (a file or a folder tree), copying where links are refused."""
    if source.is_dir():
        shutil.copytree(source, target, copy_function=_link_file)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_file(str(source), str(target))


def _link_file(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


class Spool:
    """The journal of one output folder (see the module's text).

    Args:
        folder: The spool folder (``paths.output/mlflow-spool``).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.journal = self.folder / "journal.jsonl"

    # ------------------------------------------------------------------------------------ reading

    def entries(self) -> list[dict[str, Any]]:
        """Every line of the journal, in order (a last line cut by a crash mid-write is dropped).

        Raises:
            MedsynthError: A line before the last that is not JSON: the journal was damaged.
        """
        if not self.journal.is_file():
            return []
        lines = self.journal.read_text(errors="replace").splitlines()
        entries = []
        for number, line in enumerate(lines, start=1):
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise MedsynthError(f"{self.journal}: line {number} is not JSON; the journal was damaged") from None
        return entries

    def sent(self) -> int:
        path = self.folder / "sent"
        return int(path.read_text()) if path.is_file() else 0

    def pending(self) -> int:
        """How many writes wait to be sent."""
        return max(0, len(self.entries()) - self.sent())

    def ids(self) -> dict[str, str]:
        """Ids of runs created during the outage, as the server gave them."""
        path = self.folder / "ids.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def server_id(self, run_id: str) -> str:
        """``run_id`` as the server knows it (a ``local-`` id once its run was sent)."""
        return self.ids().get(run_id, run_id)

    def tracking_uri(self) -> str | None:
        path = self.folder / "spool.json"
        return json.loads(path.read_text()).get("tracking_uri") if path.is_file() else None

    # ------------------------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the journal's lock: its process appending or sending it, or ``medsynth sync`` sending it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def add(self, entry: dict[str, Any], *, tracking_uri: str) -> None:
        """Append one write; an artifact's file is linked or copied into the spool first."""
        with self._locked():
            self._add(entry, tracking_uri=tracking_uri)

    def _add(self, entry: dict[str, Any], *, tracking_uri: str) -> None:
        if not (self.folder / "spool.json").is_file():
            write_json(self.folder / "spool.json", {"tracking_uri": tracking_uri})
        if entry["op"] == "artifact":
            source = Path(entry["path"])
            stored = Path("files") / uuid.uuid4().hex / source.name
            _link_or_copy(source, self.folder / stored)
            entry = {**entry, "path": str(stored)}
        with open(self.journal, "a") as journal:
            journal.write(json.dumps(entry, separators=(",", ":")) + "\n")
            journal.flush()
            os.fsync(journal.fileno())

    def replay(self, client: MlflowClient) -> int:
        """Send every pending write in order; each is marked sent as soon as the server has it.

        Args:
            client: A client of the server to send to.

        Returns:
            How many writes were sent.

        Raises:
            Exception: What the client raises for the write that failed (the ones before it stay sent).
        """
        with self._locked():
            return self._replay(client)

    def _replay(self, client: MlflowClient) -> int:
        entries, done = self.entries(), self.sent()
        ids = self.ids()
        for number in range(done, len(entries)):
            problem = check_entry(entries[number], root=self.folder)
            if problem:
                raise MedsynthError(
                    f"{self.journal}: line {number + 1} is not a write medsynth journals ({problem}); "
                    f"the {number - done} writes before it were sent, nothing after it"
                )
            created = apply(client, entries[number], ids=ids, root=self.folder)
            if created is not None:
                ids[entries[number]["local"]] = created
                write_json(self.folder / "ids.json", ids)
            write_text(self.folder / "sent", str(number + 1))
        if entries:
            self._clear()
        return len(entries) - done

    def _clear(self) -> None:
        """Everything is on the server: drop the journal and its files, keep the id map (a resumed
        training may still name a run by its local id)."""
        shutil.rmtree(self.folder / "files", ignore_errors=True)
        self.journal.unlink(missing_ok=True)
        (self.folder / "sent").unlink(missing_ok=True)


def new_local_id() -> str:
    """An id for a run created while the server is away."""
    return f"{LOCAL_PREFIX}{uuid.uuid4().hex}"


_STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")
_DUPLICATE = ("UNIQUE constraint failed", "duplicate key value violates unique constraint")
_DATASET_KEYS = ("name", "digest", "source_type", "source", "profile")


def _strings(value: Any, size: int) -> bool:
    """Whether ``value`` is a list of ``size``-lists that start with a string (key, value[, time, step])."""
    return isinstance(value, list) and all(isinstance(v, list) and len(v) == size and isinstance(v[0], str) for v in value)


def check_entry(entry: Any, *, root: Path) -> str | None:
    """What is wrong with one journal line, or ``None``: the journal is a file on disk like any other,
    so its lines are checked before anything is sent, and a spooled artifact must lie in the
    journal's own ``files/`` (a line naming any other file would upload it).

    Args:
        entry: The decoded line.
        root: The journal's folder.

    Returns:
        The problem in a few words, or ``None`` for a well-formed write.
    """
    if not isinstance(entry, dict):
        return "not an object"
    op = entry.get("op")
    if op != "create_run" and not isinstance(entry.get("run"), str):
        return "no run id"
    if op == "create_run":
        fields = (entry.get("local"), entry.get("experiment_id"), entry.get("name"))
        if not all(isinstance(f, str) for f in fields) or not str(entry.get("local")).startswith(LOCAL_PREFIX):
            return "a new run without its local id, experiment or name"
        tags = entry.get("tags")
        if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
            return "run tags that are not strings"
        return None if isinstance(entry.get("time"), int) else "a new run without its start time"
    if op == "batch":
        metrics = entry.get("metrics", [])
        ok = _strings(metrics, 4) and _strings(entry.get("params", []), 2) and _strings(entry.get("tags", []), 2)
        ok = ok and all(isinstance(v, (int, float)) and isinstance(t, int) and isinstance(n, int) for _, v, t, n in metrics)
        ok = ok and all(isinstance(v, str) for _, v in [*entry.get("params", []), *entry.get("tags", [])])
        return None if ok else "a batch of metrics, params or tags in the wrong shape"
    if op == "artifact":
        path, files = entry.get("path"), (root / "files").resolve()
        if not isinstance(path, str) or not (root / path).resolve().is_relative_to(files):
            return "an artifact outside the journal's files/"
        return (
            None if entry.get("artifact_path") is None or isinstance(entry.get("artifact_path"), str) else "a bad artifact path"
        )
    if op == "dataset":
        dataset = entry.get("dataset")
        if not isinstance(dataset, dict) or set(dataset) != set(_DATASET_KEYS) or not isinstance(entry.get("context"), str):
            return "a dataset in the wrong shape"
        return None
    if op == "status":
        if entry.get("status") not in _STATUSES:
            return f"a run status other than {', '.join(_STATUSES)}"
        return None if entry["status"] == "RUNNING" or isinstance(entry.get("time"), int) else "a run end without its time"
    return f"unknown write {op!r}"


def apply(client: MlflowClient, entry: Mapping[str, Any], *, ids: Mapping[str, str], root: Path | None = None) -> str | None:
    """Send one write to the server.

    Args:
        client: The server's client.
        entry: The write, as the journal holds it.
        ids: Local run ids already created on the server, and their server ids.
        root: The spool folder, that a spooled artifact's path is relative to (``None``: the path is the original).

    Returns:
        The server's id of a run this created, else ``None``.
    """
    op = entry["op"]
    run = ids.get(entry.get("run", ""), entry.get("run", ""))
    if op == "create_run":
        tags = {k: ids.get(v, v) if k == MLFLOW_PARENT_RUN_ID else v for k, v in entry["tags"].items()}
        return client.create_run(entry["experiment_id"], start_time=entry["time"], tags=tags, run_name=entry["name"]).info.run_id
    if op == "batch":
        client.log_batch(
            run,
            metrics=[Metric(k, v, t, s) for k, v, t, s in entry.get("metrics", [])],
            params=[Param(k, v) for k, v in entry.get("params", [])],
            tags=[RunTag(k, ids.get(v, v) if k == MLFLOW_PARENT_RUN_ID else v) for k, v in entry.get("tags", [])],
        )
    elif op == "artifact":
        path = (root / entry["path"]) if root is not None else Path(entry["path"])
        if path.is_dir():
            client.log_artifacts(run, str(path), artifact_path=entry.get("artifact_path"))
        else:
            client.log_artifact(run, str(path), artifact_path=entry.get("artifact_path"))
    elif op == "dataset":
        dataset = Dataset(**entry["dataset"])
        inputs = [DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, entry["context"])])]
        for attempt in range(3):
            try:
                client.log_inputs(run, datasets=inputs)
                break
            except MlflowException as err:
                # Runs of a sweep logging one new dataset at once: the server's check-then-insert lets two
                # inserts collide, and the loser's is refused. The dataset exists now; logging again links it.
                if attempt == 2 or not any(m in str(err) for m in _DUPLICATE):
                    raise
                time.sleep(0.2 * (attempt + 1))
    elif op == "status":
        if entry["status"] == "RUNNING":
            client.update_run(run, status="RUNNING")
        else:
            client.set_terminated(run, status=entry["status"], end_time=entry["time"])
    else:
        raise MedsynthError(f"the MLflow spool holds an unknown write {op!r}: it was written by another medsynth version")
    return None


def process_folder(spool: str | os.PathLike[str]) -> Path:
    """The journal folder of this process under ``spool``: its start time, host and pid, so that
    folders sort in the order their processes started."""
    return Path(spool) / f"{time.time_ns()}-{socket.gethostname()}-{os.getpid()}"


def sync(output: str | os.PathLike[str]) -> str:
    """``medsynth sync PATH``: send what tracking outages journaled under ``PATH`` (a run's output
    folder or its ``mlflow-spool`` folder) to the server each journal was meant for, oldest first.

    Args:
        output: ``paths.output`` of the run, or its ``mlflow-spool`` folder.

    Returns:
        A one-line summary.

    Raises:
        MedsynthError: The server still does not answer or refuses the writes (what was sent stays sent).
    """
    folder = Path(output)
    if folder.name != SPOOL_FOLDER:
        folder = folder / SPOOL_FOLDER
    spools = [Spool(p) for p in sorted(folder.iterdir()) if (p / "journal.jsonl").is_file()] if folder.is_dir() else []
    if not spools:
        return f"nothing to send: no journaled MLflow writes under {folder}"
    os.environ.update({k: v for k, v in FAST_FAIL.items() if k not in os.environ})
    start, sent, total = time.perf_counter(), 0, sum(spool.pending() for spool in spools)
    uris = []
    for spool in spools:
        uri = spool.tracking_uri() or ""
        uris.append(uri)
        if not server_answers(uri):
            left = sum(s.pending() for s in spools)
            raise MedsynthError(f"the MLflow server at {uri} does not answer; {left} writes stay journaled in {folder}")
        try:
            sent += spool.replay(MlflowClient(tracking_uri=uri))
        except MedsynthError:
            raise
        except Exception as err:
            left = sum(s.pending() for s in spools)
            if is_unreachable(err):
                raise MedsynthError(
                    f"the MLflow server at {uri} does not answer; {left} writes stay journaled in {folder}"
                ) from None
            raise MedsynthError(
                f"the MLflow server at {uri} refused a journaled write ({_first_line(err)}); {left} writes stay journaled in {folder}"
            ) from None
    return (
        f"sent {sent} of {total} journaled MLflow writes to {', '.join(sorted(set(uris)))} in {time.perf_counter() - start:.1f} s"
    )


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
