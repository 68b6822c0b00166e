"""Sharded preprocessing (``data.shard=K/N`` and the merge): N shards plus the merge write the manifest one
run writes; shards run at once on one output folder, two runs of one shard do not; bad values are one line."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medsynth import ConfigError, MedsynthError
from medsynth.config.settings import Shard, parse_shard
from medsynth.data.build import ShardResult, shard_folder
from medsynth.data.splits import shard_of
from tests.conftest import compose_config, run_stage
from tests.dicom_corpus import volume_to_series

PATIENTS = 7
TWO_SERIES = (1, 2)
"""Patients with two series (both must land in the same shard)."""


def _write_export(root: Path) -> Path:
    """A small PACS-like export: 7 patients (two with two series), a series whose pixels are blank, and a
    file that is not DICOM."""
    shape = (20, 20, 8)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    affine = np.diag([3.0, 3.0, 4.0, 1.0])
    rng = np.random.default_rng(0)
    for patient in range(1, PATIENTS + 1):
        for series in ("a", "b")[: 2 if patient in TWO_SERIES else 1]:
            r = np.sqrt((((grid.T - 0.05 * patient) / [0.8, 0.7, 0.9]).T ** 2).sum(0))
            volume = np.where(r < 1.0, 200 + 20 * patient + 10 * rng.standard_normal(shape), 0)
            volume_to_series(np.rint(volume), affine, root / f"P{patient}" / series, patient=patient, series=series,
                             names="index")
    volume_to_series(np.zeros(shape), affine, root / "P8" / "blank", patient=8, series="z", names="index")
    (root / "README.txt").write_text("exported by the PACS\n")
    return root


def _overrides(export: Path, out: Path, *more: str) -> list[str]:
    tmp = out.parent
    return ["data=dicom", "data.labels=body", f"paths.input={export}", f"paths.output={out}",
            f"data.deid.salt_file={tmp / 'salt'}", f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            "data.spacing=[3.0,3.0,4.0]", "data.size=[16,16]", "data.min_foreground=0.05", "progress=false", *more]


def _preprocess(export: Path, out: Path, *more: str) -> object:
    return run_stage("preprocess", compose_config(_overrides(export, out, *more)))


def _dataset(out: Path) -> dict[str, object]:
    """What must be the same after a single run and after shards plus merge: every record (with the sha256 of its
    file), the manifest's settings and counts, and the quarantine."""
    data = out / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    files = {r["id"]: hashlib.sha256((data / r["file"]).read_bytes()).hexdigest() for r in manifest["records"]}
    return {"records": manifest["records"], "files": files, "settings": manifest["settings"],
            "counts": manifest["counts"], "stored": sorted(p.name for p in (data / "records").iterdir()),
            "quarantine": json.loads((data / "quarantine.json").read_text())}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, object]]:
    """The export, the folder holding outputs (one salt, one MLflow store) and the dataset of one unsharded run."""
    tmp = tmp_path_factory.mktemp("shards")
    export = _write_export(tmp / "export")
    _preprocess(export, tmp / "single")
    return export, tmp, _dataset(tmp / "single")


def test_shard_of_is_stable_and_independent_of_order() -> None:
    patients = [f"p{i:03d}" for i in range(300)]
    first = {p: shard_of(p, 4) for p in patients}
    assert first == {p: shard_of(p, 4) for p in reversed(patients)}
    assert set(first.values()) == {1, 2, 3, 4}
    assert min(list(first.values()).count(k) for k in range(1, 5)) > 40  # spread, not all in one
    assert {shard_of(p, 1) for p in patients} == {1}


@pytest.mark.parametrize(("value", "shard"), [
    (None, None), ("1/3", Shard(1, 3)), ("3/3", Shard(3, 3)), (" 2 / 5 ", Shard(2, 5)), ("1/1", Shard(1, 1)),
    ("merge", Shard(None, None)), ("merge/4", Shard(None, 4)),
])
def test_parse_shard(value: str | None, shard: Shard | None) -> None:
    assert parse_shard(value) == shard


@pytest.mark.parametrize("value", ["0/3", "4/3", "abc", "3", "1/0", "-1/3", "merge/0", "1/3/5", ""])
def test_parse_shard_refuses_bad_values_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^data\.shard must be K/N with 1 <= K <= N .*got "):
        parse_shard(value)


