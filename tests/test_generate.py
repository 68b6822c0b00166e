"""Generation: formats, conditions, label-map sources, per-sample regeneration, rerun continuation, bad input."""

from __future__ import annotations

import csv
import errno
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from medsynth import ConfigError, MedsynthError
from medsynth.io import load_nifti, save_nifti
from medsynth.stages import synthetic
from tests.conftest import phantom_overrides, run_stage


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def trained_mask(tiny_config, phantom):
    """A tiny mask model trained on the phantom; returns a config factory sharing its output folder."""
    base = [*phantom_overrides(*phantom), "generate.num_samples=4", "generate.batch_size=2"]
    cfg = tiny_config(*base)
    run_stage("preprocess", cfg)
    run_stage("train", cfg)
    return lambda *more: tiny_config(*base, *more)


def test_nnunet_layout_dicom_and_provenance(trained_mask) -> None:
    cfg = trained_mask("generate.formats=[nifti,dicom,png]")
    rows = rows_of(run_stage("generate", cfg))
    out = Path(cfg.paths.synthetic)
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["numTraining"] == 4 and dataset["labels"] == {"background": 0, "outer": 1, "inner": 2}
    assert dataset["file_ending"] == ".nii.gz" and dataset["channel_names"] == {"0": "MR"}
    for row in rows:
        assert row["image"] == f"imagesTr/{row['sample_id']}_0000.nii.gz" and row["label"] == f"labelsTr/{row['sample_id']}.nii.gz"
        assert len(row["checkpoint_sha256"]) == 64 and row["train_run_id"] and row["sampler"] == "DDIMScheduler"
        assert row["medsynth_version"] and row["label_source"].startswith("phantom_")
    image, affine = load_nifti(out / rows[0]["image"])
    series = sorted((out / rows[0]["dicom_series"]).glob("*.dcm"))
    assert len(series) == 1 and (out / rows[0]["dicom_seg"]).is_file()
    from medsynth.io.dicom import load_dicom_series

    volume, dicom_affine = load_dicom_series(series)
    np.testing.assert_allclose(volume, image.reshape(volume.shape), atol=1e-3)
    np.testing.assert_allclose(dicom_affine[:3, :3], affine[:3, :3], atol=1e-4)
    if shutil.which("dciodvfy"):
        for path in [*series, out / rows[0]["dicom_seg"]]:
            report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True).stderr
            assert not [line for line in report.splitlines() if line.startswith("Error")], report


def test_any_sample_regenerates_alone_and_a_rerun_continues(trained_mask) -> None:
    """A sample depends on its seed alone (DDPM's stochastic steps included); an interrupted run is continued."""
    cfg = trained_mask("generate.sampler=ddpm", "generate.steps=4")
    first = rows_of(run_stage("generate", cfg))
    out = Path(cfg.paths.synthetic)
    image, _ = load_nifti(out / first[3]["image"])
    # regenerate sample 3 alone: start at its seed, one sample
    alone = trained_mask("generate.sampler=ddpm", "generate.steps=4",
                         f"generate.seed={first[3]['seed']}", "generate.num_samples=1", f"paths.synthetic={out.parent / 'alone'}")
    again = rows_of(run_stage("generate", alone))
    # equal up to the float rounding of batched arithmetic (a batch of 1 vs 2 sums in another order)
    np.testing.assert_allclose(load_nifti(out.parent / "alone" / again[0]["image"])[0], image, atol=1e-5)

    # simulate a run stopped after 2 samples: the rerun keeps them and writes only the rest
    with open(out / "manifest.csv", newline="") as fh:
        lines = fh.read().splitlines()
    (out / "manifest.csv").write_text("\n".join(lines[:3]) + "\n")
    kept = (out / first[0]["image"]).stat().st_mtime_ns
    rows = rows_of(run_stage("generate", cfg))
    assert [r["sample_id"] for r in rows] == [r["sample_id"] for r in first]
    assert (out / first[0]["image"]).stat().st_mtime_ns == kept
    # other settings: start afresh
    rows_of(run_stage("generate", trained_mask("generate.sampler=ddpm",
                                      "generate.steps=3")))
    assert (out / first[0]["image"]).stat().st_mtime_ns != kept


