"""Lineage in MLflow: every stage run names its inputs (run ids, hashes), the training and synthetic
sets are dataset inputs, and a registered generator version carries its audit."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from medsynth import MedsynthError
from medsynth.evaluation.provenance import file_sha256
from medsynth.tracking.registry import AUDITED_ALIAS, audit_status, log_generator, mark_audit
from tests.conftest import TINY, compose_config, phantom_overrides, run_stage, write_phantom

MODEL = "lineage-generator"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One tiny run of the four stages, the generator registered; ``make(*overrides)`` composes more."""
    root = tmp_path_factory.mktemp("lineage")
    image, label = write_phantom(root / "raw")
    uri = f"sqlite:///{root / 'mlflow.db'}"

    def make(*more: str):
        return compose_config([*TINY, *phantom_overrides(image, label), f"paths.output={root / 'out'}",
                               f"mlflow.tracking_uri={uri}", f"mlflow.register_model={MODEL}", *more])

    cfg = make()
    for stage in ("preprocess", "train", "generate", "evaluate"):
        run_stage(stage, cfg)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment_name).experiment_id],
                              order_by=["attributes.start_time ASC"])
    stages = {r.data.tags["medsynth.stage"]: r for r in runs}
    return SimpleNamespace(root=root, out=root / "out", uri=uri, make=make, client=client, runs=stages)


def lineage(run) -> dict[str, str]:
    return {k.removeprefix("medsynth.lineage."): v for k, v in run.data.tags.items() if k.startswith("medsynth.lineage.")}


def dataset_inputs(run) -> list[tuple[str, str, str, dict]]:
    """(name, digest, context, source) of each dataset input of a run."""
    found = []
    for item in run.inputs.dataset_inputs:
        context = {t.key: t.value for t in item.tags}.get("mlflow.data.context", "")
        found.append((item.dataset.name, item.dataset.digest, context, json.loads(item.dataset.source)))
    return found


def test_each_stage_names_its_inputs(pipeline: SimpleNamespace) -> None:
    out, runs = pipeline.out, pipeline.runs
    data_sha = file_sha256(out / "data" / "manifest.json")
    checkpoint_sha = file_sha256(out / "checkpoints" / "last.pt")
    synthetic_sha = file_sha256(out / "synthetic" / "manifest.csv")
    ids = {stage: run.info.run_id for stage, run in runs.items()}

    assert json.loads((out / "data" / "lineage.json").read_text()) == {"preprocess_run_id": ids["preprocess"],
                                                                       "data_manifest_sha256": data_sha}
    assert lineage(runs["preprocess"]) == {"data_manifest_sha256": data_sha}
    assert lineage(runs["train"]) == {"data_manifest_sha256": data_sha, "preprocess_run_id": ids["preprocess"]}
    checkpoint = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["data_manifest_sha256"] == data_sha and checkpoint["lineage"] == {"preprocess_run_id": ids["preprocess"]}
    assert lineage(runs["generate"]) == {"train_run_id": ids["train"], "preprocess_run_id": ids["preprocess"],
                                         "checkpoint_sha256": checkpoint_sha, "data_manifest_sha256": data_sha,
                                         "synthetic_manifest_sha256": synthetic_sha}
    assert json.loads((out / "synthetic" / "generate.json").read_text())["run_id"] == ids["generate"]
    evaluate = lineage(runs["evaluate"])
    assert {k: evaluate[k] for k in ("generate_run_id", "train_run_id", "preprocess_run_id", "checkpoint_sha256",
                                     "data_manifest_sha256", "synthetic_manifest_sha256")} == {
        "generate_run_id": ids["generate"], "train_run_id": ids["train"], "preprocess_run_id": ids["preprocess"],
        "checkpoint_sha256": checkpoint_sha, "data_manifest_sha256": data_sha, "synthetic_manifest_sha256": synthetic_sha}
    assert evaluate["registered_model"] == f"models:/{MODEL}/1"


def test_training_and_synthetic_sets_are_dataset_inputs(pipeline: SimpleNamespace) -> None:
    out, runs = pipeline.out, pipeline.runs
    data_sha = file_sha256(out / "data" / "manifest.json")
    synthetic_sha = file_sha256(out / "synthetic" / "manifest.csv")
    [(name, digest, context, source)] = dataset_inputs(runs["train"])
    assert context == "training" and digest == data_sha[:16] and source["uri"] == (out / "data").resolve().as_uri()
    assert name.endswith("/data")
    [(name, digest, context, source)] = dataset_inputs(runs["generate"])
    assert context == "synthetic" and digest == synthetic_sha[:16] and source["uri"] == (out / "synthetic").resolve().as_uri()
    [(_, digest, context, _)] = dataset_inputs(runs["evaluate"])
    assert context == "evaluation" and digest == synthetic_sha[:16]
    assert json.loads(runs["train"].inputs.dataset_inputs[0].dataset.profile)["sha256"] == data_sha


