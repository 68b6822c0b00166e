"""Kill anywhere, rerun, same result: every stage SIGKILLed at points of its own progress, then rerun
with the same command, completes with the outputs of an uninterrupted run and never leaves a
half-written file that looks whole.

Each stage runs as its own process, ``medsynth <stage> ...`` exactly as the command line runs it,
forked from a server that imported medsynth, torch and MLflow once (``multiprocessing``'s
forkserver), so a kill-and-rerun costs the stage's work and not the interpreter's start-up. A kill
is a SIGKILL of the stage's whole process group, at the moment a progress line or an output file
shows the point was reached. The uninterrupted reference of each stage is computed once per
module; every trial starts from a copy of the folder the reference stage started from.
``benchmarks/kill_rerun.py`` runs many more points with the same machinery.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medsynth.io.atomic import is_temporary
from tests.conftest import TINY, phantom_overrides, write_phantom

STAGES = ("preprocess", "train", "generate", "evaluate")
OWN_FOLDER = {"preprocess": "data", "train": "checkpoints", "generate": "synthetic", "evaluate": "evaluation"}
PRELOAD = ["medsynth.cli", "medsynth.stages", "medsynth.evaluation.audit", "tests.test_kill_rerun"]

# Long enough that every stage has several points to die at, short enough for a CPU test.
SETTINGS = [
    *TINY,
    "progress=true",  # not a terminal: whole progress lines on stderr, what the kill points watch
    "trainer.max_steps=12", "trainer.checkpoint_every=2", "trainer.keep_last=3", "trainer.resume=auto",
    "generate.num_samples=8", "generate.batch_size=2",
]
RUN_TIMEOUT = 300.0


# ------------------------------------------------------------------------------ one stage process


def _stage_process(argv: Sequence[str], cwd: str, log: str) -> None:
    """The body of a stage process: ``medsynth <argv>`` in ``cwd``, output appended to ``log``."""
    os.setsid()  # its own process group: a kill takes any worker it started too
    os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.pop("MEDSYNTH_DEBUG", None)
    torch.set_num_threads(1)
    from medsynth.cli import main

    try:
        code = main(list(argv))
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # a traceback is a failure the trial reports
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _context() -> Any:
    """The forkserver that stage processes are forked from (medsynth and its libraries imported once)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


@dataclasses.dataclass
class Point:
    """Where to kill: after ``count`` progress lines matching ``line``, or ``count`` files matching ``files``
    (a glob under the output folder), or ``seconds`` after the start."""

    name: str
    line: str | None = None
    files: str | None = None
    count: int = 1
    seconds: float | None = None

    def reached(self, out: Path, log: Path, started: float) -> bool:
        if self.seconds is not None:
            return time.monotonic() - started >= self.seconds
        if self.files is not None:
            return sum(1 for p in out.glob(self.files) if not is_temporary(p)) >= self.count
        assert self.line is not None
        try:
            text = log.read_text(errors="replace")
        except FileNotFoundError:
            return False
        return len(re.findall(self.line, text, flags=re.MULTILINE)) >= self.count


@dataclasses.dataclass
class Outcome:
    """A stage process's end: its exit code (negative: the signal that ended it) and its output."""

    code: int
    log: str
    seconds: float


