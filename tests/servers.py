"""Processes the tests start on loopback and always stop: `mlflow models serve` for now."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


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


def stop(process: subprocess.Popen, *, grace: float = 20.0) -> None:
    """Stop ``process`` and its process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
