"""End to end: all four stages on the real demo data with tiny settings, checked on disk and in MLflow."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from medsynth.compute import resolve_precision
from medsynth.data import read_manifest
from medsynth.io import load_nifti
from tests.conftest import phantom_overrides, run_stage


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file of a run, recursively."""
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tiny_config, tmp_path: Path) -> None:
    """`medsynth run` on MNI152 with an 8-channel net: files, geometry, metrics and MLflow runs."""
    cfg = tiny_config("data.spacing=[12.0,12.0,6.0]")
    run_id = run_stage("run", cfg)
    out = Path(cfg.paths.output)

    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["label_names"] == ["background", "other_brain", "grey_matter", "white_matter"]
    assert set(manifest["counts"]) == {"train", "validation", "holdout"}
    record = manifest["records"][0]
    assert record["shape"] == [16, 16] and len(record["sha256"]) == 64
    assert {"source", "slice_index", "split", "spacing", "affine"} <= set(record)

    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["config"]["trainer"]["max_steps"] == 3

    with open(out / "synthetic" / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["sample_id"] for r in rows] == [f"syn_{i:05d}" for i in range(5)]
    assert len({r["seed"] for r in rows}) == 5
    assert all(r["checkpoint_sha256"] == rows[0]["checkpoint_sha256"] and r["steps"] == "3" for r in rows)
    used = resolve_precision("auto", torch.device("cpu"))  # precision: auto is recorded as what it meant here
    assert {r["precision"] for r in rows} == {used}
    by_id = {r["id"]: r for r in manifest["records"]}
    image, affine = load_nifti(out / "synthetic" / rows[0]["image"])
    label, label_affine = load_nifti(out / "synthetic" / rows[0]["label"])
    assert image.shape == label.shape == (16, 16, 1)
    assert 0.0 <= image.min() and image.max() <= 1.0
    np.testing.assert_allclose(affine, by_id[rows[0]["label_source"]]["affine"], atol=1e-4)
    np.testing.assert_allclose(label_affine, affine)
    assert set(np.unique(label)) <= {0, 1, 2, 3}

    evaluation = json.loads((out / "evaluation" / "metrics.json").read_text())
    metrics = evaluation["metrics"]
    assert 0.0 <= metrics["privacy/closer_to_train_fraction_pixel"]["value"] <= 1.0
    assert metrics["privacy/min_distance_to_train_pixel"]["value"] > 0.0
    assert 0.0 <= metrics["privacy/membership_auc"]["value"] <= 1.0
    assert {"utility/dice_real_only", "utility/dice_synthetic_only", "utility/dice_real_plus_synthetic"} <= set(metrics)
    assert all("better" in m and "meaning" in m for m in metrics.values())
    assert all(np.isfinite(m["value"]) for m in metrics.values() if m["value"] is not None)
    assert isinstance(evaluation["verdict"]["passed"], bool)
    assert evaluation["precision"] == used
    assert (out / "evaluation" / "comparison.png").is_file()
    assert "Verdict" in (out / "evaluation" / "report.html").read_text()
    assert (out / "data" / "encoder.pt").is_file()

    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["trainer.max_steps"] == "3"
    assert parent.data.params["model.conditioning"] == "mask"
    assert "privacy_membership_auc" in parent.data.metrics
    assert parent.data.tags["medsynth.verdict"] in {"pass", "fail"}
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    stages = {c.data.tags["medsynth.stage"]: c for c in children}
    assert set(stages) == {"preprocess", "train", "generate", "evaluate"}
    assert all(c.info.status == "FINISHED" for c in children)
    losses = client.get_metric_history(stages["train"].info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3] and all(np.isfinite(m.value) for m in losses)
    assert any(p.startswith("samples/") for p in artifact_paths(client, stages["train"].info.run_id))
    assert "synthetic/manifest.csv" in artifact_paths(client, stages["generate"].info.run_id)
    assert {"evaluation/metrics.json", "evaluation/comparison.png", "evaluation/report.html",
            "evaluation/most_similar_pairs.png"} <= artifact_paths(client, stages["evaluate"].info.run_id)
    assert stages["evaluate"].data.tags["medsynth.verdict"] == parent.data.tags["medsynth.verdict"]
    assert stages["generate"].data.params["precision_used"] == stages["evaluate"].data.params["precision_used"] == used
    assert "data/manifest.json" in artifact_paths(client, stages["preprocess"].info.run_id)
    assert "config.yaml" in artifact_paths(client, run_id)


