"""A shared MLflow tracking server as a hospital deploys one, started by the tests on loopback.

:func:`shared_tracking_server` starts two real processes and always stops both:

* **PostgreSQL** (Debian's ``postgresql``; its binaries under ``/usr/lib/postgresql/<version>/bin``),
  never the system service: ``initdb`` makes a fresh cluster in a temporary folder of its own, and
  ``postgres`` serves it on 127.0.0.1 and a free port, its unix socket in that folder (not
  ``/var/run/postgresql``), password (SCRAM) authentication for every connection. PostgreSQL refuses
  to run as root, so as root both run as the ``postgres`` system user; the folder is then owned by
  that user and lies outside pytest's ``tmp_path`` (which root's 0700 folders close to it). One
  login role (random password) owns two databases: ``mlflow`` (the backend store) and
  ``mlflow_auth`` (the users and permissions of the basic-auth app). Durability is traded for speed as
  befits a throwaway cluster (``initdb --no-sync``, ``fsync``, ``synchronous_commit`` and
  ``full_page_writes`` off); nothing else differs from a production server.
* **``mlflow server``** over that database with the artifact proxy (``--serve-artifacts``, artifacts
  in a local folder, clients upload and download through the server, ``mlflow-artifacts:/``) and
  MLflow's basic-auth app (``--app-name basic-auth``): HTTP basic authentication on every route
  but ``/health`` and the static files, an admin with a random password, and
  ``default_permission = NO_PERMISSIONS``, so another user sees only what they are granted (the
  creator of an experiment or registered model gets MANAGE on it). One worker, telemetry off and
  no job queue, as :func:`tests.servers.serve_tracking`.

The server can be stopped and started again (:meth:`Server.stop`, :meth:`Server.start`) on the
same port over the same database and artifact folder, to test an outage mid-run; PostgreSQL
stays up meanwhile. :func:`postgres_unavailable_reason` says why this cannot run here (tests
skip only then); a server that is there but does not come up is an error with its log's end.

Clients authenticate with ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``
(:meth:`Server.client_env`).
"""

from __future__ import annotations

import configparser
import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.servers import free_port, stop, wait_for, wait_group_gone

PG_ROOT = Path("/usr/lib/postgresql")
"""Where Debian installs each PostgreSQL version's server binaries (``<version>/bin``)."""
PG_SYSTEM_USER = "postgres"
"""The system user PostgreSQL runs as when the tests run as root (the package creates it)."""
DB_USER = "mlflow"
"""The login role that owns the MLflow databases."""
DATABASE = "mlflow"
"""The backend store's database."""
AUTH_DATABASE = "mlflow_auth"
"""The basic-auth app's database (users, roles, permissions)."""
ADMIN_USER = "admin"
"""The basic-auth app's admin, created on the first start."""
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS", "DENY")
"""What :meth:`Server.grant` grants (MLflow's permission names)."""


def postgres_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's binary folder holding ``initdb`` and ``postgres``, if any."""
    found = []
    for candidate in PG_ROOT.glob("*/bin"):
        if (candidate / "initdb").is_file() and (candidate / "postgres").is_file():
            with contextlib.suppress(ValueError):
                found.append((float(candidate.parent.name), candidate))
    return max(found)[1] if found else None


def postgres_unavailable_reason() -> str | None:
    """Why :func:`shared_tracking_server` cannot start here (a sentence that says how to fix it), or None."""
    if not sys.platform.startswith("linux"):
        return f"the shared tracking server fixture runs Debian's PostgreSQL, on Linux only (not {sys.platform})"
    if postgres_bin_dir() is None:
        return (f"PostgreSQL's server binaries are not installed (no {PG_ROOT}/<version>/bin/initdb; "
                "apt-get install --no-install-recommends postgresql)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            return (f"running as root, but there is no {PG_SYSTEM_USER!r} system user to run PostgreSQL as "
                    "(PostgreSQL refuses root; the postgresql package creates the user)")
    if importlib.util.find_spec("psycopg2") is None:
        return "psycopg2 is not installed (pip install psycopg2-binary): MLflow's PostgreSQL store needs it"
    if importlib.util.find_spec("flask_wtf") is None:
        return "Flask-WTF is not installed (pip install 'mlflow[auth]'): MLflow's basic-auth app needs it"
    return None


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else ""


