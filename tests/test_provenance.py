"""Chain of custody: generate hashes every file, evaluate refuses a set that is not exactly what generate
wrote (or a generator or dataset that changed), and `medsynth verify` re-checks a set against its audit."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from medsynth import MedsynthError
from medsynth.evaluation.provenance import check_synthetic_folder, file_sha256, folder_sha256, verify
from tests.conftest import TINY, compose_config, phantom_overrides, run_stage, write_phantom


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One tiny run (NIfTI, DICOM and PNG output) through all four stages; ``make(output, *overrides)`` composes more."""
    root = tmp_path_factory.mktemp("custody")
    image, label = write_phantom(root / "raw")

    def make(output: Path, *more: str):
        return compose_config([*TINY, *phantom_overrides(image, label), "generate.formats=[nifti,dicom,png]",
                               f"paths.output={output}", f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}", *more])

    cfg = make(root / "out")
    for stage in ("preprocess", "train", "generate", "evaluate"):
        run_stage(stage, cfg)
    return SimpleNamespace(root=root, out=root / "out", cfg=cfg, make=make)


def copy_run(audited: SimpleNamespace, name: str, *, passed: bool | None = None) -> Path:
    """A copy of the audited run's folder; ``passed`` overwrites the recorded verdict in its metrics.json."""
    target = audited.root / name
    shutil.copytree(audited.out, target)
    if passed is not None:
        metrics = target / "evaluation" / "metrics.json"
        body = json.loads(metrics.read_text())
        body["verdict"]["passed"] = passed
        metrics.write_text(json.dumps(body))
    return target


def medsynth_verify(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m medsynth.cli verify ...` as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k != "MEDSYNTH_DEBUG"}
    return subprocess.run([sys.executable, "-m", "medsynth.cli", "verify", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_manifest_and_metrics_record_every_hash(audited: SimpleNamespace) -> None:
    out = audited.out
    synthetic = out / "synthetic"
    rows = rows_of(synthetic / "manifest.csv")
    data_sha = file_sha256(out / "data" / "manifest.json")
    checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["data_manifest_sha256"] == data_sha
    for row in rows:
        for column in ("image", "label", "dicom_seg", "preview"):
            assert row[f"{column}_sha256"] == file_sha256(synthetic / row[column]), column
        assert row["dicom_series_sha256"] == folder_sha256(synthetic / row["dicom_series"])
        assert row["data_manifest_sha256"] == data_sha

    body = json.loads((out / "evaluation" / "metrics.json").read_text())
    record = body["provenance"]
    assert record["checkpoint"]["sha256"] == file_sha256(out / "checkpoints" / "last.pt") == rows[0]["checkpoint_sha256"]
    assert record["checkpoint"]["source"] == rows[0]["checkpoint"]
    assert record["data_manifest"]["sha256"] == data_sha
    assert record["synthetic_manifest_sha256"] == file_sha256(synthetic / "manifest.csv")
    on_disk = {p.relative_to(synthetic).as_posix() for p in synthetic.rglob("*") if p.is_file()}
    assert set(record["files"]) == on_disk
    assert all(record["files"][name] == file_sha256(synthetic / name) for name in on_disk)
    listed = {row[c] for row in rows for c in ("image", "label", "dicom_seg", "preview")}
    assert listed <= set(record["files"]) and any(name.startswith(rows[0]["dicom_series"] + "/") for name in record["files"])
    generate_run = json.loads((synthetic / "generate.json").read_text())["run_id"]
    assert record["runs"]["generate"] == generate_run and record["runs"]["train"] == rows[0]["train_run_id"] == checkpoint["run_id"]
    assert all(len(record["runs"][k]) == 32 for k in ("preprocess", "train", "generate", "evaluate"))
    report = (out / "evaluation" / "report.html").read_text()
    assert "Provenance" in report and record["synthetic_manifest_sha256"] in report and rows[0]["image_sha256"] in report


def test_an_untouched_set_verifies(audited: SimpleNamespace) -> None:
    """The files are the audited ones; the result then follows the audit's verdict."""
    passed = json.loads((audited.out / "evaluation" / "metrics.json").read_text())["verdict"]["passed"]
    result = medsynth_verify(str(audited.out))
    if passed:
        assert result.returncode == 0 and result.stdout.startswith("PASS:"), result.stdout + result.stderr
    else:
        assert result.returncode == 1 and result.stdout.startswith("FAIL: audit verdict was FAIL"), result.stdout + result.stderr
    # the same set with a PASS verdict on record passes, from the run folder or the synthetic folder
    copy = copy_run(audited, "untouched", passed=True)
    result = medsynth_verify(str(copy / "synthetic"))
    assert result.returncode == 0 and result.stdout.startswith("PASS:") and "files" in result.stdout, result.stdout + result.stderr
    assert verify(copy).passed and "verdict PASS" in verify(copy).reason
    failed = copy_run(audited, "failed-audit", passed=False)
    assert not verify(failed).passed and verify(failed).reason.startswith("audit verdict was FAIL")


def _replace_image(run: Path) -> str:
    synthetic = run / "synthetic"
    shutil.copyfile(synthetic / "imagesTr" / "syn_00002_0000.nii.gz", synthetic / "imagesTr" / "syn_00001_0000.nii.gz")
    return "imagesTr/syn_00001_0000.nii.gz"


def _add_file(run: Path) -> str:
    synthetic = run / "synthetic"
    shutil.copyfile(synthetic / "imagesTr" / "syn_00002_0000.nii.gz", synthetic / "imagesTr" / "syn_00099_0000.nii.gz")
    return "imagesTr/syn_00099_0000.nii.gz"


def _change_data_manifest(run: Path) -> str:
    path = run / "data" / "manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=1))  # same dataset, other bytes
    return "data/manifest.json"


@pytest.mark.parametrize("tamper", [_replace_image, _add_file, _change_data_manifest], ids=["image-replaced",
                                                                                           "file-added", "data-manifest"])
def test_a_changed_set_fails_evaluate_and_verify(audited: SimpleNamespace, tamper) -> None:
    copy = copy_run(audited, f"tampered-{tamper.__name__}", passed=True)
    named = tamper(copy)
    with pytest.raises(MedsynthError, match=named) as err:
        run_stage("evaluate", audited.make(copy))
    assert "\n" not in str(err.value)
    result = medsynth_verify(str(copy))
    assert result.returncode == 1 and result.stdout.startswith("FAIL:") and named in result.stdout, result.stdout + result.stderr
    assert result.stdout.count("\n") == 1


def test_a_swapped_checkpoint_fails_evaluate_and_verify(audited: SimpleNamespace) -> None:
    """Other bytes at the checkpoint's path (the manifest names the path and its SHA-256)."""
    last = audited.out / "checkpoints" / "last.pt"
    backup = audited.root / "last.pt.orig"
    shutil.copy2(last, backup)
    try:
        state = torch.load(last, weights_only=True)
        state["step"] = 99
        torch.save(state, audited.root / "swapped.pt")
        os.replace(audited.root / "swapped.pt", last)
        with pytest.raises(MedsynthError, match=f"checkpoint {last} has SHA-256"):
            run_stage("evaluate", audited.cfg)
        result = medsynth_verify(str(audited.out))
        assert result.returncode == 1 and "checkpoints/last.pt" in result.stdout and "checkpoint" in result.stdout, result.stdout
    finally:
        os.replace(backup, last)
    assert "audit verdict" in verify(audited.out).reason or verify(audited.out).passed


@pytest.mark.parametrize("case", ["missing", "dicom-slice", "manifest-row", "other-name"])
def test_every_kind_of_change_is_named(audited: SimpleNamespace, case: str) -> None:
    """Missing files, a changed DICOM slice, an edited manifest and an unknown top-level file: evaluate's
    check and the library's verify each name the file."""
    copy = copy_run(audited, f"change-{case}", passed=True)
    synthetic = copy / "synthetic"
    rows = rows_of(synthetic / "manifest.csv")
    if case == "missing":
        (synthetic / rows[3]["label"]).unlink()
        check_says, verify_says = f"missing file: {synthetic / rows[3]['label']}", rows[3]["label"]
    elif case == "dicom-slice":
        slice_file = sorted((synthetic / rows[0]["dicom_series"]).glob("*.dcm"))[0]
        slice_file.write_bytes(slice_file.read_bytes() + b"\0")
        check_says = f"changed file: {synthetic / rows[0]['dicom_series']} "
        verify_says = slice_file.relative_to(synthetic).as_posix()
    elif case == "manifest-row":
        lines = (synthetic / "manifest.csv").read_text().splitlines(keepends=True)
        (synthetic / "manifest.csv").write_text("".join(lines[:-1]))  # the last sample left out
        check_says, verify_says = "extra file: " + str(synthetic / rows[-1]["dicom_series"]).rsplit("/", 1)[0], "manifest.csv"
    else:
        (synthetic / "notes.txt").write_text("not generated")
        check_says, verify_says = f"extra file: {synthetic / 'notes.txt'}", "notes.txt"
    with pytest.raises(MedsynthError) as err:
        check_synthetic_folder(synthetic)
    assert str(err.value).startswith(check_says), str(err.value)
    result = verify(copy)
    assert not result.passed and verify_says in result.reason, result.reason


def test_verify_usage_errors(audited: SimpleNamespace, tmp_path: Path) -> None:
    """No path, no audit, an audit without a provenance record: one line, exit status 2."""
    from medsynth.cli import main

    assert main(["verify"]) == 2
    assert main(["verify", str(tmp_path)]) == 2
    copy = copy_run(audited, "no-provenance")
    metrics = copy / "evaluation" / "metrics.json"
    body = json.loads(metrics.read_text())
    del body["provenance"]
    metrics.write_text(json.dumps(body))
    result = medsynth_verify(str(copy))
    assert result.returncode == 2 and "no provenance record" in result.stderr and result.stderr.count("\n") == 1
    # an exported copy of the synthetic folder alone, with the audit named
    export = audited.root / "export" / "set"
    shutil.copytree(audited.out / "synthetic", export)
    with pytest.raises(MedsynthError, match="no audit found"):
        verify(export)
    found = verify(export, audit=audited.out / "evaluation" / "metrics.json")
    assert found.folder == export and ("audit verdict" in found.reason or found.passed)


def test_resumed_and_rerun_generation_keep_the_hashes_right(audited: SimpleNamespace) -> None:
    """A continued run keeps the earlier rows' hashes, regenerates a sample whose file changed, and a run
    with other settings in the same folder leaves no file of the earlier run behind."""
    folder = audited.root / "resumed"
    more = [f"paths.output={audited.out}", f"paths.synthetic={folder}", "generate.formats=[nifti,png]"]
    run_stage("generate", audited.make(audited.out, *more, "generate.num_samples=2"))
    first = rows_of(folder / "manifest.csv")
    run_stage("generate", audited.make(audited.out, *more, "generate.num_samples=4"))
    rows = rows_of(folder / "manifest.csv")
    assert rows[:2] == first and len(rows) == 4
    check_synthetic_folder(folder)
    (folder / rows[1]["image"]).write_bytes(b"not an image")
    run_stage("generate", audited.make(audited.out, *more, "generate.num_samples=4"))
    assert rows_of(folder / "manifest.csv") == rows  # sample 1 drawn again from its seed, byte for byte
    check_synthetic_folder(folder)
    run_stage("generate", audited.make(audited.out, *more, "generate.num_samples=2", "generate.seed=7"))
    custody = check_synthetic_folder(folder)
    assert len(custody.rows) == 2 and not (folder / rows[3]["image"]).exists()
