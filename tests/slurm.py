"""A real one-node SLURM cluster for the tests: Debian's ``slurmctld`` and ``slurmd`` on loopback.

:func:`slurm_cluster` writes a ``slurm.conf`` into a folder of its own and starts, each in its own
process group with its log in that folder: a private ``munged`` (its own key and socket there; a
system MUNGE daemon, if any, is neither used nor touched), ``slurmctld -D`` and ``slurmd -D``. The
controller and the node listen on 127.0.0.1 on free ports; the node is this machine's short host
name with all its CPUs, so two one-CPU jobs, or one job of two one-CPU tasks, run at once. The
system's ``/etc/slurm`` is never read: the clients (``sbatch``, ``srun``, ``squeue``, ``scontrol``,
``scancel``) find the cluster through ``SLURM_CONF`` in :attr:`Cluster.env`. There is no accounting
database, so the real ``sacct`` does not work; :meth:`Cluster.job` reads ``scontrol show job``, and a
small ``sacct`` stand-in first on :attr:`Cluster.env`'s ``PATH`` gives submitit (Hydra's submitit
launcher) the job states it polls for (see :func:`write_sacct`).

Requeued jobs start again quickly: slurmctld holds a requeued batch job back (``Reason=BeginTime``)
for the job credential's lifetime plus a second (``AuthInfo=cred_expire``: 120 s by default, 5 here,
the least it takes; a smaller value is refused and 120 used), and the main scheduling loop looks at
pending jobs every second (``SchedulerParameters=sched_interval=1``) instead of every minute: the
job runs again about 6 s after ``scontrol requeue``. :meth:`Cluster.start_now` lifts the hold at once
(about 1 s).

The daemons run as the user who starts them, root or not (an unprivileged slurmd can start only its
own user's jobs, which is all the tests submit). :func:`slurm_unavailable_reason` says why the cluster
cannot run here (a missing binary or plugin), and tests skip with it.
On exit every job is cancelled and every process the cluster started, job steps included, is gone.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import processes_with_environment

APT_PACKAGES = "slurm-wlm munge"
"""What ``apt-get install --no-install-recommends`` needs for this module (Debian 12: SLURM 22.05)."""

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
_SBIN = "/usr/sbin:/usr/local/sbin"
_PLUGIN_DIRS = (Path("/usr/lib/x86_64-linux-gnu/slurm-wlm"), Path("/usr/lib/aarch64-linux-gnu/slurm-wlm"),
                Path("/usr/lib64/slurm"), Path("/usr/lib/slurm"), Path("/usr/local/lib/slurm"))
_PLUGINS = ("auth_munge.so", "select_cons_tres.so", "proctrack_linuxproc.so", "task_none.so")

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                          "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"})
"""Job states a job does not leave by itself (``REQUEUE_HOLD`` aside, which waits for a release)."""


class SlurmUnavailable(RuntimeError):
    """The cluster cannot run here, or did not come up; the message says why (and shows the logs)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=_SBIN)


def slurm_unavailable_reason() -> str | None:
    """Why a SLURM cluster cannot be started here, or None when it can (the binaries and plugins are there).

    Tests turn a reason into ``pytest.skip(reason)``; anything failing later is a real failure.
    """
    missing = [name for name in (*DAEMONS, *CLIENTS) if not _which(name)]
    if missing:
        return (f"SLURM/MUNGE is not installed ({', '.join(missing)} missing): "
                f"apt-get install -y --no-install-recommends {APT_PACKAGES}")
    plugin_dir = _plugin_dir()
    if plugin_dir is None:
        return f"the SLURM plugins ({', '.join(_PLUGINS)}) are not installed: apt-get install {APT_PACKAGES}"
    return None


def _plugin_dir() -> Path | None:
    for folder in _PLUGIN_DIRS:
        if all((folder / plugin).is_file() for plugin in _PLUGINS):
            return folder
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def short_hostname() -> str:
    """This machine's short host name (``hostname -s``): the node's name, as SLURM_NODELIST shows it."""
    return socket.gethostname().split(".")[0] or "localhost"


def client_env(conf: Path, bin_dir: Path | None = None) -> dict[str, str]:
    """``os.environ`` with ``SLURM_CONF=conf``, without the variables of any SLURM job it runs in.

    ``SLURM_*`` (the job this process may itself run in), ``SBATCH_*``, ``SRUN_*`` and ``SALLOC_*``
    (input variables that change what the clients submit) are left out. ``bin_dir`` (the ``sacct``
    stand-in of :func:`write_sacct`) comes first on ``PATH``, the system's sbin folders last.
    """
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_"))}
    env["SLURM_CONF"] = str(conf)
    path = f"{env.get('PATH', '/usr/bin:/bin')}{os.pathsep}{_SBIN}"
    env["PATH"] = f"{bin_dir}{os.pathsep}{path}" if bin_dir else path
    return env