@dataclass
class Postgres:
    """A running PostgreSQL cluster of its own (see the module's docstring).

    Attributes:
        folder: Its temporary folder (data directory ``data/``, unix socket, log), removed on stop.
        port: Its TCP port on 127.0.0.1.
        superuser: The bootstrap superuser's name and password.
        user: The login role that owns :data:`DATABASE` and :data:`AUTH_DATABASE`.
        password: Its password.
        process: The ``postgres`` server (its own process group).
    """

    folder: Path
    port: int
    superuser: tuple[str, str]
    user: str
    password: str
    process: subprocess.Popen

    @property
    def log_path(self) -> Path:
        return self.folder / "postgres.log"

    def uri(self, database: str = DATABASE) -> str:
        """A SQLAlchemy URI (``postgresql+psycopg2://user:password@127.0.0.1:PORT/database``), what MLflow takes.

        The driver is explicit: SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3 (``psycopg``), not psycopg2.
        """
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str = DATABASE) -> str:
        """A libpq connection string for ``psycopg2.connect`` as :attr:`user`, over TCP."""
        return f"host=127.0.0.1 port={self.port} dbname={database} user={self.user} password={self.password}"

    def connect(self, database: str = DATABASE, **kwargs: Any) -> Any:
        """A ``psycopg2`` connection to ``database`` as :attr:`user` (close it, or use it in ``with contextlib.closing``)."""
        import psycopg2

        return psycopg2.connect(self.dsn(database), connect_timeout=5, **kwargs)

    def stop(self, *, grace: float = 20.0) -> None:
        """Fast shutdown (SIGINT: open sessions are ended), SIGQUIT then SIGKILL to the group if it lingers."""
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
            self.process.poll()
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            if wait_group_gone(self.process, timeout=grace):
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace)


def _as_postgres_user() -> dict[str, Any]:
    """``subprocess`` arguments that run a command as :data:`PG_SYSTEM_USER` when we are root (else as us)."""
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(PG_SYSTEM_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def start_postgres(*, timeout: float = 60.0) -> Postgres:
    """Make and start a fresh PostgreSQL cluster on 127.0.0.1 with :data:`DB_USER` owning both MLflow databases.

    Raises:
        RuntimeError: With the log's end, when ``initdb`` fails or the server does not accept connections in time.
    """
    import psycopg2
    from psycopg2 import sql

    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise RuntimeError(postgres_unavailable_reason() or "PostgreSQL is not installed")
    as_postgres = _as_postgres_user()
    folder = Path(tempfile.mkdtemp(prefix="medsynth-pg-"))  # 0700; outside tmp_path, see the module docstring
    process = None
    try:
        if as_postgres:
            os.chown(folder, as_postgres["user"], as_postgres["group"])
        superuser = ("medsynth_pg_admin", secrets.token_urlsafe(24))
        password_file = folder / "superuser-password"
        password_file.write_text(superuser[1] + "\n")
        password_file.chmod(0o600)
        if as_postgres:
            os.chown(password_file, as_postgres["user"], as_postgres["group"])
        env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "LC_ALL": "C", "HOME": str(folder)}
        log_path = folder / "postgres.log"
        init = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", superuser[0], f"--pwfile={password_file}",
             "--auth=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions"],
            cwd=folder, env=env, capture_output=True, text=True, timeout=120, **as_postgres)
        password_file.unlink()
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed (exit status {init.returncode}):\n{(init.stdout + init.stderr)[-4000:]}")
        port = free_port()
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [str(bin_dir / "postgres"), "-D", str(folder / "data"), "-p", str(port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={folder}",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **as_postgres)
        password = secrets.token_urlsafe(24)
        server = Postgres(folder, port, superuser, DB_USER, password, process)
        deadline = time.monotonic() + timeout
        while True:
            try:
                admin = psycopg2.connect(host="127.0.0.1", port=port, dbname="postgres", user=superuser[0],
                                         password=superuser[1], connect_timeout=2)
                break
            except psycopg2.OperationalError as err:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not come up (exit status {process.poll()}): {err}\n"
                                       f"{_tail(log_path)}") from err
                time.sleep(0.1)
        try:
            admin.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with admin.cursor() as cursor:
                cursor.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(DB_USER),
                                                                                  sql.Literal(password)))
                for database in (DATABASE, AUTH_DATABASE):
                    cursor.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database),
                                                                                sql.Identifier(DB_USER)))
        finally:
            admin.close()
        return server
    except BaseException:
        if process is not None:
            Postgres(folder, 0, ("", ""), "", "", process).stop()
        shutil.rmtree(folder, ignore_errors=True)
        raise


