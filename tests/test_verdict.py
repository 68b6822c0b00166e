"""The verdict: privacy, realism and utility judged separately, each against its real-data reference;
noise fails, real unseen images pass the realism and utility floors, a 2-step model's audit fails on realism."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth import ConfigError
from medsynth.config.settings import EvaluateSettings
from medsynth.data import LabelledArrays, load_split, read_manifest
from medsynth.evaluation.audit import AuditSet, realism_figures, utility_figures
from medsynth.evaluation.figures import GROUPS, Figure, Verdict, judge, verdict
from medsynth.evaluation.instruments import features, holdout_dice
from medsynth.evaluation.report import render_report
from medsynth.training.encoder import train_encoder
from medsynth.training.segmenter import segment, train_segmenter
from tests.conftest import TINY, compose_config, run_stage

LABEL_NAMES = ["background", "other_brain", "grey_matter", "white_matter"]
LIMITS = EvaluateSettings().limit_table()  # the shipped defaults (conf/evaluate/default.yaml mirrors them)


def test_the_shipped_limits_are_the_defaults() -> None:
    """conf/evaluate/default.yaml holds the same limits as the settings' defaults, one group each at least."""
    limits = compose_config([]).evaluate.limit_table()
    assert limits == LIMITS
    assert {name.split("/", 1)[0] for name in limits} == set(GROUPS)
    assert limits["realism/fid_features_ratio"] == {"max": 4.0}
    assert limits["realism/label_consistency_dice_ratio"] == {"min": 0.7}
    assert limits["utility/dice_synthetic_only_ratio"] == {"min": 0.5}
    assert limits["privacy/rule_violations_count"] == {"max": 0}


def test_groups_are_judged_separately() -> None:
    figures = [Figure("privacy/memorised_count", 2.0, "lower", ""), Figure("realism/fid_features_ratio", 1.5, "lower", ""),
               Figure("utility/dice_synthetic_only_ratio", float("nan"), "higher", "", note="reference too weak")]
    limits = {"privacy/memorised_count": {"max": 0}, "realism/fid_features_ratio": {"max": 4.0},
              "utility/dice_synthetic_only_ratio": {"min": 0.5}, "realism/label_consistency_dice_ratio": {"min": 0.7}}
    result = judge(figures, limits)
    assert not result.passed and result.failed_groups == ["privacy", "realism", "utility"]
    assert result.groups["privacy"].reasons == ["privacy/memorised_count = 2 is above the limit 0"]
    assert result.groups["realism"].reasons == ["realism/label_consistency_dice_ratio was not computed"]
    assert result.groups["utility"].reasons == ["utility/dice_synthetic_only_ratio was not computed (reference too weak)"]
    assert result.summary().startswith("FAIL (privacy, realism, utility): privacy/memorised_count = 2")
    body = result.as_json()
    assert body["passed"] is False and body["failed_groups"] == ["privacy", "realism", "utility"]
    assert body["limits"] == limits and len(body["reasons"]) == 3  # what readers before the groups used
    assert body["realism"] == {"passed": False, "reasons": ["realism/label_consistency_dice_ratio was not computed"],
                               "limits": {"realism/fid_features_ratio": {"max": 4.0},
                                          "realism/label_consistency_dice_ratio": {"min": 0.7}}}
    # one group alone
    only = judge(figures[:2], {"privacy/memorised_count": {"max": 5}, "realism/fid_features_ratio": {"max": 1.0}})
    assert only.failed_groups == ["realism"] and only.groups["privacy"].passed and only.groups["utility"].passed
    assert only.summary() == "FAIL (realism): realism/fid_features_ratio = 1.5 is above the limit 1.0"
    assert verdict(figures[:2], {"realism/fid_features_ratio": {"max": 2.0}}) == (True, [])
    assert judge(figures, {}).summary() == "PASS"
    with pytest.raises(ValueError, match="realsm/x"):
        judge(figures, {"realsm/x": {"max": 1}})


def test_limits_must_name_a_group() -> None:
    with pytest.raises(ConfigError, match=r"evaluate\.limits\.fid_features_ratio"):
        compose_config(["+evaluate.limits.fid_features_ratio={max:4}"])
    with pytest.raises(ConfigError, match="evaluate.min_reference_dice"):
        EvaluateSettings(min_reference_dice=1.5)