def test_stages_run_alone_on_a_phantom(tiny_config, phantom, tmp_path: Path) -> None:
    """Each stage reads only what earlier stages wrote, so each can be rerun alone."""
    from tests.conftest import phantom_overrides

    cfg = tiny_config(*phantom_overrides(*phantom))
    manifest = run_stage("preprocess", cfg)
    assert manifest.counts()["train"] > 0
    checkpoint = run_stage("train", cfg)
    assert checkpoint.is_file()
    first = run_stage("generate", cfg).read_text()
    metrics_path = run_stage("evaluate", cfg)
    assert json.loads(metrics_path.read_text())["num_synthetic"] == 5
    # generation is reproducible from the seeds alone
    regenerated = run_stage("generate", cfg).read_text()
    assert regenerated == first
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment_name).experiment_id])
    assert len(runs) == 5 and all("mlflow.parentRunId" not in r.data.tags for r in runs)
    # each stage's run logs its own settings
    own = {"preprocess": ("data.source", "nifti"), "train": ("model.conditioning", "mask"),
           "generate": ("generate.num_samples", "5"), "evaluate": ("evaluate.sheet_rows", "3")}
    for r in runs:
        key, value = own[r.data.tags["medsynth.stage"]]
        assert r.data.params.get(key) == value, (r.data.tags["medsynth.stage"], key)


def test_evaluate_a_3d_dataset_with_the_25d_protocol(tiny_config, tmp_path: Path) -> None:
    """Evaluation runs on volumes: 3D segmenters and MS-SSIM, 2D encoder features per plane (2.5D)."""
    from medsynth.data import Manifest, Record, write_record
    from medsynth.diffusion.generator import build_denoiser, generator_state
    from medsynth.io import save_nifti
    from medsynth.training import EMA, file_sha256, save_checkpoint
    from tests.test_evaluation import blobs

    cfg = tiny_config("data.spatial_dims=3", "data.size=[12,12,12]", "model.network.spatial_dims=3",
                      "evaluate.membership.timesteps=[3]")
    data_dir, synthetic_dir = Path(cfg.paths.data), Path(cfg.paths.synthetic)
    images, labels = blobs(12 * 12, seed=0, size=12)  # 144 slices -> 12 volumes of 12^3
    volumes = images.reshape(12, 12, 1, 12, 12).transpose(0, 2, 3, 4, 1)
    label_volumes = labels.reshape(12, 12, 1, 12, 12).transpose(0, 2, 3, 4, 1)
    records = []
    for i in range(8):
        split = "train" if i < 5 else ("validation" if i == 5 else "holdout")
        file, digest = write_record(data_dir, f"case{i}", volumes[i], label_volumes[i])
        records.append(Record(f"case{i}", f"case{i}", split, file, [12, 12, 12], [1.0] * 3, np.eye(4).tolist(), digest))
    Manifest(data_dir, 3, ["background", "disc", "square"], records).write()
    model = build_denoiser(cfg.model, num_classes=3)
    checkpoint = save_checkpoint(Path(cfg.paths.checkpoints) / "last.pt", {
        "ema": EMA(model).state_dict(), **generator_state(cfg.model, cfg.scheduler, cfg.trainer.sampling),
        "label_names": ["background", "disc", "square"], "image_size": [12, 12, 12], "spatial_dims": 3, "vocabulary": {},
    })
    data_hash = file_sha256(data_dir / "manifest.json")
    rows = ["sample_id,image,image_sha256,label,label_sha256,label_source,checkpoint,checkpoint_sha256,data_manifest_sha256"]
    for i in range(8, 12):
        image = save_nifti(synthetic_dir / "images" / f"syn_{i}.nii.gz", volumes[i, 0], np.eye(4))
        label = save_nifti(synthetic_dir / "labels" / f"syn_{i}.nii.gz", label_volumes[i, 0], np.eye(4), dtype=np.uint8)
        rows.append(f"syn_{i},images/syn_{i}.nii.gz,{file_sha256(image)},labels/syn_{i}.nii.gz,{file_sha256(label)},"
                    f"case0,{checkpoint},{file_sha256(checkpoint)},{data_hash}")
    (synthetic_dir / "manifest.csv").write_text("\n".join(rows) + "\n")

    metrics = json.loads(run_stage("evaluate", cfg).read_text())["metrics"]
    for plane in ("sagittal", "coronal", "axial"):
        assert np.isfinite(metrics[f"realism/fid_features_{plane}"]["value"])
    assert 0.0 <= metrics["utility/dice_real_plus_synthetic"]["value"] <= 1.0
    assert not (Path(cfg.paths.evaluation) / "comparison.png").exists()  # picture sheets are 2D only
    assert "Verdict" in (Path(cfg.paths.evaluation) / "report.html").read_text()