@pytest.mark.parametrize("value", ["0/3", "4/3", "abc"])
def test_bad_shard_on_the_command_line_is_one_line_and_status_2(tmp_path: Path, value: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MEDSYNTH_DEBUG"}
    done = subprocess.run([sys.executable, "-m", "medsynth.cli", "preprocess", f"data.shard={value}",
                           f"paths.output={tmp_path / 'out'}"], check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [(
        f"medsynth preprocess: error: data.shard must be K/N with 1 <= K <= N (preprocess shard K of N), merge/N or "
        f"merge (write the manifest from the N shards' results), or null (the whole input), got '{value}'")]
    assert not (tmp_path / "out").exists()


def test_a_shard_cannot_start_a_pipeline(workspace) -> None:
    """`medsynth run data.shard=K/N` would train on no manifest: refused before any work."""
    import medsynth

    export, tmp, _ = workspace
    settings = compose_config(_overrides(export, tmp / "pipeline", "data.shard=1/3"))
    with pytest.raises(ConfigError, match=r"^data\.shard=1/3 preprocesses one shard and writes no manifest"):
        medsynth.preprocess(settings=settings.data, run=settings.run, parent_run_id="pipeline")
    assert not (tmp / "pipeline").exists()


def test_three_shards_and_the_merge_write_the_manifest_of_one_run(workspace) -> None:
    export, tmp, single = workspace
    out = tmp / "sequential"
    results = [_preprocess(export, out, f"data.shard={k}/3") for k in (1, 2, 3)]
    assert all(isinstance(r, ShardResult) for r in results)
    assert not (out / "data" / "manifest.json").exists(), "a shard wrote a manifest"
    assert sum(r.cases for r in results) == PATIENTS + 2 + 1  # every series, the blank one too
    assert sum(r.quarantined for r in results) == 1
    owners: dict[str, set[int]] = {}
    for k in (1, 2, 3):
        body = json.loads((shard_folder(out / "data", k, 3) / "result.json").read_text())
        for outcome in body["cases"].values():
            for record in outcome["records"]:
                owners.setdefault(record["case"], set()).add(k)
    assert len(owners) == PATIENTS and all(len(found) == 1 for found in owners.values())
    assert len({next(iter(found)) for found in owners.values()}) > 1, "all patients in one shard: nothing is tested"

    manifest = _preprocess(export, out, "data.shard=merge")
    assert _dataset(out) == single
    assert json.loads((out / "data" / "lineage.json").read_text())["data_manifest_sha256"]
    assert {r.split for r in manifest.records} == {"train", "validation", "holdout"}

    again = _preprocess(export, out, "data.shard=2/3")  # a shard run again reuses its cache
    assert (again.processed, again.reused) == (0, results[1].cases)
    assert _preprocess(export, out, "data.shard=merge/3").records == manifest.records


def test_the_merge_refuses_a_missing_or_stale_shard_in_one_line(workspace) -> None:
    export, tmp, _ = workspace
    out = tmp / "missing"
    _preprocess(export, out, "data.shard=1/3")
    _preprocess(export, out, "data.shard=3/3")
    env = {k: v for k, v in os.environ.items() if k != "MEDSYNTH_DEBUG"}
    done = subprocess.run([sys.executable, "-m", "medsynth.cli", "preprocess", *_overrides(export, out, "data.shard=merge")],
                          check=False, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"medsynth preprocess: error: cannot merge 3 shard(s) in {out / 'data'}: "
                                                   "shard 2/3: no result"), done.stderr
    assert not (out / "data" / "manifest.json").exists()

    _preprocess(export, out, "data.shard=2/3", "data.min_foreground=0.1")  # other settings than the merge's
    with pytest.raises(MedsynthError, match=r"shard 2/3: made with other data settings than the merge's; rerun") as err:
        _preprocess(export, out, "data.shard=merge/3")
    assert "\n" not in str(err.value)
    _preprocess(export, out, "data.shard=2/3")
    touched = export / "P3" / "a" / "IM0001"
    stat = touched.stat()
    try:
        os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the input changed since the shards ran
        with pytest.raises(MedsynthError, match=r"shard [123]/3: out of date: the input changed since it ran \(0 case\(s\) "
                                                r"added, 0 gone, 1 changed\)"):
            _preprocess(export, out, "data.shard=merge/3")
    finally:
        os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(MedsynthError, match=r"^data\.shard=merge: no shard results under .*: run `medsynth preprocess "
                                            r"data\.shard=K/N` for K = 1 to N first$"):
        _preprocess(export, tmp / "none", "data.shard=merge")
    _preprocess(export, out, "data.shard=1/2")
    with pytest.raises(MedsynthError, match=r"holds results of 2 and 3 shards: say which to merge with data.shard=merge/N"):
        _preprocess(export, out, "data.shard=merge")
    assert _preprocess(export, out, "data.shard=merge/3").records  # every shard of 3 is there and current again


HOLD = """
import sys, time
from medsynth.io.lock import output_lock
with output_lock(sys.argv[1], stage="preprocess data.shard=1/3", key="data.shard"):
    print("held", flush=True)
    time.sleep(120)
"""

SHARD = """
import sys, time
from pathlib import Path
import medsynth
from medsynth.config import compose
from medsynth.data import build

mine, every = Path(sys.argv[1]), [Path(p) for p in sys.argv[2].split(",")]
work = build.preprocess_cases

def together(*args, **kwargs):  # wait, holding this shard's lock and MLflow run, until every shard is here too
    mine.touch()
    deadline = time.monotonic() + 120
    while not all(p.exists() for p in every):
        if time.monotonic() > deadline:
            sys.exit("the other shards never got this far")
        time.sleep(0.01)
    return work(*args, **kwargs)

build.preprocess_cases = together
settings = compose(sys.argv[3:])
medsynth.preprocess(settings=settings.data, run=settings.run)
"""


def test_shards_run_at_once_but_one_shard_runs_once(workspace) -> None:
    """While shard 1/3 is running, shard 2/3 runs beside it, a second 1/3 and the merge are refused; then two shards
    in two processes at once (both inside their runs together), and the merge gives the dataset of one run."""
    export, tmp, single = workspace
    out = tmp / "concurrent"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(shard_folder(out / "data", 1, 3))], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(MedsynthError, match=rf"^data\.shard=1/3: shard 1 of 3 is being preprocessed by another run "
                                                rf"\(medsynth preprocess data\.shard=1/3, pid {holder.pid} on "):
            _preprocess(export, out, "data.shard=1/3")
        assert isinstance(_preprocess(export, out, "data.shard=2/3"), ShardResult)  # not held up by shard 1
        with pytest.raises(MedsynthError, match=r"shard 1/3 is still being preprocessed into .* wait for it to end before "
                                                r"a merge"):
            _preprocess(export, out, "data.shard=merge")
        with pytest.raises(MedsynthError, match=r"shard 1/3 is still being preprocessed .* before preprocessing the whole"):
            _preprocess(export, out)  # its cleanup would delete the running shard's records
    finally:
        holder.kill()
        holder.wait()

    ready = [tmp / f"ready-{k}" for k in (1, 3)]
    shards = [subprocess.Popen([sys.executable, "-c", SHARD, str(mine), ",".join(map(str, ready)),
                                *_overrides(export, out, f"data.shard={k}/3")],
                               cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for k, mine in zip((1, 3), ready)]
    for shard in shards:
        _, stderr = shard.communicate(timeout=300)
        assert shard.returncode == 0, stderr
    _preprocess(export, out, "data.shard=merge/3")
    assert _dataset(out) == single


def _cli_lets_shards_run_at_once() -> bool:
    """Whether ``medsynth preprocess data.shard=K/N`` leaves ``paths.output``'s lock to the stage (which takes the
    shard's own), so that the tasks of an array job run at once."""
    from medsynth import cli

    return "holds_output" in inspect.getsource(cli.claimed)


@pytest.mark.skipif(not _cli_lets_shards_run_at_once(),
                    reason="medsynth/cli.py still takes paths.output's lock for one shard (see holds_output)")
def test_shards_on_the_command_line_run_at_once(workspace) -> None:
    """Two `medsynth preprocess data.shard=K/3` commands started together on one output folder both succeed."""
    export, tmp, single = workspace
    out = tmp / "array"
    env = {k: v for k, v in os.environ.items() if k != "MEDSYNTH_DEBUG"}
    tasks = [subprocess.Popen([sys.executable, "-m", "medsynth.cli", "preprocess",
                               *_overrides(export, out, f"data.shard={k}/3", f"hydra.run.dir={out}/logs/task-{k}")],
                              cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in (1, 2)]
    for task in tasks:
        _, stderr = task.communicate(timeout=300)
        assert task.returncode == 0, stderr
    _preprocess(export, out, "data.shard=3/3")
    _preprocess(export, out, "data.shard=merge/3")
    assert _dataset(out) == single


def test_a_tracker_whose_experiment_appears_meanwhile_uses_it(tmp_path, monkeypatch) -> None:
    """Two array tasks open a store at once: both find no experiment, one creates it, and the other's create
    fails; that one then uses the experiment the first created."""
    from mlflow import MlflowClient

    from medsynth.tracking.tracker import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(uri, experiment="shared")
    real_lookup = MlflowClient.get_experiment_by_name
    calls = {"n": 0}

    def stale_first_lookup(self, name):  # the second task looked before the first task created it
        calls["n"] += 1
        return None if calls["n"] == 1 else real_lookup(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", stale_first_lookup)
    second = Tracker(uri, experiment="shared")
    assert second.experiment_id == first.experiment_id and calls["n"] == 2