@dataclass
class Server:
    """A running shared MLflow tracking server (from :func:`shared_tracking_server`).

    Attributes:
        uri: Its address, ``http://127.0.0.1:PORT`` (the same across :meth:`stop` / :meth:`start`).
        admin: The basic-auth admin's username and password.
        folder: Its folder: the auth config, the artifact store (``artifacts/``) and the log (``mlflow-server.log``).
        postgres: The database server (up until the context manager exits).
        port: Its port.
        process: The ``mlflow server`` process (its own process group), None while stopped.
        start_seconds: How long each :meth:`start` took until ``/health`` answered, in order.
        auth_cache_seconds: The basic-auth app's ``auth_cache_ttl_seconds`` (0, MLflow's default: every
            request checks the password hash, about 0.3 s of server time on two cores).
    """

    uri: str
    admin: tuple[str, str]
    folder: Path
    postgres: Postgres
    port: int
    secret_key: str = field(repr=False, default_factory=lambda: secrets.token_hex(32))
    process: subprocess.Popen | None = None
    start_seconds: list[float] = field(default_factory=list)
    auth_cache_seconds: int = 0

    @property
    def artifacts(self) -> Path:
        """The artifact proxy's destination: what clients upload through the server lands here."""
        return self.folder / "artifacts"

    @property
    def log_path(self) -> Path:
        return self.folder / "mlflow-server.log"

    @property
    def auth_config(self) -> Path:
        """The basic-auth app's config (``MLFLOW_AUTH_CONFIG_PATH``)."""
        return self.folder / "basic_auth.ini"

    @property
    def backend_store_uri(self) -> str:
        return self.postgres.uri(DATABASE)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        """The end of the server's log (all its starts, appended)."""
        return _tail(self.log_path, n)

    def write_auth_config(self) -> None:
        """Write :attr:`auth_config` (the admin's password is only used to create the admin on the first start)."""
        config = configparser.ConfigParser()
        config["mlflow"] = {
            "default_permission": "NO_PERMISSIONS",
            "database_uri": self.postgres.uri(AUTH_DATABASE),
            "admin_username": self.admin[0],
            "admin_password": self.admin[1],
            "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
            "auth_cache_ttl_seconds": str(self.auth_cache_seconds),
        }
        with open(self.auth_config, "w") as handle:
            config.write(handle)
        self.auth_config.chmod(0o600)

    def start(self, *, timeout: float = 180.0) -> float:
        """Start ``mlflow server`` on :attr:`port` and wait until ``/health`` answers 200; the seconds that took.

        Raises:
            RuntimeError: With the end of its log, when it exits or does not answer within ``timeout``.
        """
        if self.running:
            raise RuntimeError("the MLflow server is already running")
        bin_dir = Path(sys.executable).parent
        # The server takes its settings from its command line and auth config alone: no client settings, no
        # MLFLOW_AUTH_ADMIN_* (which would override the config file's admin), no inherited store URIs.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_", "MLFLOW_REGISTRY_", "_MLFLOW_"))}
        env.update({
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "MLFLOW_AUTH_CONFIG_PATH": str(self.auth_config),
            # Basic-auth refuses to start without it (CSRF for the sign-up form); the same across restarts.
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret_key,
            "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        })
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(bin_dir / "mlflow"), "server", "--backend-store-uri", self.backend_store_uri,
                 "--serve-artifacts", "--artifacts-destination", str(self.artifacts), "--app-name", "basic-auth",
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(f"{self.uri}/health", self.process, self.log_path, what="the shared MLflow server", timeout=timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds.append(time.monotonic() - began)
        return self.start_seconds[-1]

    def stop(self) -> None:
        """Stop ``mlflow server`` and its workers (PostgreSQL stays up); nothing if it is not running."""
        if self.process is not None:
            stop(self.process)
            self.process = None

    def restart(self, *, timeout: float = 180.0) -> float:
        """:meth:`stop` then :meth:`start` on the same port; the seconds from stopping until healthy again."""
        began = time.monotonic()
        self.stop()
        self.start(timeout=timeout)
        return time.monotonic() - began

    def client_env(self, user: tuple[str, str] | None = None) -> dict[str, str]:
        """``MLFLOW_TRACKING_URI``, ``_USERNAME`` and ``_PASSWORD`` for ``user`` (default: the admin)."""
        name, password = user or self.admin
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_TRACKING_USERNAME": name, "MLFLOW_TRACKING_PASSWORD": password}

    def _admin_request(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = requests.request(method, f"{self.uri}{path}", json=body, auth=self.admin, timeout=30)
        if response.status_code != 200:
            raise RuntimeError(f"{method} {path} failed with {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else {}

    def create_user(self, name: str, password: str) -> dict[str, Any]:
        """Create a (non-admin) user through the auth REST API as the admin; the user as the server returns it."""
        return self._admin_request("POST", "/api/2.0/mlflow/users/create", {"username": name, "password": password})["user"]

    def grant(self, experiment_id: str, user: str, permission: str = "READ") -> None:
        """Grant ``user`` ``permission`` (one of :data:`PERMISSIONS`) on an experiment, as the admin.

        MLflow 3's unified grant API (``POST /api/3.0/mlflow/users/permissions/grant``); an existing grant is replaced.
        """
        if permission not in PERMISSIONS:
            raise ValueError(f"unknown permission {permission!r}; one of {PERMISSIONS}")
        self._admin_request("POST", "/api/3.0/mlflow/users/permissions/grant",
                            {"username": user, "resource_type": "experiment", "resource_id": str(experiment_id),
                             "permission": permission})


@contextlib.contextmanager
def shared_tracking_server(tmp_path: Path, *, timeout: float = 180.0, auth_cache_seconds: int = 0) -> Iterator[Server]:
    """Start PostgreSQL and ``mlflow server`` (artifact proxy, basic auth) on loopback; stop both on exit.

    Args:
        tmp_path: A folder for the server's files (created): auth config, artifacts, log. PostgreSQL's
            cluster lives in a temporary folder of its own, removed on exit.
        timeout: Seconds to wait for the server's first start (it creates MLflow's tables then).
        auth_cache_seconds: How long the server caches a successful password check (``auth_cache_ttl_seconds``).
            0 (MLflow's default) hashes the password on every request, about 0.3 s each on two cores; e.g. 60
            brings an authenticated request to about 20 ms (a wrong password is never cached).

    Yields:
        The running :class:`Server`; its :attr:`Server.start_seconds` holds how long the first start took.

    Raises:
        RuntimeError: With the end of a log, when PostgreSQL or the server does not come up. Check
            :func:`postgres_unavailable_reason` first to skip where it cannot run.
    """
    reason = postgres_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    folder = Path(tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    postgres = start_postgres()
    try:
        port = free_port()
        server = Server(f"http://127.0.0.1:{port}", (ADMIN_USER, secrets.token_urlsafe(18)), folder, postgres, port,
                        auth_cache_seconds=auth_cache_seconds)
        server.artifacts.mkdir(exist_ok=True)
        server.write_auth_config()
        try:
            server.start(timeout=timeout)
            yield server
        finally:
            server.stop()
    finally:
        postgres.stop()
        shutil.rmtree(postgres.folder, ignore_errors=True)