def test_the_registered_version_carries_its_audit(pipeline: SimpleNamespace) -> None:
    """evaluate finds the version (its run and checkpoint hash) and tags it; a PASS sets the alias."""
    client, out = pipeline.client, pipeline.out
    version = client.get_model_version(MODEL, "1")
    assert version.tags["medsynth.source_checkpoint_sha256"] == file_sha256(out / "checkpoints" / "last.pt")
    metrics = out / "evaluation" / "metrics.json"
    body = json.loads(metrics.read_text())
    verdict = "pass" if body["verdict"]["passed"] else "fail"
    assert version.tags["medsynth.audit.verdict"] == verdict
    assert version.tags["medsynth.audit.evaluate_run_id"] == pipeline.runs["evaluate"].info.run_id
    assert version.tags["medsynth.audit.metrics_sha256"] == file_sha256(metrics)
    assert body["provenance"]["checkpoint"]["registered_model"] == f"models:/{MODEL}/1"
    assert (AUDITED_ALIAS in version.aliases) == (verdict == "pass")

    mark_audit(MODEL, "1", passed=True, evaluate_run_id="e" * 32, metrics_sha256="0" * 64, tracking_uri=pipeline.uri)
    assert str(client.get_model_version_by_alias(MODEL, AUDITED_ALIAS).version) == "1"
    assert audit_status(MODEL, "1", tracking_uri=pipeline.uri).passed
    mark_audit(MODEL, "1", passed=False, evaluate_run_id="f" * 32, metrics_sha256="1" * 64, tracking_uri=pipeline.uri)
    status = audit_status(MODEL, "1", tracking_uri=pipeline.uri)
    assert status.verdict == "fail" and status.evaluate_run_id == "f" * 32
    assert AUDITED_ALIAS not in client.get_registered_model(MODEL).aliases


def test_require_audited_refuses_an_unaudited_version(pipeline: SimpleNamespace, caplog: pytest.LogCaptureFixture) -> None:
    """generate from models:/ says whether the version passed an audit; generate.require_audited=true refuses
    anything but a PASS, and a version marked PASS (alias audited) is accepted."""
    client, out = pipeline.client, pipeline.out
    uri = log_generator(out / "checkpoints" / "last.pt", run_id=pipeline.runs["train"].info.run_id,
                        tracking_uri=pipeline.uri, registered_name=MODEL, artifact_path="generator-again")
    assert uri == f"models:/{MODEL}/2" and audit_status(MODEL, "2", tracking_uri=pipeline.uri).verdict == ""
    small = ["generate.num_samples=2", "generate.batch_size=2"]
    with pytest.raises(MedsynthError, match=f"generate.require_audited=true, but models:/{MODEL}/2 has no audit"):
        run_stage("generate", pipeline.make(*small, f"generate.checkpoint={uri}", "generate.require_audited=true",
                                            f"paths.synthetic={pipeline.root / 'refused'}"))
    assert not (pipeline.root / "refused" / "manifest.csv").exists()
    unregistered = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    unregistered["step"] = 42  # same train run, other bytes: no registered version holds it
    torch.save(unregistered, pipeline.root / "unregistered.pt")
    with pytest.raises(MedsynthError, match="unregistered.pt is not a registered model version"):
        run_stage("generate", pipeline.make(*small, f"generate.checkpoint={pipeline.root / 'unregistered.pt'}",
                                            "generate.require_audited=true", f"paths.synthetic={pipeline.root / 'refused'}"))

    # without the setting, generate says what it found and goes on
    with caplog.at_level("INFO", logger="medsynth"):
        run_stage("generate", pipeline.make(*small, f"generate.checkpoint={uri}", f"paths.synthetic={pipeline.root / 'said'}"))
    assert f"models:/{MODEL}/2 has no audit" in caplog.text
    generate_run = json.loads((pipeline.root / "said" / "generate.json").read_text())["run_id"]
    assert client.get_run(generate_run).data.params["registered_audit"] == "none"

    mark_audit(MODEL, "2", passed=True, evaluate_run_id="a" * 32, metrics_sha256="b" * 64, tracking_uri=pipeline.uri)
    manifest = run_stage("generate", pipeline.make(*small, f"generate.checkpoint=models:/{MODEL}@{AUDITED_ALIAS}",
                                                   "generate.require_audited=true", f"paths.synthetic={pipeline.root / 'ok'}"))
    generate_run = json.loads(Path(manifest).with_name("generate.json").read_text())["run_id"]
    assert client.get_run(generate_run).data.params["registered_audit"] == "pass"

    # evaluating that set marks version 2 (named through the alias in the manifest)
    run_stage("evaluate", pipeline.make(f"paths.synthetic={pipeline.root / 'ok'}", f"paths.evaluation={pipeline.root / 'ok-eval'}"))
    status = audit_status(MODEL, "2", tracking_uri=pipeline.uri)
    assert status.evaluate_run_id != "a" * 32 and len(status.evaluate_run_id) == 32
    assert status.metrics_sha256 == file_sha256(pipeline.root / "ok-eval" / "metrics.json")
