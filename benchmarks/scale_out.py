"""Scale-out figures on this machine: data-parallel efficiency, the SLURM sweep launcher's overhead, and
how fast a tracking outage's spool is replayed.

Usage:
    python benchmarks/scale_out.py ddp|sweep|spool|all [--repeats 2] [--steps 60] [--points 10000]
        [--workdir DIR] [--keep]

``ddp``: the demo dataset is preprocessed once (``medsynth preprocess experiment=demo``, a temporary
SQLite MLflow store), then ``medsynth train experiment=demo ... trainer.max_steps=STEPS device=cpu``
runs as one process with ``OMP_NUM_THREADS=2`` and as two gloo processes under
``python -m torch.distributed.run --standalone --nproc_per_node=2`` with ``OMP_NUM_THREADS=1`` each
(``GLOO_SOCKET_IFNAME=lo``). Checkpoints (and with them the validation and the sample grid) come at the
last step only (``trainer.checkpoint_every=STEPS``, ``trainer.grid.num=0``), and the last step's
validation reads one record (``trainer.validation.max_records=1``). The throughput is the train stage's
last log line (``train: N steps in X s (Y images/s)``), which counts rank 0's own batches: under DDP
each rank draws ``trainer.batch_size`` records a step, so the global rate is world size times rank 0's.
A steady-state rate is also read from the per-step ``loss`` timestamps in MLflow (end of step 1 to end
of the last step: no first-step set-up, no final validation and checkpoint). Runs alternate
(1, 2, 2, 1, ...); medians are reported with [min-max].

``sweep``: the wall time of ``medsynth train -m <tests.conftest.TINY on the phantom>
trainer.max_steps=2,3`` with Hydra's basic launcher (the two jobs one after the other, in-process)
against ``hydra/launcher=slurm`` (submitit: one SLURM array job of two one-CPU tasks) on the one-node
cluster of ``tests.slurm.slurm_cluster``; both track to one ``mlflow server`` on loopback
(``tests.servers.TrackingServer``), as in ``tests/test_slurm.py``. The phantom is preprocessed once;
every sweep writes to a fresh ``paths.output``. Runs alternate (basic, slurm, slurm, basic, ...).

``spool``: a :class:`medsynth.tracking.Tracker` with a spool folder, against a ``TrackingServer``.
Outage: a run is started, the server stopped, ``--points`` buffered ``loss`` points are logged and
flushed every 100 (as training flushes at checkpoints): they go to the journal; the server is
started again, and from the moment it answers ``/health`` :meth:`Tracker.end_run` sends the journal.
Baseline: the same points logged the same way to the live server (another run, no outage). Each run's
``loss`` history is checked with ``MlflowClient``: exactly ``--points`` points, steps 0..N-1 in order.
Runs alternate (live, outage, outage, live, ...).

Prints one markdown table (figure, baseline, measured, ratio, command). Every process the script
starts (servers, the SLURM daemons and jobs, torchrun and its ranks) is stopped at the end; the last
line says whether any is left. Exits 1 if a check failed or a process is left.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import TINY, phantom_overrides, write_phantom  # noqa: E402
from tests.servers import TrackingServer, processes_with_environment  # noqa: E402
from tests.slurm import slurm_cluster, slurm_unavailable_reason  # noqa: E402

if TYPE_CHECKING:
    from medsynth.tracking import Tracker

FIGURES = ("ddp", "sweep", "spool")
MARKER = "MEDSYNTH_SCALE_OUT_BENCH"
"""Set in this process's environment (its pid): every process it starts inherits it, so leftovers can be found."""

TRAIN_LINE = re.compile(r"train: (\d+) steps in (\S+) s \(([\d.]+) images/s\)")
RUN_LINE = re.compile(r"train: MLflow run ([0-9a-f]{32})")


@dataclasses.dataclass
class Row:
    figure: str
    baseline: str
    measured: str
    ratio: str
    command: str


class BenchError(RuntimeError):
    """A run failed or a check did not hold."""


def spread(values: Sequence[float], digits: int = 1) -> str:
    """``median [min-max]`` of ``values``."""
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def alternating(repeats: int, first: str, second: str) -> Iterator[str]:
    """first, second, second, first, ... (each ``repeats`` times)."""
    for repeat in range(repeats):
        yield from ((first, second) if repeat % 2 == 0 else (second, first))


