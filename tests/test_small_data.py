"""Too little or lopsided data: splits balanced by records, one clear line where a split is too small
for a stage, figures marked not computable where a set is too small for them, a failed preprocess
that still says why each item was skipped, and generate refusing a run that cannot fit on its disk."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medsynth import MedsynthError
from medsynth.data.splits import patient_splits, record_shares
from medsynth.io import save_nifti
from tests.conftest import TINY, phantom_overrides, run_stage

FRACTIONS = {"train": 0.7, "validation": 0.15, "holdout": 0.15}


def test_few_patients_of_unequal_size_are_split_by_records() -> None:
    sizes = {"p1": 20, "p2": 170, "p3": 86, "p4": 31, "p5": 25, "p6": 160}
    by_count = patient_splits(list(sizes), fractions=FRACTIONS)
    by_records = patient_splits(list(sizes), fractions=FRACTIONS, sizes=sizes)

    def miss(assignment: dict[str, str]) -> float:
        shares = record_shares(assignment, sizes=sizes, fractions=FRACTIONS)
        return sum(abs(shares[s] - FRACTIONS[s]) for s in FRACTIONS)

    assert miss(by_records) < miss(by_count)
    assert miss(by_records) <= 0.2
    assert set(by_records) == set(sizes) and set(by_records.values()) == set(FRACTIONS), "a split was emptied"
    assert by_records == patient_splits(list(reversed(sizes)), fractions=FRACTIONS, sizes=sizes), "order-dependent"


def test_patients_of_equal_size_keep_the_split_by_count() -> None:
    patients = [f"p{i}" for i in range(20)]
    assert patient_splits(patients, fractions=FRACTIONS, sizes=dict.fromkeys(patients, 40)) == \
        patient_splits(patients, fractions=FRACTIONS)


def test_the_manifest_says_what_the_splits_achieved(tiny_config, phantom) -> None:
    manifest = run_stage("preprocess", tiny_config(*phantom_overrides(*phantom)))
    splits = manifest.settings["splits"]
    assert splits["records"] == manifest.counts()
    assert sum(splits["records"].values()) == len(manifest.records)
    assert abs(sum(splits["record_shares"].values()) - 1.0) < 1e-3


def test_generate_and_evaluate_refuse_an_empty_holdout_in_one_line(tiny_config, phantom) -> None:
    cfg = tiny_config(*phantom_overrides(*phantom), "data.splits.fractions={train: 0.8, validation: 0.2, holdout: 0.0}")
    manifest = run_stage("preprocess", cfg)
    assert "holdout" not in manifest.counts()
    run_stage("train", cfg)
    with pytest.raises(MedsynthError) as caught:
        run_stage("generate", cfg)
    message = str(caught.value)
    assert "generate needs at least 1 'holdout' record(s) for the privacy gate's thresholds" in message
    assert "data.splits.fractions" in message and "\n" not in message
    assert not Path(cfg.run.paths.synthetic, "manifest.csv").exists()

    run_stage("generate", tiny_config(*phantom_overrides(*phantom), "generate.privacy_gate.enabled=false",
                                      "data.splits.fractions={train: 0.8, validation: 0.2, holdout: 0.0}"))
    with pytest.raises(MedsynthError, match="evaluate needs at least 1 'holdout' record"):
        run_stage("evaluate", cfg)
    assert not Path(cfg.run.paths.evaluation, "metrics.json").exists()


def test_figures_a_tiny_set_cannot_support_are_marked_not_computable(tiny_config, phantom) -> None:
    cfg = tiny_config(*phantom_overrides(*phantom), "generate.num_samples=1", "generate.batch_size=1")
    for stage in ("preprocess", "train", "generate", "evaluate"):
        run_stage(stage, cfg)
    metrics = json.loads(Path(cfg.run.paths.evaluation, "metrics.json").read_text())
    missing = metrics["not_computable"]
    assert missing, "a single synthetic image supports no distribution figure"
    assert all("synthetic set has 1" in why for name, why in missing.items() if "realism/fd" in name)
    assert not metrics["verdict"]["passed"]
    assert metrics["partial"] is False


def test_an_audit_that_fails_midway_leaves_a_partial_record(tiny_config, phantom, monkeypatch: pytest.MonkeyPatch) -> None:
    stage = importlib.import_module("medsynth.stages.evaluate")  # the module (the package exports the function)
    cfg = tiny_config(*phantom_overrides(*phantom))
    for name in ("preprocess", "train", "generate"):
        run_stage(name, cfg)

    def broken(**_: object) -> list:
        raise MedsynthError("utility segmenter diverged")

    monkeypatch.setattr(stage, "utility_figures", broken)
    with pytest.raises(MedsynthError) as caught:
        run_stage("evaluate", cfg)
    path = Path(cfg.run.paths.evaluation, "metrics.json")
    assert f"the audit stopped while computing the utility figures; what it computed is in {path}" in str(caught.value)
    metrics = json.loads(path.read_text())
    assert metrics["partial"] is True and metrics["verdict"]["passed"] is False
    assert any(name.startswith("privacy/") for name in metrics["metrics"]), "figures computed before are kept"
    assert "did not finish" in Path(cfg.run.paths.evaluation, "report.html").read_text()


def test_a_preprocess_where_every_item_fails_still_writes_its_quarantine(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (raw / "empty.nii").write_bytes(b"")
    save_nifti(raw / "flat.nii.gz", np.zeros((4, 4, 4), np.float32), np.eye(4))
    env = {k: v for k, v in os.environ.items() if k != "MEDSYNTH_DEBUG"}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "medsynth.cli", "preprocess", *TINY, "data=folder",
                           f"paths.input={raw}", f"paths.output={out}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    quarantine = out / "data" / "quarantine.json"
    assert str(quarantine) in done.stderr.strip().splitlines()[-1]
    items = json.loads(quarantine.read_text())["items"]
    assert {Path(i["file"]).name for i in items} >= {"broken.nii.gz", "empty.nii", "flat.nii.gz"}
    assert all(i["reason"].strip() for i in items)
    assert not (out / "data" / "manifest.json").exists()


def test_generate_refuses_a_run_that_cannot_fit_on_its_disk(tiny_config, phantom, tmpfs) -> None:
    small = tmpfs("64k")
    cfg = tiny_config(*phantom_overrides(*phantom), f"paths.synthetic={small / 'synthetic'}", "generate.num_samples=5000",
                      "generate.formats=[nifti,dicom,png]")
    run_stage("preprocess", cfg)
    run_stage("train", cfg)
    with pytest.raises(MedsynthError) as caught:
        run_stage("generate", cfg)
    message = str(caught.value)
    assert message.startswith("not enough disk space for generate: 5000 sample(s) need at least")
    assert f"{small / 'synthetic'}" in message or str(small) in message
    assert "generate.num_samples" in message
    assert not any(small.rglob("*.nii.gz"))


def test_validation_reads_an_evenly_spaced_subset_of_a_large_split(tiny_config, phantom) -> None:
    from medsynth.data import load_split

    manifest = run_stage("preprocess", tiny_config(*phantom_overrides(*phantom)))
    every = load_split(manifest, "train")
    some = load_split(manifest, "train", limit=3)
    assert len(every) > 3 and len(some) == 3
    assert some.ids[0] == every.ids[0] and some.ids[-1] == every.ids[-1]
    assert load_split(manifest, "train", limit=10_000).ids == every.ids
    with pytest.raises(MedsynthError, match="trainer.validation.max_records"):
        tiny_config("trainer.validation.max_records=0")


def test_validation_shows_its_progress(tiny_config, phantom, capfd: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(*phantom_overrides(*phantom), "progress=true", "trainer.checkpoint_every=2")
    run_stage("preprocess", cfg)
    capfd.readouterr()
    run_stage("train", cfg)
    assert "validation at step 2" in capfd.readouterr().err


def test_the_image_size_limit_is_a_setting(tiny_config, phantom) -> None:
    with pytest.raises(MedsynthError, match=r"data.max_image_gb"):
        run_stage("preprocess", tiny_config(*phantom_overrides(*phantom), "data.max_image_gb=0.0001"))
    quarantine = json.loads(Path(tiny_config().run.paths.data, "quarantine.json").read_text())
    assert quarantine["count"] >= 1 and "data.max_image_gb" in quarantine["items"][0]["reason"]
    assert run_stage("preprocess", tiny_config(*phantom_overrides(*phantom), "data.max_image_gb=1")).records
    with pytest.raises(MedsynthError, match="data.max_image_gb"):
        tiny_config("data.max_image_gb=0")