class Lab:
    """Stage processes in folders under ``root``, all tracking to one MLflow store, and the references."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ctx = _context()
        self.raw = write_phantom(root / "raw")
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self._references: dict[str, Path] = {}
        self._starts: dict[str, Path] = {}
        self.durations: dict[str, float] = {}

    def argv(self, stage: str) -> list[str]:
        return [stage, *SETTINGS, *phantom_overrides(*self.raw), "paths.output=out", f"mlflow.tracking_uri={self.uri}"]

    def run(self, stage: str, cwd: Path, *, kill_at: Point | None = None, tag: str = "run") -> Outcome:
        """Run ``stage`` in ``cwd`` (``paths.output=out``); SIGKILL it when ``kill_at`` is reached."""
        log = cwd / f"{stage}-{tag}.log"
        process = self.ctx.Process(target=_stage_process, args=(self.argv(stage), str(cwd), str(log)))
        started = time.monotonic()
        process.start()
        out = cwd / "out"
        while process.is_alive() and time.monotonic() - started < RUN_TIMEOUT:
            if kill_at is not None and kill_at.reached(out, log, started):
                _kill(process.pid)
                break
            time.sleep(0.002)
        else:
            if process.is_alive():
                _kill(process.pid)
        process.join(60)
        text = log.read_text(errors="replace") if log.exists() else ""
        return Outcome(process.exitcode if process.exitcode is not None else -999, text, time.monotonic() - started)

    def start_folder(self, stage: str) -> Path:
        """The folder ``stage``'s reference started from (the earlier stages' outputs)."""
        self.reference(stage)
        return self._starts[stage]

    def reference(self, stage: str) -> Path:
        """The folder of ``stage`` run uninterrupted (after the earlier stages' references)."""
        if stage not in self._references:
            index = STAGES.index(stage)
            before = self.reference(STAGES[index - 1]) if index else None
            start = self.root / f"start-{stage}"
            start.mkdir()
            if before is not None:
                copy_outputs(before / "out", start / "out")
            folder = self.root / f"reference-{stage}"
            shutil.copytree(start, folder)
            done = self.run(stage, folder, tag="reference")
            assert done.code == 0, f"reference {stage} failed:\n{done.log[-3000:]}"
            self._starts[stage], self._references[stage] = start, folder
            self.durations[stage] = done.seconds
        return self._references[stage]

    def trial(self, stage: str, point: Point, *, name: str) -> Trial:
        """Kill ``stage`` at ``point``, check what it left, rerun it and compare with the reference."""
        reference = self.reference(stage)
        folder = self.root / f"trial-{stage}-{name}"
        shutil.copytree(self.start_folder(stage), folder)
        killed = self.run(stage, folder, kill_at=point, tag="killed")
        left = looks_whole_but_is_not(folder / "out")
        rerun = self.run(stage, folder, tag="rerun")
        return Trial(stage, name, killed, left, rerun, folder, reference)


@dataclasses.dataclass
class Trial:
    """One kill and rerun: what the kill left behind and how the rerun ended."""

    stage: str
    name: str
    killed: Outcome
    half_written: list[str]
    rerun: Outcome
    folder: Path
    reference: Path

    def differences(self) -> list[str]:
        """What differs from the reference after the rerun (empty: the same result)."""
        if self.rerun.code != 0:
            return [f"rerun exited {self.rerun.code}: {self.rerun.log[-1500:]}"]
        out, ref = self.folder / "out", self.reference / "out"
        found = COMPARE[self.stage](out, ref)
        found += [f"temporary file left: {p}" for p in temporaries(out)]
        if (out / ".medsynth.lock").exists():
            found.append("the rerun left its lock file")
        return found


def _kill(pid: int | None) -> None:
    """SIGKILL the stage process and its process group."""
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, signal.SIGKILL)