def run_logged(command: Sequence[str], *, env: dict[str, str], cwd: Path, log: Path, timeout: float) -> tuple[float, str]:
    """Run ``command`` in its own process group, stdout and stderr to ``log``; ``(wall seconds, output)``.

    The whole group is killed if it fails to end within ``timeout`` or this process is interrupted.

    Raises:
        BenchError: On a non-zero exit status (with the end of its output).
    """
    with open(log, "wb") as out:
        start = time.perf_counter()
        process = subprocess.Popen(list(command), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        seconds = time.perf_counter() - start
    with contextlib.suppress(ProcessLookupError):  # anything of the group still running (nothing, normally)
        os.killpg(process.pid, signal.SIGKILL)
    output = log.read_text(errors="replace")
    if code != 0:
        raise BenchError(f"exit status {code}: {shlex.join(command)}\n{output[-4000:]}")
    return seconds, output


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "medsynth.cli", *args]


def shown(command: Sequence[str], work: Path) -> str:
    """A command for the table: the interpreter as ``python``, the work folder as ``$W``."""
    words = ["python" if word == sys.executable else word.replace(str(work), "$W") for word in command]
    return shlex.join(words).replace("'", "")


# ---------------------------------------------------------------------------------------------- ddp


@dataclasses.dataclass
class TrainRun:
    world: int
    rank_rate: float  # images/s of rank 0's batches, as the train stage logs it
    steady_rate: float  # global images/s between the end of step 1 and the end of the last step


