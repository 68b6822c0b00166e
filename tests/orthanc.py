"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin, started as a plain process on loopback.

Each server gets its own folder with a JSON config, its storage and its log: HTTP on 127.0.0.1 and
a free port, the DICOM (DIMSE) server off, remote access off, authentication on with one registered
user, and the DICOMweb plugin serving QIDO-RS, WADO-RS and STOW-RS under ``/dicom-web``. The
system service the package installs is never touched. :func:`start_orthanc` raises
:class:`OrthancUnavailable` with the reason when the binary or the plugin is missing or the server
does not come up; the fixtures turn that into a skip that says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import requests

PLUGIN_PACKAGE = "orthanc-dicomweb"
PLUGIN_NAME = "libOrthancDicomWeb.so"
_PLUGIN_FOLDERS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))


class OrthancUnavailable(RuntimeError):
    """Orthanc cannot run here; the message says why (and how CI installs it)."""


@dataclass
class Orthanc:
    """A running Orthanc.

    Attributes:
        url: Its REST API, ``http://127.0.0.1:PORT``.
        user: The registered user.
        password: Its password.
        folder: Config, storage and log.
        process: The server process (its own process group).
    """

    url: str
    user: str
    password: str
    folder: Path
    process: subprocess.Popen

    @property
    def dicomweb(self) -> str:
        """The DICOMweb base URL (what ``data.dicomweb.url`` / ``generate.dicomweb.url`` take)."""
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return self.user, self.password

    def upload(self, files: Iterable[Path]) -> list[Path]:
        """Store files through Orthanc's REST API (``POST /instances``); returns those it accepted."""
        accepted = []
        with requests.Session() as session:
            session.auth = self.auth
            for path in files:
                response = session.post(f"{self.url}/instances", data=path.read_bytes(), timeout=30)
                if response.status_code == 200:
                    accepted.append(path)
        return accepted

    def count_instances(self) -> int:
        """How many instances the server stores (``GET /statistics``)."""
        response = requests.get(f"{self.url}/statistics", auth=self.auth, timeout=10)
        response.raise_for_status()
        return int(response.json()["CountInstances"])

    def log_tail(self, n: int = 4000) -> str:
        path = self.folder / "orthanc.log"
        return path.read_text(errors="replace")[-n:] if path.is_file() else ""

    def stop(self) -> None:
        """Stop the server: SIGTERM to its process group, SIGKILL if it has not ended within 10 s."""
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def orthanc_binary() -> str:
    """The Orthanc executable (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise OrthancUnavailable("the Orthanc binary is not installed (apt-get install orthanc orthanc-dicomweb; "
                                 "`make tools` does it)")
    return found


def dicomweb_plugin() -> Path:
    """The DICOMweb plugin's shared library, from the package's file list or the usual folders."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        listed = subprocess.run(["dpkg", "-L", PLUGIN_PACKAGE], capture_output=True, text=True, timeout=30).stdout
        for line in listed.splitlines():
            if Path(line).name == PLUGIN_NAME and Path(line).is_file():
                return Path(line)
    for folder in _PLUGIN_FOLDERS:
        if (folder / PLUGIN_NAME).is_file():
            return folder / PLUGIN_NAME
    raise OrthancUnavailable(f"the Orthanc DICOMweb plugin ({PLUGIN_NAME}) is not installed "
                             f"(apt-get install {PLUGIN_PACKAGE})")


def start_orthanc(folder: Path, *, user: str = "medsynth-test", password: str = "pacs-Secret-7391",
                  timeout: float = 30.0) -> Orthanc:
    """Start an Orthanc with the DICOMweb plugin in ``folder`` and wait until it answers.

    Args:
        folder: Its own folder (created): config, storage, log.
        user: The one registered user.
        password: Their password.
        timeout: Seconds to wait for it to answer.

    Returns:
        The running server (stop it with :meth:`Orthanc.stop`).

    Raises:
        OrthancUnavailable: If the binary or plugin is missing, or it exits or does not answer in time.
    """
    binary, plugin = orthanc_binary(), dicomweb_plugin()
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": f"medsynth-test-{port}",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": port,
        "HttpServerEnabled": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "DicomServerEnabled": False,
        "DicomPort": free_port(),  # unused while the DICOM server is off; never the shared default 4242
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False},
        "HttpDescribeErrors": False,
        "ConcurrentJobs": 1,
    }
    (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
    with open(folder / "orthanc.log", "wb") as log:
        process = subprocess.Popen([binary, str(folder / "orthanc.json")], cwd=folder, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    server = Orthanc(f"http://127.0.0.1:{port}", user, password, folder, process)
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = requests.get(f"{server.dicomweb}/studies", auth=server.auth, timeout=2)
            if response.status_code == 200:
                return server
        except requests.RequestException:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise OrthancUnavailable(f"Orthanc did not start (exit status {process.poll()}): {server.log_tail(1500)}")
        time.sleep(0.1)