_SACCT = '''#!{python}
"""sacct for a cluster without accounting storage, from `scontrol show job` (what slurmctld still holds).

Answers what submitit asks (`sacct -o JobID,State,NodeList --parsable2 -j ID ...`): a header and
one `|`-separated line per job or array task; jobs slurmctld has forgotten (MinJobAge) are left out.
Without it submitit cannot see a job end that wrote no result (cancelled, killed) and waits forever.
"""
import subprocess
import sys

args, fields, ids = sys.argv[1:], ["JobID", "JobName", "State"], []
for i, arg in enumerate(args):
    value = args[i + 1] if i + 1 < len(args) else ""
    if arg in ("-o", "--format"):
        fields = value.split(",")
    elif arg.startswith("--format="):
        fields = arg.split("=", 1)[1].split(",")
    elif arg in ("-j", "--jobs"):
        ids += value.split(",")
    elif arg.startswith("--jobs="):
        ids += arg.split("=", 1)[1].split(",")
print("|".join(fields))
for job in ids:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    for line in out.splitlines():
        rec = dict(word.split("=", 1) for word in line.split() if "=" in word)
        task = rec.get("ArrayTaskId")
        job_id = rec.get("JobId", job)
        if rec.get("ArrayJobId") and task:
            job_id = rec["ArrayJobId"] + "_" + (task if task.isdigit() else "[" + task + "]")
        rec.update(JobID=job_id, State=rec.get("JobState", ""), JobName=rec.get("JobName", ""),
                   NodeList="None assigned" if rec.get("NodeList", "(null)") == "(null)" else rec["NodeList"])
        print("|".join(rec.get(field, "") for field in fields))
'''