def test_rectified_flow_model_end_to_end(tiny_config, phantom) -> None:
    """scheduler=rflow trains, samples with the RFlow sampler (generate.sampler=auto) and is evaluated;
    a DDIM sampler is refused before any work."""
    from medsynth import ConfigError
    from tests.conftest import phantom_overrides

    cfg = tiny_config(*phantom_overrides(*phantom), "scheduler=rflow")
    assert cfg.generate.sampler == "auto"
    run_stage("preprocess", cfg)
    trained = run_stage("train", cfg)
    checkpoint = torch.load(trained, weights_only=True)
    assert checkpoint["config"]["scheduler"]["_target_"].endswith("RFlowScheduler")
    with open(run_stage("generate", cfg), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5 and rows[0]["sampler"] == "RFlowScheduler"
    assert json.loads(run_stage("evaluate", cfg).read_text())["metrics"]["privacy/membership_auc"]["value"] is not None
    with pytest.raises(ConfigError, match="RFlowScheduler"):
        tiny_config(*phantom_overrides(*phantom), "scheduler=rflow", "generate.sampler=ddim")


def test_joint_model_generates_its_own_label_maps(tiny_config, phantom) -> None:
    """model.conditioning=joint: no training label map is reused; the labels come out of the model."""
    from tests.conftest import phantom_overrides

    cfg = tiny_config(*phantom_overrides(*phantom), "model.conditioning=joint")
    run_stage("preprocess", cfg)
    run_stage("train", cfg)
    with open(run_stage("generate", cfg), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["label_source"] for r in rows} == {"generated"}
    label, _ = load_nifti(Path(cfg.paths.synthetic) / rows[0]["label"])
    assert label.shape == (16, 16, 1) and set(np.unique(label)) <= {0, 1, 2}
    metrics = json.loads(run_stage("evaluate", cfg).read_text())["metrics"]
    assert 0.0 <= metrics["realism/label_consistency_dice"]["value"] <= 1.0


def test_checkpoint_from_another_model_config_is_refused(tiny_config, phantom, tmp_path: Path) -> None:
    """Weights that do not fit the network their config describes: one clear error, nothing generated."""
    from medsynth import MedsynthError
    from tests.conftest import phantom_overrides

    cfg = tiny_config(*phantom_overrides(*phantom))
    run_stage("preprocess", cfg)
    trained = run_stage("train", cfg)
    state = torch.load(trained, weights_only=True)
    state["config"]["model"]["network"]["channels"] = [8, 16]
    foreign = tmp_path / "foreign.pt"
    torch.save(state, foreign)
    with pytest.raises(MedsynthError, match="do(es)? not fit"):
        run_stage("generate", tiny_config(*phantom_overrides(*phantom), f"generate.checkpoint={foreign}"))
    assert not (Path(cfg.paths.synthetic) / "manifest.csv").exists()


def test_class_model_with_guidance_and_compiled_training(tiny_config, phantom) -> None:
    """class conditioning end to end: trained through torch.compile, sampled with guidance, each
    sample's class recorded in the manifest and drawn from the source split's classes."""
    cfg = tiny_config(*phantom_overrides(*phantom), "model.conditioning=class", "model.class_key=level",
                      "trainer.compile=true", "+trainer.compile_options.backend=eager", "generate.guidance_scale=2.5")
    run_stage("preprocess", cfg)
    run_stage("train", cfg)
    rows = list(csv.DictReader(open(run_stage("generate", cfg))))
    manifest = read_manifest(cfg.paths.data)
    levels = {r.attributes["level"] for r in manifest.split("train")}
    assert len(rows) == cfg.generate.num_samples
    for row in rows:
        assert row["attributes"].startswith("level=") and row["attributes"].split("=")[1] in levels
        assert row["guidance_scale"] == "2.5" and row["image"] and not row["label"]