def test_user_label_maps_are_used_and_checked(trained_mask, tmp_path: Path) -> None:
    cfg = trained_mask()
    folder = tmp_path / "maps"
    label = np.zeros((16, 16), np.uint8)
    label[4:12, 4:12] = 1
    label[6:10, 6:10] = 2
    save_nifti(folder / "a.nii.gz", label, np.eye(4), dtype=np.uint8)
    rows = rows_of(run_stage("generate", trained_mask("generate.labels.source=folder", f"generate.labels.folder={folder}")))
    assert {r["label_source"] for r in rows} == {"folder:a.nii.gz"}
    np.testing.assert_array_equal(load_nifti(Path(cfg.paths.synthetic) / rows[0]["label"])[0][..., 0], label)
    save_nifti(folder / "b.nii.gz", label * 2, np.eye(4), dtype=np.uint8)
    with pytest.raises(MedsynthError, match="holds value"):
        run_stage("generate", trained_mask("generate.labels.source=folder", f"generate.labels.folder={folder}"))
    (folder / "b.nii.gz").unlink()
    save_nifti(folder / "c.nii.gz", np.zeros((8, 8), np.uint8), np.eye(4), dtype=np.uint8)
    with pytest.raises(MedsynthError, match="shape"):
        run_stage("generate", trained_mask("generate.labels.source=folder", f"generate.labels.folder={folder}"))


def test_label_maps_from_a_label_map_generator(trained_mask, tmp_path: Path) -> None:
    """Two models: a class-conditioned label-map generator feeds the mask model; no training map is reused."""
    labelmap = trained_mask("model.conditioning=class", "model.class_key=level", "model.output=label",
                            f"paths.checkpoints={tmp_path / 'labelmap'}")
    run_stage("train", labelmap)
    cfg = trained_mask("generate.labels.source=generator", f"generate.labels.generator={tmp_path / 'labelmap' / 'last.pt'}",
                       "generate.prompt='level=2'")
    rows = rows_of(run_stage("generate", cfg))
    assert {r["label_source"] for r in rows} == {"generator"} and all(len(r["label_generator_sha256"]) == 64 for r in rows)
    assert all("level=2" in r["attributes"] for r in rows)
    with pytest.raises(MedsynthError, match="not a label-map generator"):
        run_stage("generate", trained_mask("generate.labels.source=generator",
                                  f"generate.labels.generator={Path(cfg.paths.checkpoints) / 'last.pt'}"))


def test_prompts_and_class_distributions(tiny_config, phantom) -> None:
    base = [*phantom_overrides(*phantom), "model.conditioning=class", "model.class_key=level", "generate.num_samples=6"]
    cfg = tiny_config(*base)
    run_stage("preprocess", cfg)
    run_stage("train", cfg)
    rows = rows_of(run_stage("generate", tiny_config(*base, "generate.prompt='level=3'")))
    assert {r["attributes"] for r in rows} == {"level=3"}
    rows = rows_of(run_stage("generate", tiny_config(*base, "generate.class_distribution={1:1.0,2:0.0}")))
    assert {r["attributes"] for r in rows} == {"level=1"}
    with pytest.raises(ConfigError, match="not one the model was trained with"):
        run_stage("generate", tiny_config(*base, "generate.prompt='level=9'"))
    with pytest.raises(ConfigError, match="key=value"):
        run_stage("generate", tiny_config(*base, "generate.prompt=level"))


def test_full_disk_leaves_a_consistent_manifest(trained_mask, monkeypatch) -> None:
    cfg = trained_mask()
    real = synthetic.save_nifti
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:  # sample 3 (second batch) runs out of space
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "save_nifti", failing)
    with pytest.raises(MedsynthError, match="disk full.*2 complete samples"):
        run_stage("generate", cfg)
    rows = rows_of(Path(cfg.paths.synthetic) / "manifest.csv")
    assert [r["sample_id"] for r in rows] == ["syn_00000", "syn_00001"]
    monkeypatch.setattr(synthetic, "save_nifti", real)
    assert len(rows_of(run_stage("generate", cfg))) == 4