def write_sacct(bin_dir: Path) -> Path:
    """Write the ``sacct`` stand-in (this interpreter runs it) into ``bin_dir``; its path.

    With ``accounting_storage/none`` the real ``sacct`` only says that accounting is disabled;
    submitit's :class:`~submitit.slurm.slurm.SlurmJob` asks it for job states (``-o
    JobID,State,NodeList --parsable2 -j ID``), and without an answer waits forever for a job
    that ended without a result (cancelled, killed). The stand-in answers from ``scontrol show job``.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "sacct"
    path.write_text(_SACCT.replace("{python}", sys.executable))
    path.chmod(0o755)
    return path


def parse_scontrol(line: str) -> dict[str, str]:
    """``scontrol show -o`` output (``Key=Value`` words on one line) as a dict; values may hold ``=``."""
    record: dict[str, str] = {}
    for word in line.split():
        key, sep, value = word.partition("=")
        if sep:
            record[key] = value
    return record


@dataclass
class Cluster:
    """A running one-node cluster (see :func:`slurm_cluster`).

    Attributes:
        folder: Config, state, spool, MUNGE key and socket, and the daemons' logs.
        conf: The ``slurm.conf``.
        node: The node's name (this machine's short host name).
        partition: The one (default) partition.
        cpus: The node's CPUs.
        env: The environment for the clients and what they submit (``os.environ`` plus ``SLURM_CONF``).
        processes: The daemons by name (each the leader of its own process group).
    """

    folder: Path
    conf: Path
    node: str
    partition: str
    cpus: int
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *args: str, check: bool = True, timeout: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client (``sbatch``, ``scontrol``, ...) against this cluster; its output as text.

        Raises:
            subprocess.CalledProcessError: With ``check``, when it fails (its stderr holds the daemons' logs too).
        """
        result = subprocess.run(list(args), env=self.env, input=input, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, args, result.stdout,
                                                f"{result.stderr}\n{self.log_tail()}")
        return result

    def sbatch(self, script: str | Path, *options: str, cwd: Path | None = None) -> str:
        """Submit a batch job; its id.

        Args:
            script: The script's text (starting with ``#!``), or the path of a script file.
            options: ``sbatch`` options, e.g. ``"--ntasks=2"``, ``"--requeue"``, ``f"--output={path}"``.
            cwd: The job's working folder (``--chdir``); :attr:`folder` by default, so that
                ``slurm-%j.out`` files land there.
        """
        command = ["sbatch", "--parsable", f"--chdir={cwd or self.folder}", *options]
        if isinstance(script, Path):
            result = self.run(*command, str(script))
        else:
            result = self.run(*command, input=script)
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str] | None:
        """``scontrol show job`` of ``job_id`` as a dict (``JobState``, ``Reason``, ``Restarts``,
        ``ExitCode``, ``NodeList``, ``StartTime``, ...); None once slurmctld has forgotten the job
        (``MinJobAge``). For an array job, the record of its first task listed."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if result.returncode != 0 or not result.stdout.strip():
            if "Invalid job id" in result.stderr:
                return None
            raise RuntimeError(f"scontrol show job {job_id} failed: {result.stderr}")
        return parse_scontrol(result.stdout.splitlines()[0])

    def state(self, job_id: str) -> str | None:
        """The job's state (``PENDING``, ``RUNNING``, ``COMPLETED``, ...), None when slurmctld has forgotten it."""
        record = self.job(job_id)
        return record["JobState"] if record else None

    def wait_state(self, job_id: str, states: Sequence[str] | frozenset[str], *, timeout: float = 60.0,
                   poll: float = 0.1) -> str:
        """Wait until the job is in one of ``states``; that state.

        Raises:
            TimeoutError: With the job's record and the daemons' logs, when it is not within ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        record: dict[str, str] | None = None
        while time.monotonic() < deadline:
            record = self.job(job_id)
            if record is None:
                raise RuntimeError(f"job {job_id} is gone before reaching {sorted(states)}")
            if record["JobState"] in states:
                return record["JobState"]
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout} s: {record}\n{self.log_tail()}")

    def wait_job(self, job_id: str, timeout: float = 60.0) -> str:
        """Wait until the job has ended (:data:`FINAL_STATES`); its final state, e.g. ``COMPLETED``."""
        return self.wait_state(job_id, FINAL_STATES, timeout=timeout)

    def start_now(self, job_id: str) -> None:
        """Let a pending job start at the next scheduling pass (``scontrol update JobId=.. StartTime=now``).

        After ``scontrol requeue`` a job waits ``Reason=BeginTime``; this lifts that wait. The job must
        be pending already (a requeued job is ``COMPLETING`` until its processes are gone).
        """
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def jobs(self) -> list[str]:
        """The ids of the jobs slurmctld knows and that have not ended."""
        out = self.run("squeue", "-h", "-o", "%A").stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    def cancel_all(self, *, timeout: float = 30.0) -> None:
        """Cancel every job and wait until none is left pending, running or completing."""
        self.run("scancel", f"--partition={self.partition}", check=False)
        deadline = time.monotonic() + timeout
        while self.jobs() and time.monotonic() < deadline:
            time.sleep(0.1)

    def log_tail(self, n: int = 3000) -> str:
        """The end of each daemon's log, for error messages."""
        parts = []
        for name in DAEMONS:
            path = self.folder / f"{name}.log"
            if path.is_file():
                parts.append(f"--- {name}.log ---\n{path.read_text(errors='replace')[-n:]}")
        return "\n".join(parts)

    def stop(self, *, grace: float = 10.0) -> None:
        """Cancel the jobs, stop slurmd, slurmctld and munged, and kill any job step left (idempotent)."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self.cancel_all(timeout=grace)
        for name in ("slurmd", "slurmctld"):
            if name in self.processes:
                _stop_group(self.processes[name], grace=grace)
        daemons = {process.pid for process in self.processes.values()}
        for _ in range(5):  # slurmstepd and job tasks outlive slurmd by design; a task may still fork
            strays = set(stray_processes(self.conf)) - daemons
            if not strays:
                break
            for pid in strays:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        if "munged" in self.processes:
            _stop_group(self.processes["munged"], grace=grace)


def _stop_group(process: subprocess.Popen, *, grace: float) -> None:
    """SIGTERM to ``process``'s group, SIGKILL after ``grace`` seconds; reap the leader."""
    if process.poll() is not None:
        with contextlib.suppress(ProcessLookupError):  # a daemon's leftover children
            os.killpg(process.pid, signal.SIGKILL)
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def stray_processes(conf: Path) -> list[int]:
    """Processes whose environment points at this cluster's ``slurm.conf``.

    The daemons, ``slurmstepd`` and the jobs' processes (and any client run with :attr:`Cluster.env`);
    zombies, whose environment is gone, are not listed. Only processes this user may read are seen.
    """
    return processes_with_environment(f"SLURM_CONF={conf}")