def test_ratios_guard_their_references() -> None:
    """A Dice ratio against a useless real segmenter is not computed, with a note; a zero FD reference is floored."""
    weak = {f.name: f for f in utility_figures(dice_real=0.1, dice_synthetic=0.09, dice_both=0.1)}
    ratio = weak["utility/dice_synthetic_only_ratio"]
    assert np.isnan(ratio.value) and "evaluate.min_reference_dice" in ratio.note
    assert "not computed (the real-data segmenter's Dice" in judge(list(weak.values()), LIMITS).groups["utility"].reasons[0]
    fine = {f.name: f.value for f in utility_figures(dice_real=0.8, dice_synthetic=0.6, dice_both=0.82)}
    assert fine["utility/dice_synthetic_only_ratio"] == pytest.approx(0.75)

    # every record alike: the real-vs-real FD is ~0, and the ratio divides by 1% of the feature variance instead
    rng = np.random.default_rng(0)
    images = np.repeat(rng.random((1, 1, 8, 8)).astype(np.float32), 6, axis=0)
    labels = np.zeros((6, 1, 8, 8), np.int64)
    labels[:, :, 2:6, 2:6] = 1
    base = rng.standard_normal((6, 4)).astype(np.float32)
    same = AuditSet(images, labels, base)
    figures = {f.name: f for f in realism_figures(same, same, AuditSet(images, labels, base + 0.1), label_names=["bg", "x"],
                                                  spatial_dims=2, segment=lambda x: labels[: len(x)], max_ssim_pairs=3)}
    variance = float(np.trace(np.cov(base, rowvar=False)))
    assert figures["realism/fid_features"].reference == pytest.approx(0.0, abs=1e-6)
    assert figures["realism/fid_features_ratio"].value == pytest.approx(figures["realism/fid_features"].value
                                                                        / (0.01 * variance), rel=1e-4)


def test_the_report_shows_each_group(tmp_path: Path) -> None:
    figures = utility_figures(dice_real=0.8, dice_synthetic=0.2, dice_both=0.82)
    result: Verdict = judge(figures, {"utility/dice_synthetic_only_ratio": {"min": 0.5}})
    page = render_report(title="audit", figures=figures, passed=result.passed, reasons=result.reasons, pictures={},
                         facts={}, groups=result.groups)
    assert "FAIL (utility): utility/dice_synthetic_only_ratio = 0.25 is below the limit 0.5" in page
    for group in GROUPS:
        assert f"<td><b>{group}</b></td>" in page
    assert page.count("<td>PASS</td>") == 2 and page.count("<td>FAIL</td>") == 1
    assert "dice_synthetic_only_ratio &ge; 0.5" in page