def copy_outputs(source: Path, target: Path) -> None:
    """Copy a run's outputs, without its logs and lock (what a rerun finds on disk)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("logs", ".medsynth.lock"))


def temporaries(folder: Path) -> list[Path]:
    """Temporary files of interrupted writes under ``folder``."""
    return [p for p in folder.rglob("*") if p.is_file() and is_temporary(p)]


# -------------------------------------------------------------- files that look whole and are not


def _readable(path: Path) -> None:
    """Read ``path`` as its kind of file; raises if it is not whole."""
    name = path.name
    if name.endswith(".json"):
        json.loads(path.read_text())
    elif name.endswith(".csv"):
        with path.open(newline="") as fh:
            rows = list(csv.reader(fh))
        assert rows and all(len(r) == len(rows[0]) for r in rows), "ragged rows"
    elif name.endswith(".npz"):
        with np.load(path) as npz:
            for key in npz.files:
                npz[key].sum()
    elif name.endswith(".pt"):
        from medsynth.training import load_checkpoint

        load_checkpoint(path)
    elif name.endswith((".nii.gz", ".nii")):
        from medsynth.io import load_nifti

        load_nifti(path)
    elif name.endswith(".png"):
        from PIL import Image

        with Image.open(path) as image:
            image.load()
    elif name.endswith(".html"):
        assert path.read_text().rstrip().endswith("</html>"), "no closing </html>"
    elif name.endswith(".yaml"):
        import yaml

        yaml.safe_load(path.read_text())


def _listed_missing(out: Path) -> list[str]:
    """Files a written manifest lists that are not on disk (a manifest that promises too much)."""
    missing = []
    data = out / "data" / "manifest.json"
    if data.is_file():
        missing += [f"data/{r['file']}" for r in json.loads(data.read_text())["records"] if not (out / "data" / r["file"]).is_file()]
    synthetic = out / "synthetic" / "manifest.csv"
    if synthetic.is_file():
        with synthetic.open(newline="") as fh:
            for row in csv.DictReader(fh):
                missing += [f"synthetic/{row[k]}" for k in ("image", "label", "preview") if row.get(k)
                            and not (out / "synthetic" / row[k]).exists()]
    return missing


def looks_whole_but_is_not(out: Path) -> list[str]:
    """Files under ``out`` with final names that do not read back whole, and manifest entries with no file."""
    bad = []
    for path in sorted(out.rglob("*")) if out.is_dir() else []:
        if not path.is_file() or is_temporary(path) or path.suffix == ".log" or path.name == ".medsynth.lock":
            continue
        try:
            _readable(path)
        except Exception as err:  # any failure to read it back is the finding
            bad.append(f"{path.relative_to(out)}: {type(err).__name__}: {str(err)[:200]}")
    return bad + [f"listed but missing: {m}" for m in _listed_missing(out)]


# ------------------------------------------------------------------------- same as the reference


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


def _same_files(out: Path, ref: Path, folder: str) -> list[str]:
    mine, theirs = _files(out / folder), _files(ref / folder)
    if mine == theirs:
        return []
    return [f"{folder}: files differ: only after the rerun {sorted(mine - theirs)}, only in the reference {sorted(theirs - mine)}"]


def _same_bytes(out: Path, ref: Path, names: Sequence[str]) -> list[str]:
    return [f"{n} differs from the reference" for n in names if (out / n).read_bytes() != (ref / n).read_bytes()]


def compare_preprocess(out: Path, ref: Path) -> list[str]:
    """Manifest, quarantine and per-case records byte for byte; every cached record's arrays exactly."""
    found = _same_files(out, ref, "data")
    if found:
        return found
    names = sorted(_files(ref / "data"))
    found += _same_bytes(out, ref, [f"data/{n}" for n in names if n.endswith(".json") and n != "lineage.json"])
    for n in (n for n in names if n.endswith(".npz")):
        with np.load(out / "data" / n) as a, np.load(ref / "data" / n) as b:
            if a.files != b.files or any(a[k].tobytes() != b[k].tobytes() or a[k].dtype != b[k].dtype for k in a.files):
                found.append(f"data/{n}: arrays differ from the reference")
    lineage = [json.loads((f / "data" / "lineage.json").read_text()).get("data_manifest_sha256") for f in (out, ref)]
    if lineage[0] != lineage[1]:
        found.append(f"data/lineage.json names manifest {lineage[0]}, the reference {lineage[1]}")
    return found


def _checkpoint_differences(a: dict[str, Any], b: dict[str, Any], name: str) -> list[str]:
    found = [f"{name}: {key} {a.get(key)} != {b.get(key)}" for key in ("step", "best_val_loss", "val_loss") if a.get(key) != b.get(key)]
    for part, tensors in (("model", a["model"]), ("ema", a["ema"]["shadow"])):
        other = b["model"] if part == "model" else b["ema"]["shadow"]
        for key, value in tensors.items():
            if not torch.allclose(value, other[key], rtol=1e-5, atol=1e-6):
                found.append(f"{name}: {part}[{key}] differs from the reference")
                break
    return found


def compare_train(out: Path, ref: Path) -> list[str]:
    """The same checkpoint files, each with the reference's step, losses and weights; the same sample grids."""
    found = _same_files(out, ref, "checkpoints")
    if found:
        return found
    for name in sorted(_files(ref / "checkpoints")):
        a, b = out / "checkpoints" / name, ref / "checkpoints" / name
        if name.endswith(".pt"):
            found += _checkpoint_differences(torch.load(a, weights_only=True), torch.load(b, weights_only=True), name)
        elif name.endswith(".png"):
            found += _image_differences(a, b, name)
    return found


def _image_differences(a: Path, b: Path, name: str) -> list[str]:
    from PIL import Image

    with Image.open(a) as x, Image.open(b) as y:
        x_, y_ = np.asarray(x, dtype=np.int16), np.asarray(y, dtype=np.int16)
    if x_.shape != y_.shape or np.abs(x_ - y_).max() > 1:
        return [f"{name}: picture differs from the reference"]
    return []


def compare_generate(out: Path, ref: Path) -> list[str]:
    """The manifest and dataset.json byte for byte; images to float tolerance, labels exactly."""
    from medsynth.io import load_nifti

    found = _same_files(out, ref, "synthetic")
    if found:
        return found
    found += _same_bytes(out, ref, ["synthetic/manifest.csv", "synthetic/dataset.json"])
    prints = [json.loads((f / "synthetic" / "generate.json").read_text())["fingerprint"] for f in (out, ref)]
    if prints[0] != prints[1]:
        found.append("synthetic/generate.json: another settings fingerprint")
    for name in sorted(_files(ref / "synthetic")):
        a, b = out / "synthetic" / name, ref / "synthetic" / name
        if name.endswith(".nii.gz"):
            (x, _), (y, _) = load_nifti(a), load_nifti(b)
            exact = name.startswith("labelsTr")
            if x.shape != y.shape or not (np.array_equal(x, y) if exact else np.allclose(x, y, rtol=1e-5, atol=1e-6)):
                found.append(f"synthetic/{name}: differs from the reference")
        elif name.endswith(".png"):
            found += _image_differences(a, b, f"synthetic/{name}")
    return found