def test_bad_generate_options(trained_mask) -> None:
    with pytest.raises(ConfigError, match="generate.formats"):
        run_stage("generate", trained_mask("generate.formats=[tiff]"))
    with pytest.raises(ConfigError, match="generate.labels.source"):
        run_stage("generate", trained_mask("generate.labels.source=atlas"))
    with pytest.raises(ConfigError, match="generate.labels.generator must be the checkpoint of a label-map model"):
        run_stage("generate", trained_mask("generate.labels.source=generator"))


def test_generate_from_a_registered_model_or_a_run_id(tiny_config, phantom, tmp_path: Path) -> None:
    """train registers the generator (mlflow.register_model); generate takes models:/NAME/VERSION or a run id."""
    import torch

    base = [*phantom_overrides(*phantom), "generate.num_samples=2", "mlflow.register_model=brain-generator"]
    cfg = tiny_config(*base)
    run_stage("preprocess", cfg)
    run_id = torch.load(run_stage("train", cfg), weights_only=True)["run_id"]
    for source in ("models:/brain-generator/1", run_id):
        rows = rows_of(run_stage("generate", tiny_config(*base, f"generate.checkpoint={source}",
                                                f"paths.synthetic={tmp_path / source.replace('/', '_').replace(':', '')}")))
        assert len(rows) == 2 and rows[0]["checkpoint"] == source and rows[0]["train_run_id"] == run_id
    with pytest.raises(MedsynthError, match="no-such-model"):
        run_stage("generate", tiny_config(*base, "generate.checkpoint=models:/no-such-model/1"))


def test_privacy_gate_replaces_rejected_candidates() -> None:
    """A rejected candidate is replaced by a draw with a new, recorded seed; endless rejection stops with an error."""
    from types import SimpleNamespace

    import torch

    from medsynth.stages.candidates import Candidate, gated_draws, redraw_seed

    def draw(seeds):
        images = torch.tensor([float(s % 2) for s in seeds]).view(-1, 1, 1, 1)
        return [Candidate(s, {}, None, np.eye(4), "") for s in seeds], images, None

    class OddSeedsRejected:  # a gate that rejects images made from odd seeds
        def check(self, images):
            odd = images.flatten().numpy() == 1
            return SimpleNamespace(accepted=~odd, pixel=np.zeros(len(odd)), feature=None)

    batch, rejected = gated_draws([10, 11, 12], draw, OddSeedsRejected(), max_redraws=50)
    assert [b[0].seed for b in batch][::2] == [10, 12] and batch[1][0].seed % 2 == 0
    assert batch[1][0].seed == redraw_seed(11, batch[1][3]["draws"] - 1) and rejected == batch[1][3]["draws"] - 1 >= 1
    assert [b[3]["privacy_gate"] for b in batch] == ["accepted"] * 3 and batch[0][3]["draws"] == 1

    class RejectAll:
        def check(self, images):
            return SimpleNamespace(accepted=np.zeros(len(images), bool), pixel=np.zeros(len(images)), feature=None)

    with pytest.raises(MedsynthError, match="rejected sample seed 10 and all 2 replacements"):
        gated_draws([10], draw, RejectAll(), max_redraws=2)


def test_gate_columns_in_the_manifest(trained_mask) -> None:
    cfg = trained_mask()
    rows = rows_of(run_stage("generate", cfg))
    assert {r["privacy_gate"] for r in rows} == {"accepted"}
    assert all(float(r["gate_pixel_nearness"]) >= 0 and float(r["gate_feature_distance"]) >= 0 for r in rows)
    assert "holdout" in rows[0]["gate_method"] and "0.01" in rows[0]["gate_method"]
    off = rows_of(run_stage("generate", trained_mask("generate.privacy_gate.enabled=false", f"paths.synthetic={cfg.paths.output}/off")))
    assert {r["privacy_gate"] for r in off} == {"off"} and off[0]["gate_method"] == "off"