def write_config(folder: Path, *, node: str, cpus: int, memory_mb: int, partition: str, min_job_age: int = 120) -> Path:
    """Write ``slurm.conf`` (and the folders it names) into ``folder``; its path.

    The daemons run as the user who starts them (``SlurmUser``, ``SlurmdUser``): root or not, the
    jobs run as that user.
    """
    user = pwd.getpwuid(os.geteuid()).pw_name
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    settings = {
        "ClusterName": "medsynth-test",
        "SlurmctldHost": f"{node}(127.0.0.1)",
        "SlurmctldPort": free_port(),
        "SlurmdPort": free_port(),
        "SlurmUser": user,
        "SlurmdUser": user,  # root is not needed: an unprivileged slurmd runs its own user's jobs
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        # the private munged; cred_expire (seconds, minimum 5) also sets how long a requeued job waits
        "AuthInfo": f"socket={folder / 'munge.socket'},cred_expire=5",
        "StateSaveLocation": folder / "state",
        "SlurmdSpoolDir": folder / "spool",
        "SlurmctldPidFile": folder / "slurmctld.pid",
        "SlurmdPidFile": folder / "slurmd.pid",
        "PlugStackConfig": folder / "plugstack.conf",
        "MailProg": "/bin/true",
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "JobCompType": "jobcomp/none",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core",
        "SchedulerType": "sched/builtin",
        "SchedulerParameters": "sched_interval=1",
        "MpiDefault": "none",
        "JobRequeue": 1,
        "MinJobAge": min_job_age,
        "KillWait": 2,
        "ReturnToService": 2,
        "MessageTimeout": 10,
        "SlurmdParameters": "config_overrides",
        "SlurmctldDebug": "info",
        "SlurmdDebug": "info",
    }
    lines = [f"{key}={value}" for key, value in settings.items()]
    lines.append(f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN")
    lines.append(f"PartitionName={partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP")
    (folder / "plugstack.conf").write_text("")
    conf = folder / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _start(name: str, command: list[str], folder: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(folder / f"{name}.log", "ab") as log:
        return subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _wait(cluster: Cluster, ready: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [name for name, process in cluster.processes.items() if process.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"not within {timeout} s"
            raise SlurmUnavailable(f"{what} ({why}):\n{cluster.log_tail()}")
        time.sleep(0.1)


def _node_idle(cluster: Cluster) -> bool:
    result = cluster.run("sinfo", "-h", "-N", "-n", cluster.node, "-o", "%T", check=False, timeout=10)
    return result.returncode == 0 and result.stdout.strip() == "idle"


@contextlib.contextmanager
def slurm_cluster(folder: Path, *, cpus: int | None = None, memory_mb: int = 4096, partition: str = "debug",
                  min_job_age: int = 120, timeout: float = 30.0) -> Iterator[Cluster]:
    """Start a one-node cluster in ``folder``; stop it, and everything it ran, on exit.

    Args:
        folder: Its own folder (created): ``slurm.conf``, state, spool, MUNGE key and socket, logs
            (``munged.log``, ``slurmctld.log``, ``slurmd.log``).
        cpus: The node's CPUs (this process's usable CPUs by default).
        memory_mb: The node's ``RealMemory`` (the most a job may ask for with ``--mem``; not enforced).
        partition: The default partition's name.
        min_job_age: Seconds slurmctld keeps an ended job (``MinJobAge``; 300 by default in SLURM):
            :meth:`Cluster.job` and the ``sacct`` stand-in see it that long. submitit polls job
            states ever less often (every half of the time since the last submission, at most
            every 10 minutes), so a job it should see end must stay that long.
        timeout: Seconds to wait for the node to be idle.

    Yields:
        The running cluster; submit with :meth:`Cluster.sbatch` or with the clients and :attr:`Cluster.env`.

    Raises:
        SlurmUnavailable: If :func:`slurm_unavailable_reason` gives a reason, or a daemon exits or the
            node is not idle within ``timeout`` (the message holds the daemons' logs).
    """
    reason = slurm_unavailable_reason()
    if reason:
        raise SlurmUnavailable(reason)
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)  # munged refuses a socket folder others can write to
    cpus = cpus or len(os.sched_getaffinity(0))
    node = short_hostname()
    conf = write_config(folder, node=node, cpus=cpus, memory_mb=memory_mb, partition=partition,
                        min_job_age=min_job_age)
    env = client_env(conf, write_sacct(folder / "bin").parent)
    cluster = Cluster(folder, conf, node, partition, cpus, env)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    try:
        cluster.processes["munged"] = _start("munged", [
            _which("munged") or "munged", "--foreground", "--force", f"--socket={folder / 'munge.socket'}",
            f"--key-file={key}", f"--pid-file={folder / 'munged.pid'}", f"--seed-file={folder / 'munged.seed'}",
            f"--log-file={folder / 'munged.file.log'}"], folder, env)  # in the foreground it logs to stderr
        _wait(cluster, (folder / "munge.socket").exists, "munged did not start", timeout)
        cluster.processes["slurmctld"] = _start("slurmctld", [_which("slurmctld") or "slurmctld", "-D", "-i"],
                                                folder, env)
        cluster.processes["slurmd"] = _start("slurmd", [_which("slurmd") or "slurmd", "-D", "-N", node],
                                             folder, env)
        _wait(cluster, lambda: _node_idle(cluster), f"node {node} did not become idle", timeout)
        yield cluster
    finally:
        cluster.stop()


def shell_quote(words: Sequence[str | Path]) -> str:
    """``words`` as one shell command line (for the scripts passed to :meth:`Cluster.sbatch`)."""
    return shlex.join(str(word) for word in words)