# --- real demo slices ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """MNI152 demo slices (32x32) cut into train / unseen (the validation split) / holdout, with the
    instruments an audit trains on real data: the feature encoder and the real-data segmenter."""
    out = tmp_path_factory.mktemp("verdict")
    cfg = compose_config([*TINY, "data.size=[32,32]", "data.splits.block=4", "data.splits.gap=1",
                          "data.splits.fractions={train:0.4,validation:0.3,holdout:0.3}", f"paths.output={out}",
                          f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}"])
    run_stage("preprocess", cfg)
    manifest = read_manifest(cfg.paths.data)
    splits = {name: load_split(manifest, name) for name in ("train", "validation", "holdout")}
    encoder = train_encoder(splits["train"], spatial_dims=2, channels=(8, 16), steps=40, batch_size=16, seed=0)
    real = train_segmenter(splits["train"], num_classes=4, spatial_dims=2, channels=(8, 16), steps=60, batch_size=16,
                           lr=1e-2, seed=0)
    return {"splits": splits, "encoder": encoder, "real": real}


def audit_groups(demo: dict[str, object], images: np.ndarray) -> Verdict:
    """Realism and utility figures of ``images`` (with the unseen split's label maps) as the audit computes
    them, judged against the shipped limits."""
    splits, encoder, real = demo["splits"], demo["encoder"], demo["real"]
    assert isinstance(splits, dict)
    labels = splits["validation"].labels.numpy()

    def audit_set(x: np.ndarray, maps: np.ndarray) -> AuditSet:
        return AuditSet(x, maps, features(encoder, x).items)  # type: ignore[arg-type]

    train, holdout = splits["train"], splits["holdout"]
    segment_real: Callable[[np.ndarray], np.ndarray] = lambda x: segment(real, torch.as_tensor(x)).numpy()  # noqa: E731
    figures = realism_figures(audit_set(train.images.numpy(), train.labels.numpy()),
                              audit_set(holdout.images.numpy(), holdout.labels.numpy()), audit_set(images, labels),
                              label_names=LABEL_NAMES, spatial_dims=2, segment=segment_real, max_ssim_pairs=50)
    synthetic = LabelledArrays(torch.from_numpy(images), torch.from_numpy(labels), [str(i) for i in range(len(images))], [])
    on_synthetic = train_segmenter(synthetic, num_classes=4, spatial_dims=2, channels=(8, 16), steps=60, batch_size=16,
                                   lr=1e-2, seed=0)
    figures += utility_figures(dice_real=holdout_dice(real, holdout, num_classes=4),  # type: ignore[arg-type]
                               dice_synthetic=holdout_dice(on_synthetic, holdout, num_classes=4), dice_both=float("nan"))
    return judge(figures, {name: bounds for name, bounds in LIMITS.items() if not name.startswith("privacy/")})


def test_real_unseen_images_pass_realism_and_utility(demo: dict[str, object]) -> None:
    splits = demo["splits"]
    assert isinstance(splits, dict)
    result = audit_groups(demo, splits["validation"].images.numpy())
    assert result.groups["realism"].passed and result.groups["utility"].passed, result.reasons
    assert result.passed


@pytest.mark.parametrize("kind", ["noise", "faint"])
def test_noise_and_barely_structured_images_fail_realism(demo: dict[str, object], kind: str) -> None:
    """Uniform noise, or noise with a faint imprint of the label map (what a barely trained model draws)."""
    splits = demo["splits"]
    assert isinstance(splits, dict)
    shape, labels = splits["validation"].images.shape, splits["validation"].labels.numpy()
    noise = np.random.default_rng(1).random(shape).astype(np.float32)
    images = noise if kind == "noise" else np.clip(0.05 * labels + 0.5 * noise, 0, 1).astype(np.float32)
    result = audit_groups(demo, images)
    assert "realism" in result.failed_groups
    assert result.summary().startswith("FAIL (realism")
    realism = " ".join(result.groups["realism"].reasons)
    assert "fid_features_ratio" in realism and "label_consistency_dice_ratio" in realism


@pytest.mark.slow
def test_a_two_step_model_fails_on_realism(tiny_config) -> None:
    """`medsynth run` with a 2-step model: the verdict is FAIL and names realism, in metrics.json, MLflow and the report."""
    from mlflow.tracking import MlflowClient

    cfg = tiny_config("trainer.max_steps=2", "data.size=[32,32]", "data.spacing=[5.6,5.6,3.0]", "encoder.steps=40",
                      "evaluate.segmenter.steps=60", "generate.num_samples=24", "generate.batch_size=12")
    run_id = run_stage("run", cfg)
    out = Path(cfg.paths.evaluation)
    body = json.loads((out / "metrics.json").read_text())
    verdict_body = body["verdict"]
    assert verdict_body["passed"] is False and "realism" in verdict_body["failed_groups"]
    assert verdict_body["realism"]["passed"] is False
    assert any("fid_features_ratio" in r for r in verdict_body["realism"]["reasons"])
    assert body["metrics"]["realism/fid_features_ratio"]["value"] > 4.0
    assert body["metrics"]["privacy/rule_violations_count"]["value"] == 0  # the gate held the per-sample rules
    assert body["privacy_rules"]["memorisation_threshold"] == 0.95
    tags = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).get_run(run_id).data.tags
    assert tags["medsynth.verdict"] == "fail" and tags["medsynth.verdict.realism"] == "fail"
    assert "realism" in tags["medsynth.verdict_failed_groups"].split(",")
    assert "FAIL (" in (out / "report.html").read_text() and "realism" in (out / "report.html").read_text()