def compare_evaluate(out: Path, ref: Path) -> list[str]:
    """Every figure of metrics.json, the verdict and the counts; the same report and pictures."""
    found = _same_files(out, ref, "evaluation")
    if found:
        return found
    a, b = (json.loads((f / "evaluation" / "metrics.json").read_text()) for f in (out, ref))
    for key in ("num_synthetic", "num_train", "num_holdout", "verdict", "privacy_rules"):
        if a.get(key) != b.get(key):
            found.append(f"metrics.json: {key} differs from the reference")
    if set(a["metrics"]) != set(b["metrics"]):
        found.append("metrics.json: another set of figures")
    for name, figure in b["metrics"].items():
        x, y = a["metrics"].get(name, {}).get("value"), figure["value"]
        if (x is None) != (y is None) or (y is not None and not np.isclose(x, y, rtol=1e-6, atol=1e-9, equal_nan=True)):
            found.append(f"metrics.json: {name} = {x}, the reference {y}")
    return found


COMPARE: dict[str, Callable[[Path, Path], list[str]]] = {
    "preprocess": compare_preprocess, "train": compare_train, "generate": compare_generate, "evaluate": compare_evaluate,
}


# ------------------------------------------------------------------------------------ kill points

# Each stage's points, from its own progress: its log lines and the files it writes, in the order it reaches them.
POINTS: dict[str, list[Point]] = {
    "preprocess": [
        Point("mlflow-run", line=r"preprocess: MLflow run"),
        Point("first-record", files="data/records/*.npz"),
        Point("half-the-records", files="data/records/*.npz", count=14),
        Point("case-done", files="data/cases/*.json"),
        Point("quarantine-written", files="data/quarantine.json"),
        Point("manifest-written", files="data/manifest.json"),
    ],
    "train": [
        Point("mlflow-run", line=r"train: MLflow run"),
        Point("first-checkpoint", files="checkpoints/step_*.pt"),
        Point("first-grid", files="checkpoints/samples_step*.png"),
        Point("third-checkpoint", files="checkpoints/step_*.pt", count=3),
        Point("half-way-line", line=r"^train: 6/12 steps"),
        Point("last-checkpoint", files="checkpoints/step_0000012.pt"),
    ],
    "generate": [
        Point("mlflow-run", line=r"generate: MLflow run"),
        Point("encoder-training", line=r"^encoder: 1/"),
        Point("encoder-cached", files="data/encoder.pt"),
        Point("first-sample", files="synthetic/imagesTr/*.nii.gz"),
        Point("manifest-of-one-batch", files="synthetic/manifest.csv"),
        Point("five-samples", files="synthetic/imagesTr/*.nii.gz", count=5),
        Point("all-samples", files="synthetic/previews/*.png", count=8),
    ],
    "evaluate": [
        Point("mlflow-run", line=r"evaluate: MLflow run"),
        Point("first-segmenter", line=r"^segmenter \(real\): 1/"),
        Point("second-segmenter", line=r"^segmenter \(synthetic\): 1/"),
        Point("membership", line=r"evaluate: running the membership"),
        Point("metrics-written", files="evaluation/metrics.json"),
        Point("report-written", files="evaluation/report.html"),
    ],
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    """The stage processes' server, the phantom input and the MLflow store of this module's trials."""
    return Lab(tmp_path_factory.mktemp("kill-rerun"))


CASES = [pytest.param(stage, point, id=f"{stage}-{point.name}") for stage in STAGES for point in POINTS[stage]]


@pytest.mark.parametrize(("stage", "point"), CASES)
def test_killed_stage_reruns_to_the_uninterrupted_result(lab: Lab, stage: str, point: Point) -> None:
    """SIGKILL at ``point``; nothing half-written looks whole; the rerun ends with the reference's outputs."""
    trial = lab.trial(stage, point, name=point.name)
    assert trial.killed.code == -signal.SIGKILL, (
        f"{stage} was not killed at {point.name} (exit {trial.killed.code}):\n{trial.killed.log[-2000:]}")
    assert trial.half_written == [], trial.half_written
    assert trial.differences() == []
