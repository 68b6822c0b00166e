"""medsynth against a shared tracking server as a hospital runs one: `mlflow server` over PostgreSQL,
with the artifact proxy and basic-auth logins (tests/tracking_server.py starts both on loopback).

The whole pipeline, the registry, generating from `models:/NAME/VERSION` and serving from the registry
work with the credentials in MLflow's standard environment variables; those credentials appear in
nothing medsynth writes; wrong credentials and a user without permission get one clear line.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY, phantom_overrides, write_phantom
from tests.servers import free_port, post, serve_model, stop, wait_until_up
from tests.tracking_server import Server, postgres_unavailable_reason, shared_tracking_server

NAME = "brain-generator"


def _medsynth(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_") and k != "MEDSYNTH_DEBUG"}
    return subprocess.run([sys.executable, "-m", "medsynth.cli", *args], cwd=cwd, env={**clean, **env},
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    # a hospital server caches a checked login for a minute (docs/deploy.md); without it every request hashes the password
    with shared_tracking_server(tmp_path_factory.mktemp("shared-server"), auth_cache_seconds=60) as running:
        yield running


@pytest.fixture(scope="module")
def pipeline(server: Server, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """`medsynth run` as the admin, registering its generator, then `generate` from the registered version."""
    root = tmp_path_factory.mktemp("shared-pipeline")
    image, label = write_phantom(root / "raw")
    env = {"MLFLOW_TRACKING_USERNAME": server.admin[0], "MLFLOW_TRACKING_PASSWORD": server.admin[1]}
    common = [*TINY, *phantom_overrides(image, label), f"mlflow.tracking_uri={server.uri}"]
    run = _medsynth("run", *common, f"paths.output={root / 'out'}", f"mlflow.register_model={NAME}", cwd=root, env=env)
    generate = _medsynth("generate", *common, f"paths.output={root / 'again'}", f"paths.data={root / 'out' / 'data'}",
                         f"generate.checkpoint=models:/{NAME}/1",
                         cwd=root, env=env)
    return SimpleNamespace(root=root, env=env, run=run, generate=generate)


def _admin_client(server: Server, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", server.admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.admin[1])
    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


def test_the_pipeline_registry_and_generation_from_the_registry(server: Server, pipeline: SimpleNamespace,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert pipeline.run.returncode == 0, pipeline.run.stderr[-3000:]
    assert pipeline.generate.returncode == 0, pipeline.generate.stderr[-3000:]
    assert (pipeline.root / "again" / "synthetic" / "manifest.csv").is_file()

    client = _admin_client(server, monkeypatch)
    experiment = client.get_experiment_by_name("medsynth")
    runs = client.search_runs([experiment.experiment_id])
    stages = sorted(r.data.tags["medsynth.stage"] for r in runs)
    assert stages == ["evaluate", "generate", "generate", "pipeline", "preprocess", "train"]  # the pipeline, then generate
    assert all(r.info.status == "FINISHED" for r in runs)
    (version,) = client.search_model_versions(f"name = '{NAME}'")
    assert version.version == "1"
    # the artifacts went through the proxy into the server's own store
    (train,) = [r for r in runs if r.data.tags["medsynth.stage"] == "train"]
    assert train.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert any(server.artifacts.rglob("last.pt")) or any(server.artifacts.rglob("*.pt"))
    with contextlib.closing(server.postgres.connect()) as db, db.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM metrics WHERE key = 'loss'")
        assert cursor.fetchone()[0] == 3  # TINY trains 3 steps: every loss is a row in PostgreSQL


def test_serving_from_the_registry_with_the_credentials_in_the_environment(server: Server, pipeline: SimpleNamespace) -> None:
    assert pipeline.run.returncode == 0, pipeline.run.stderr[-3000:]
    port, log_path = free_port(), pipeline.root / "serve.log"
    served = serve_model(f"models:/{NAME}/1", port=port, log_path=log_path,
                         env={"MLFLOW_TRACKING_URI": server.uri, **pipeline.env})
    try:
        wait_until_up(f"http://127.0.0.1:{port}", served, log_path)
        label_map = [[1 if 4 <= i < 12 and 4 <= j < 12 else 0 for j in range(16)] for i in range(16)]
        status, body = post(f"http://127.0.0.1:{port}/invocations",
                            {"dataframe_split": {"columns": ["seed", "steps", "label_map"], "data": [[3, 3, label_map]]}})
        assert status == 200, body[:500]
        (prediction,) = json.loads(body)["predictions"]
        assert prediction["seed"] == 3 and prediction["label"] == label_map
    finally:
        stop(served)


def _stored_text(server: Server) -> str:
    """Every value in the tracking database and every file of the artifact store, as text."""
    parts = []
    with contextlib.closing(server.postgres.connect()) as db, db.cursor() as cursor:
        cursor.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
        for (table,) in cursor.fetchall():
            cursor.execute(f'SELECT * FROM "{table}"')
            parts.extend(repr(row) for row in cursor.fetchall())
    parts.extend(p.read_bytes().decode("latin-1") for p in server.artifacts.rglob("*") if p.is_file())
    return "\n".join(parts)


def test_no_credential_appears_in_anything_medsynth_wrote(server: Server, pipeline: SimpleNamespace) -> None:
    assert pipeline.run.returncode == 0, pipeline.run.stderr[-3000:]
    password = server.admin[1]
    written = [p for folder in ("out", "again") for p in (pipeline.root / folder).rglob("*") if p.is_file()]
    assert len(written) > 20
    for path in written:
        assert password.encode() not in path.read_bytes(), path
    for done in (pipeline.run, pipeline.generate):
        assert password not in done.stdout + done.stderr
    stored = _stored_text(server)
    assert "medsynth.stage" in stored and "loss" in stored  # the search did read the runs
    assert password not in stored


def test_wrong_credentials_are_one_line(server: Server, pipeline: SimpleNamespace) -> None:
    wrong = {"MLFLOW_TRACKING_USERNAME": server.admin[0], "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    done = _medsynth("train", *TINY, f"paths.output={pipeline.root / 'out'}", f"mlflow.tracking_uri={server.uri}",
                     cwd=pipeline.root, env=wrong)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"medsynth train: error: the MLflow server at {server.uri} refused the credentials: set MLFLOW_TRACKING_USERNAME "
        "and MLFLOW_TRACKING_PASSWORD (or a netrc entry for its host) to an account of that server"]
    assert "not-the-password" not in done.stdout + done.stderr


def test_a_user_without_permission_can_neither_log_nor_read(server: Server, pipeline: SimpleNamespace,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    assert pipeline.run.returncode == 0, pipeline.run.stderr[-3000:]
    server.create_user("visitor", "visitor-password-123")
    visitor = {"MLFLOW_TRACKING_USERNAME": "visitor", "MLFLOW_TRACKING_PASSWORD": "visitor-password-123"}
    done = _medsynth("train", *TINY, f"paths.output={pipeline.root / 'out'}", f"mlflow.tracking_uri={server.uri}",
                     cwd=pipeline.root, env=visitor)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"medsynth train: error: the MLflow server at {server.uri} gives visitor no permission on experiment 'medsynth': "
        "ask its administrator for EDIT on it, or pick another with mlflow.experiment_name"]

    experiment_id = _admin_client(server, monkeypatch).get_experiment_by_name("medsynth").experiment_id
    (run,) = _admin_client(server, monkeypatch).search_runs([experiment_id], "tags.`medsynth.stage` = 'train'")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "visitor")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "visitor-password-123")
    with pytest.raises(Exception, match="PERMISSION_DENIED|403"):
        MlflowClient(tracking_uri=server.uri).get_run(run.info.run_id)
    server.grant(experiment_id, "visitor", "READ")  # the privacy officer's access: read, not write
    assert MlflowClient(tracking_uri=server.uri).get_run(run.info.run_id).info.status == "FINISHED"


def test_credentials_from_a_netrc_file(server: Server, pipeline: SimpleNamespace, tmp_path: Path) -> None:
    """No MLFLOW_TRACKING_* variables: the login comes from ~/.netrc, as requests reads it."""
    (tmp_path / ".netrc").write_text(f"machine 127.0.0.1 login {server.admin[0]} password {server.admin[1]}\n")
    (tmp_path / ".netrc").chmod(0o600)
    image, label = write_phantom(tmp_path / "raw")
    done = _medsynth("preprocess", *TINY, *phantom_overrides(image, label), f"paths.output={tmp_path / 'out'}",
                     f"mlflow.tracking_uri={server.uri}", "mlflow.experiment_name=netrc", cwd=tmp_path,
                     env={"HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert server.admin[1] not in done.stdout + done.stderr
