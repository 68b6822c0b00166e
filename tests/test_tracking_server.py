"""The shared tracking server fixture (tests/tracking_server.py) against a real PostgreSQL and ``mlflow server``.

One server for the module: the admin logs a run with an artifact through the proxy and the rows
land in PostgreSQL; requests without credentials or with a wrong password get 401, a user
without a grant 403; the model registry serves a version's files; a stop and start keeps the
port and the data. Skipped only where PostgreSQL or the Python drivers are missing.
"""

from __future__ import annotations

import contextlib
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException

from tests.servers import group_alive
from tests.tracking_server import Server, postgres_unavailable_reason, shared_tracking_server

# What MLflow's client answers a wrong password with: 401 is not a transient code, so it is not retried.
UNAUTHENTICATED_MESSAGE = ("API request to endpoint /api/2.0/mlflow/experiments/search failed with error code 401 != 200. "
                           "Response body: 'You are not authenticated. Please see "
                           "https://www.mlflow.org/docs/latest/auth/index.html#authenticating-to-mlflow on how to authenticate.'")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One shared tracking server for the module; afterwards no process of it or of PostgreSQL is left."""
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    # a checked login is cached for a minute, as docs/deploy.md sets it (a wrong password never is)
    with shared_tracking_server(tmp_path_factory.mktemp("tracking-server"), auth_cache_seconds=60) as running:
        yield running
        processes = [running.postgres.process, running.process]
        pg_folder = running.postgres.folder
    assert not any(p is not None and group_alive(p) for p in processes), "a server process outlived the fixture"
    assert not pg_folder.exists()


@pytest.fixture(autouse=True)
def short_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead server fails a request in seconds, not after MLflow's default ~4 minutes of retries."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def as_user(monkeypatch: pytest.MonkeyPatch, server: Server, user: tuple[str, str] | None = None) -> MlflowClient:
    """A client of ``server`` authenticating as ``user`` (default: the admin) through the environment."""
    for key, value in server.client_env(user).items():
        monkeypatch.setenv(key, value)
    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


def logged_run(client: MlflowClient, folder: Path) -> tuple[str, str]:
    """A new experiment with one finished run: a param, a metric, ``note.txt`` and a ``model/`` folder; its ids."""
    experiment_id = client.create_experiment(f"shared-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_param(run_id, "lr", "0.001")
    client.log_metric(run_id, "loss", 0.25, step=3)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "note.txt").write_text("through the proxy\n")
    client.log_artifact(run_id, str(folder / "note.txt"))
    (folder / "model").mkdir(exist_ok=True)
    (folder / "model" / "weights.bin").write_bytes(b"\x00\x01weights")
    client.log_artifacts(run_id, str(folder / "model"), artifact_path="model")
    client.set_terminated(run_id)
    return experiment_id, run_id


def status_of(url: str, auth: tuple[str, str] | None = None) -> int:
    """The HTTP status of ``GET url`` with plain urllib (basic auth when given)."""
    request = urllib.request.Request(url)
    if auth:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_admin_logs_through_the_proxy_into_postgres(server: Server, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    client = as_user(monkeypatch, server)
    experiment_id, run_id = logged_run(client, tmp_path / "logged")

    run = client.get_run(run_id)
    assert run.data.params == {"lr": "0.001"}
    assert run.data.metrics == {"loss": 0.25}
    assert run.info.artifact_uri == f"mlflow-artifacts:/{experiment_id}/{run_id}/artifacts"
    note = download_artifacts(run_id=run_id, artifact_path="note.txt", dst_path=str(tmp_path / "back"),
                              tracking_uri=server.uri)
    assert Path(note).read_text() == "through the proxy\n"
    # The proxy stored the file in its destination folder; the client never wrote there itself.
    assert (server.artifacts / experiment_id / run_id / "artifacts" / "note.txt").read_text() == "through the proxy\n"

    with contextlib.closing(server.postgres.connect()) as db, db.cursor() as cursor:
        cursor.execute("SELECT name, artifact_location FROM experiments WHERE experiment_id = %s", (int(experiment_id),))
        assert cursor.fetchone() == (client.get_experiment(experiment_id).name, f"mlflow-artifacts:/{experiment_id}")
        cursor.execute("SELECT key, value FROM params WHERE run_uuid = %s", (run_id,))
        assert cursor.fetchall() == [("lr", "0.001")]
        cursor.execute("SELECT key, value, step FROM metrics WHERE run_uuid = %s", (run_id,))
        assert cursor.fetchall() == [("loss", 0.25, 3)]
        cursor.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,))
        assert cursor.fetchone() == ("FINISHED",)
    with contextlib.closing(server.postgres.connect("mlflow_auth")) as db, db.cursor() as cursor:
        cursor.execute("SELECT username, is_admin FROM users WHERE username = %s", (server.admin[0],))
        assert cursor.fetchone() == (server.admin[0], True)


def test_requests_without_credentials_get_401(server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    experiment_id, run_id = logged_run(as_user(monkeypatch, server), tmp_path)
    assert status_of(f"{server.uri}/health") == 200  # the one unprotected route (besides static files)
    for path in ["/api/2.0/mlflow/experiments/search?max_results=10",
                 "/ajax-api/2.0/mlflow/experiments/search?max_results=10",  # what the web UI calls
                 f"/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{run_id}/artifacts/note.txt"]:
        assert status_of(server.uri + path) == 401, path
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=10", timeout=30)
    assert raised.value.headers["WWW-Authenticate"] == 'Basic realm="mlflow"'
    assert status_of(f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=10", auth=server.admin) == 200


def test_wrong_password_is_401_without_retries(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow's default retry settings: a 401 is not retried, so the answer comes at once all the same.
    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(key)
    assert status_of(f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=10",
                     auth=(server.admin[0], "not-the-password")) == 401
    client = as_user(monkeypatch, server, (server.admin[0], "not-the-password"))
    began = time.monotonic()
    with pytest.raises(MlflowException) as raised:
        client.search_experiments()
    elapsed = time.monotonic() - began
    assert type(raised.value) is MlflowException
    assert raised.value.error_code == "UNAUTHENTICATED"
    assert raised.value.get_http_status_code() == 401
    assert str(raised.value) == UNAUTHENTICATED_MESSAGE
    assert elapsed < 5, f"a wrong password took {elapsed:.1f} s to report"
    with pytest.raises(MlflowException) as unknown:
        as_user(monkeypatch, server, ("nobody", "whatever")).search_experiments()
    assert unknown.value.error_code == "UNAUTHENTICATED"  # an unknown user reads the same as a wrong password


def test_user_sees_only_what_is_granted(server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    experiment_id, run_id = logged_run(as_user(monkeypatch, server), tmp_path / "logged")
    reader = (f"reader-{uuid.uuid4().hex[:6]}", f"pw-{uuid.uuid4().hex}")
    created = server.create_user(*reader)
    assert created["username"] == reader[0] and not created["is_admin"]
    client = as_user(monkeypatch, server, reader)
    proxy = f"{server.uri}/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{run_id}/artifacts/note.txt"

    with pytest.raises(MlflowException) as denied:
        client.get_run(run_id)
    assert denied.value.error_code == "PERMISSION_DENIED"
    assert denied.value.get_http_status_code() == 403
    assert experiment_id not in {e.experiment_id for e in client.search_experiments()}
    assert status_of(proxy, auth=reader) == 403  # the artifact proxy checks the experiment's permission too

    server.grant(experiment_id, reader[0], "READ")
    assert client.get_run(run_id).data.params == {"lr": "0.001"}
    assert experiment_id in {e.experiment_id for e in client.search_experiments()}
    assert status_of(proxy, auth=reader) == 200
    note = download_artifacts(run_id=run_id, artifact_path="note.txt", dst_path=str(tmp_path / "back"),
                              tracking_uri=server.uri)
    assert Path(note).read_text() == "through the proxy\n"
    with pytest.raises(MlflowException) as read_only:
        client.log_param(run_id, "more", "1")
    assert read_only.value.get_http_status_code() == 403
    response = requests.put(proxy.replace("note.txt", "planted.txt"), data=b"x", auth=reader, timeout=30)
    assert response.status_code == 403


def test_model_registry_serves_a_version(server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    client = as_user(monkeypatch, server)
    _, run_id = logged_run(client, tmp_path / "logged")
    name = f"shared-model-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    version = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id)
    assert version.version == "1"
    assert client.get_model_version(name, "1").status == "READY"
    local = download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "registry"), tracking_uri=server.uri,
                               registry_uri=server.uri)
    assert (Path(local) / "weights.bin").read_bytes() == b"\x00\x01weights"


def test_stop_and_start_keep_port_and_data(server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    client = as_user(monkeypatch, server)
    experiment_id, run_id = logged_run(client, tmp_path / "logged")
    uri = server.uri

    server.stop()
    assert not server.running
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException, match="Connection refused"):
        client.get_run(run_id)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    seconds = server.start()

    assert server.running and server.uri == uri and seconds == server.start_seconds[-1]
    assert client.get_run(run_id).data.params == {"lr": "0.001"}
    note = download_artifacts(run_id=run_id, artifact_path="note.txt", dst_path=str(tmp_path / "back"),
                              tracking_uri=server.uri)
    assert Path(note).read_text() == "through the proxy\n"
    assert status_of(f"{server.uri}/api/2.0/mlflow/experiments/get?experiment_id={experiment_id}", auth=server.admin) == 200
    assert status_of(f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=10") == 401  # still guarded
    print(f"\nshared tracking server: first start {server.start_seconds[0]:.1f} s, restart {seconds:.1f} s")