def ddp(work: Path, *, repeats: int, steps: int, one_thread: bool) -> list[Row]:
    from mlflow.tracking import MlflowClient

    from medsynth.config import compose

    store = f"sqlite:///{work / 'm.db'}"
    base = work / "base"
    env = {k: v for k, v in os.environ.items() if k != "MEDSYNTH_DEBUG"}
    seconds, _ = run_logged(cli("preprocess", "experiment=demo", f"paths.output={base}", f"mlflow.tracking_uri={store}",
                                "progress=false"), env=env, cwd=work, log=work / "preprocess.log", timeout=1800)
    print(f"ddp: demo dataset preprocessed in {seconds:.0f} s", flush=True)
    overrides = [f"paths.data={base / 'data'}", f"trainer.max_steps={steps}", "device=cpu", "progress=false",
                 "trainer.grid.num=0", f"trainer.checkpoint_every={steps}", "trainer.validation.max_records=1",
                 f"mlflow.tracking_uri={store}"]
    batch = compose(["experiment=demo", *overrides[1:-1]]).trainer.batch_size
    client = MlflowClient(tracking_uri=store)

    def command(world: int, out: Path) -> list[str]:
        launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m",
                   "medsynth.cli"] if world > 1 else cli())
        return [*launch, "train", "experiment=demo", f"paths.output={out}", *overrides]

    # name: (processes, OMP threads each)
    configs = {"1x2": (1, 2), "2x1": (2, 1), **({"1x1": (1, 1)} if one_thread else {})}
    envs = {name: {**env, "OMP_NUM_THREADS": str(threads), **({"GLOO_SOCKET_IFNAME": "lo"} if world > 1 else {})}
            for name, (world, threads) in configs.items()}
    runs: dict[str, list[TrainRun]] = {name: [] for name in configs}
    order = [name for repeat in range(repeats) for name in (list(configs) if repeat % 2 == 0 else list(configs)[::-1])]
    for i, name in enumerate(order):
        world, threads = configs[name]
        out, log = work / f"run{i}", work / f"train{i}.log"
        load = os.getloadavg()[0]
        wall, output = run_logged(command(world, out), env=envs[name], cwd=work, log=log, timeout=1800)
        found, run_id = TRAIN_LINE.findall(output), RUN_LINE.findall(output)
        if not found or not run_id:
            raise BenchError(f"no 'train: N steps in X s (Y images/s)' line or MLflow run in {log}")
        n, _, rate = found[-1]
        if int(n) != steps:
            raise BenchError(f"trained {n} steps, not {steps}: {log}")
        last = saved_step(out / "checkpoints" / "last.pt")
        if last != steps:
            raise BenchError(f"last.pt of {out} holds step {last}, not {steps}")
        history = sorted(client.get_metric_history(run_id[-1], "loss"), key=lambda m: m.step)
        if [m.step for m in history] != list(range(1, steps + 1)):
            raise BenchError(f"run {run_id[-1]} logged loss at steps {[m.step for m in history][:10]}..., not 1..{steps}")
        span = (history[-1].timestamp - history[0].timestamp) / 1000
        steady = (steps - 1) * batch * world / max(span, 1e-9)
        runs[name].append(TrainRun(world, float(rate), steady))
        print(f"ddp run {i + 1}: {world} process(es) x {threads} thread(s): rank 0 logged {float(rate):.1f} images/s -> "
              f"global {float(rate) * world:.1f}; steady state {steady:.1f} images/s global; wall {wall:.0f} s; "
              f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after", flush=True)

    def rates(name: str, steady: bool = False) -> list[float]:
        return [r.steady_rate if steady else r.rank_rate * r.world for r in runs[name]]

    single, double = rates("1x2"), rates("2x1")
    speedup = statistics.median(double) / statistics.median(single)
    steady_speedup = statistics.median(rates("2x1", True)) / statistics.median(rates("1x2", True))
    command_text = (f"OMP_NUM_THREADS=2 {shown(command(1, work / 'runN'), work)}  vs  OMP_NUM_THREADS=1 "
                    f"GLOO_SOCKET_IFNAME=lo {shown(command(2, work / 'runN'), work)}")
    rows = [
        Row(f"ddp: images/s, 1 process (2 threads) -> 2 gloo processes (1 thread each; global = 2 x rank 0's logged "
            f"rate), {steps} steps of {batch} images/rank, from the train log line; ratio = speedup",
            spread(single), spread(double), f"{speedup:.2f}x", command_text),
        Row("ddp: efficiency = speedup / 2 (baseline: 2 x the 1-process median)",
            f"{2 * statistics.median(single):.1f}", f"{statistics.median(double):.1f}", f"{speedup / 2:.0%}", "(same runs)"),
        Row("ddp: steady-state global images/s from MLflow loss timestamps (end of step 1 to end of the last: no "
            "set-up, validation or checkpoint); ratio = speedup",
            spread(rates("1x2", True)), spread(rates("2x1", True)),
            f"{steady_speedup:.2f}x (efficiency {steady_speedup / 2:.0%})", "(same runs)"),
        Row("ddp: images/s of rank 0 as logged (per rank, not global), 1 process -> 2 processes",
            spread([r.rank_rate for r in runs["1x2"]]), spread([r.rank_rate for r in runs["2x1"]]),
            f"{statistics.median([r.rank_rate for r in runs['2x1']]) / statistics.median(single):.2f}x", "(same runs)"),
    ]
    if one_thread:
        alone = rates("1x1")
        rows.append(Row("ddp: images/s, 1 process with 1 thread -> 2 gloo processes; ratio = speedup (efficiency)",
                        spread(alone), spread(double),
                        f"{statistics.median(double) / statistics.median(alone):.2f}x "
                        f"({statistics.median(double) / statistics.median(alone) / 2:.0%})",
                        "OMP_NUM_THREADS=1 for the 1-process run"))
    return rows


# -------------------------------------------------------------------------------------------- sweep


def sweep(work: Path, *, repeats: int) -> list[Row]:

    reason = slurm_unavailable_reason()
    if reason:
        return [Row("sweep: SLURM launcher vs basic launcher", "-", "-", "skipped", reason)]
    (work / "server").mkdir()
    server = TrackingServer(work / "server")
    with slurm_cluster(work / "slurm") as cluster:
        server.start()
        try:
            image, label = write_phantom(work / "raw")
            common = [*TINY, *phantom_overrides(image, label), f"mlflow.tracking_uri={server.uri}", "device=cpu",
                      f"paths.data={work / 'base' / 'data'}"]
            env = {**cluster.env, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
            env.pop("MEDSYNTH_DEBUG", None)
            seconds, _ = run_logged(cli("preprocess", *common, f"paths.output={work / 'base'}"), env=env, cwd=work,
                                    log=work / "preprocess.log", timeout=600)
            print(f"sweep: phantom preprocessed in {seconds:.0f} s; SLURM node {cluster.node}, {cluster.cpus} CPUs, "
                  f"partition {cluster.partition}", flush=True)
            launchers = {
                "basic": [],
                "slurm": ["hydra/launcher=slurm", f"hydra.launcher.partition={cluster.partition}",
                          "hydra.launcher.timeout_min=5", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"],
            }

            def command(launcher: str, out: Path) -> list[str]:
                return cli("train", "-m", *common, f"paths.output={out}", *launchers[launcher], "trainer.max_steps=2,3")

            walls: dict[str, list[float]] = {"basic": [], "slurm": []}
            for i, launcher in enumerate(alternating(repeats, "basic", "slurm")):
                out = work / f"sweep{i}-{launcher}"
                wall, _ = run_logged(command(launcher, out), env=env, cwd=work, log=work / f"sweep{i}.log", timeout=900)
                (stamp,) = (out / "sweeps").iterdir()
                jobs = sorted((p for p in stamp.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
                got = [saved_step(p / "checkpoints" / "last.pt") for p in jobs]
                if got != [2, 3]:
                    raise BenchError(f"the {launcher} sweep in {out} left checkpoints at steps {got}, not [2, 3]")
                walls[launcher].append(wall)
                print(f"sweep run {i + 1}: {launcher} launcher, 2 jobs in {wall:.1f} s", flush=True)
        finally:
            server.stop()
    basic, slurm = statistics.median(walls["basic"]), statistics.median(walls["slurm"])
    text = shown(command("slurm", work / "sweepN"), work).replace(" ".join(common).replace(str(work), "$W"), "<TINY on the phantom>")
    return [Row("sweep: wall s of a 2-job sweep (trainer.max_steps=2,3), basic launcher -> SLURM (submitit) on a "
                "1-node cluster; ratio (difference)",
                spread(walls["basic"]), spread(walls["slurm"]), f"{slurm / basic:.2f}x ({slurm - basic:+.1f} s)",
                f"{text}  vs  the same without the hydra/launcher* overrides")]


# -------------------------------------------------------------------------------------------- spool


def _log_points(tracker: Tracker, run_id: str, points: int) -> None:
    """``points`` buffered ``loss`` points at steps 0..points-1, flushed every 100 (as training flushes at checkpoints)."""
    for i in range(points):
        tracker.log_metrics(run_id, {"loss": 1.0 / (1 + i)}, step=i, buffered=True)
        if (i + 1) % 100 == 0:
            tracker.flush(run_id)


def _check_history(uri: str, run_id: str, points: int) -> None:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "loss")
    steps = [m.step for m in history]
    if steps != list(range(points)):
        raise BenchError(f"run {run_id} has {len(steps)} loss points; steps in order 0..{points - 1}: "
                         f"{steps == list(range(points))}, as a set: {sorted(steps) == list(range(points))}")


def spool(work: Path, *, repeats: int, points: int) -> list[Row]:
    from medsynth.tracking import Tracker

    (work / "server").mkdir()
    server = TrackingServer(work / "server")
    live: list[float] = []
    journaled: list[float] = []
    replayed: list[float] = []
    restarts: list[float] = []
    server.start()
    try:
        for i, kind in enumerate(alternating(repeats, "live", "outage")):
            folder = work / f"out{i}" / "mlflow-spool"
            # retries only when end_run asks: the figure is the replay, not a retry timer
            tracker = Tracker(server.uri, "bench", spool=folder, retry_seconds=3600)
            journal = tracker.spool  # the journal of this process (a folder of its own under the spool folder)
            assert journal is not None
            run_id = tracker.start_run(f"{kind}{i}")
            if kind == "live":
                start = time.perf_counter()
                _log_points(tracker, run_id, points)
                tracker.end_run(run_id)
                live.append(time.perf_counter() - start)
                print(f"spool run {i + 1}: {points} points to the live server in {live[-1]:.1f} s", flush=True)
            else:
                server.stop()
                start = time.perf_counter()
                _log_points(tracker, run_id, points)
                journaled.append(time.perf_counter() - start)
                pending = journal.pending()
                start = time.perf_counter()
                server.start()  # returns once /health answers
                restarts.append(time.perf_counter() - start)
                start = time.perf_counter()
                tracker.end_run(run_id)
                replayed.append(time.perf_counter() - start)
                if journal.journal.is_file():
                    raise BenchError(f"the journal {journal.journal} is still there after end_run")
                print(f"spool run {i + 1}: {points} points journaled in {journaled[-1]:.1f} s ({pending} writes); server "
                      f"healthy {restarts[-1]:.1f} s after its start; journal sent {replayed[-1]:.2f} s after that",
                      flush=True)
            _check_history(server.uri, run_id, points)
    finally:
        server.stop()
    base = statistics.median(live)
    how = (f"Tracker(uri, spool=...).log_metrics(run, {{loss: v}}, step=i, buffered=True) x {points}, flush every 100; "
           f"outage: TrackingServer.stop() before, .start() then end_run(run) after")
    return [
        Row(f"spool: s from the restarted server answering /health to {points} journaled points sent "
            f"(end_run), vs the same points sent live",
            spread(live, 2), spread(replayed, 2), f"{statistics.median(replayed) / base:.2f}x", how),
        Row(f"spool: s to journal {points} points while the server is down (the first failing write waits for "
            "MLflow's retries), vs sending them live",
            spread(live, 2), spread(journaled, 2), f"{statistics.median(journaled) / base:.2f}x", "(same runs)"),
        Row("spool: s from `mlflow server` start to /health answering (for scale)", "-", spread(restarts, 1), "-",
            "tests.servers.TrackingServer.start()"),
    ]


# ------------------------------------------------------------------------------------------- common


def saved_step(checkpoint: Path) -> int:
    """The step a checkpoint was saved at, read as data (``weights_only=True``: nothing in it runs)."""
    import torch  # imported here, as the other torch users of this script do: the spool figure needs none

    return int(torch.load(checkpoint, weights_only=True, map_location="cpu")["step"])


def leftovers(marker: str) -> list[str]:
    """Processes other than this one whose environment holds ``MARKER=marker``: what this script started."""
    found = []
    for pid in processes_with_environment(f"{MARKER}={marker}"):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if cmdline:
                found.append(f"{pid} {cmdline[:160]}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", choices=[*FIGURES, "all"])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side (alternating)")
    parser.add_argument("--steps", type=int, default=60, help="ddp: training steps a run")
    parser.add_argument("--one-thread", action="store_true",
                        help="ddp: also a 1-process run with OMP_NUM_THREADS=1 (1x2, 2x1, 1x1, then reversed)")
    parser.add_argument("--points", type=int, default=10_000, help="spool: metric points")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed at the end")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    os.environ[MARKER] = str(os.getpid())
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="medsynth-scale-out-"))).absolute()
    work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Callable[[Path], list[Row]]] = {
        "ddp": lambda w: ddp(w, repeats=args.repeats, steps=args.steps, one_thread=args.one_thread),
        "sweep": lambda w: sweep(w, repeats=args.repeats),
        "spool": lambda w: spool(w, repeats=args.repeats, points=args.points),
    }
    rows: list[Row] = []
    failures: list[str] = []
    for name in FIGURES if args.figure == "all" else (args.figure,):
        (work / name).mkdir(exist_ok=True)
        start = time.perf_counter()
        try:
            rows += figures[name](work / name)
        except Exception as err:  # a failed figure is reported, the others still run
            failures.append(f"{name}: {err}")
            rows.append(Row(f"{name}: FAILED", "-", "-", "-", str(err).splitlines()[0][:200]))
        print(f"{name}: done in {time.perf_counter() - start:.0f} s", flush=True)
    time.sleep(1)
    left = leftovers(os.environ[MARKER])
    print("\n| figure | baseline | measured | ratio | command |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.figure} | {row.baseline} | {row.measured} | {row.ratio} | `{row.command}` |")
    print(f"\nmedian [min-max] of {args.repeats} run(s) a side, alternating; work folder {work}"
          f"{' (kept)' if args.keep or failures else ' (removed)'}")
    for failure in failures:
        print(f"FAILED: {failure}")
    print(f"processes left by this script: {'; '.join(left) if left else 'none'}")
    if not (args.keep or failures):
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures or left else 0


if __name__ == "__main__":
    raise SystemExit(main())
