"""Processes the tests start on loopback and always stop: `mlflow models serve` and `mlflow server` (its UI)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_model(model: str, *, port: int, log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``mlflow models serve -m MODEL`` on 127.0.0.1:PORT with this interpreter's environment.

    The server runs in its own process group (see :func:`stop`); its output goes to ``log_path``.
    """
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, **(env or {}), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [str(bin_dir / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_up(base: str, process: subprocess.Popen, log_path: Path, *, timeout: float = 120.0) -> None:
    """Wait until the model server answers ``GET base/ping`` with 200 (see :func:`wait_for`)."""
    wait_for(f"{base}/ping", process, log_path, what="the model server", timeout=timeout)


def wait_for(url: str, process: subprocess.Popen, log_path: Path, *, what: str, timeout: float = 120.0) -> None:
    """Wait until ``GET url`` answers 200.

    Raises:
        RuntimeError: With the end of the server's log, when it exits or does not answer in ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up (exit status {process.poll()}):\n"
                               f"{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.25)


def serve_tracking(store_uri: str, *, port: int, log_path: Path, cwd: Path) -> subprocess.Popen:
    """Start ``mlflow server`` (the tracking API and the web UI) over ``store_uri`` on 127.0.0.1:PORT.

    One worker; telemetry off (the UI reports usage to its server, which would pass it on); no job
    queue (its seven worker processes slow the start threefold on two cores, and reading runs needs
    none). The server runs in its own process group (see :func:`stop`) in ``cwd``, where it may
    leave files; its output goes to ``log_path``. Wait for it with :func:`wait_until_healthy`.
    """
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [str(bin_dir / "mlflow"), "server", "--backend-store-uri", store_uri, "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_healthy(base: str, process: subprocess.Popen, log_path: Path, *, timeout: float = 120.0) -> None:
    """Wait until an MLflow tracking server answers ``GET base/health`` with 200 (see :func:`wait_for`)."""
    wait_for(f"{base}/health", process, log_path, what="the MLflow server", timeout=timeout)


def post(url: str, body: bytes | dict[str, Any], *, content_type: str = "application/json",
         timeout: float = 60.0) -> tuple[int, bytes]:
    """POST ``body`` (bytes, or a JSON value) to ``url``; the status and raw body, whatever the status."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def group_alive(process: subprocess.Popen) -> bool:
    """Whether any process of ``process``'s group (the server and what it started) still runs."""
    process.poll()  # reap the group leader if it has exited
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_group_gone(process: subprocess.Popen, *, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for every process of ``process``'s group to end; whether they did."""
    deadline = time.monotonic() + timeout
    while group_alive(process):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def dump_server_stacks(process: subprocess.Popen, log_path: Path, *, wait: float = 1.0) -> str:
    """Ask the server's ``uvicorn`` processes for their thread stacks (SIGUSR1); the log's end after ``wait`` s.

    medsynth's serving hooks register a :mod:`faulthandler` dump on SIGUSR1; the group's leader
    (the ``mlflow`` command, which would die of the signal) is left out.
    """
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == process.pid:
            continue
        try:
            if os.getpgid(int(entry.name)) == process.pid:
                os.kill(int(entry.name), signal.SIGUSR1)
        except (ProcessLookupError, PermissionError):
            continue
    time.sleep(wait)
    return log_path.read_text(errors="replace")[-6000:]


def stop(process: subprocess.Popen, *, grace: float = 20.0) -> None:
    """Stop ``process`` and its process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if not group_alive(process):
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_group_gone(process, timeout=grace):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_group_gone(process, timeout=grace)
    process.wait()


def processes_with_environment(entry: str) -> list[int]:
    """The processes other than this one whose environment holds ``entry`` (``NAME=VALUE``) exactly:
    what a test or benchmark started with a marker in the environment. Zombies (no environment left)
    and processes this user may not read are not listed."""
    needle = entry.encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


class TrackingServer:
    """`mlflow server` over one SQLite store on a fixed loopback port, stopped and started at will."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.root / f"server-{self.starts}.log"
        self.process = serve_tracking(f"sqlite:///{self.root / 'store.db'}", port=self.port, log_path=log, cwd=self.root)
        wait_until_healthy(self.uri, self.process, log)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None
