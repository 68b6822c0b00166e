"""The privacy gate of generation: thresholds from the holdout, copies rejected, fresh images accepted, 2D and 3D;
the gate and the audit apply one set of per-sample rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medsynth import ConfigError, MedsynthError
from medsynth.config.settings import PrivacySettings
from medsynth.evaluation.gate import PrivacyGate, build_privacy_gate
from medsynth.metrics.realism import orthogonal_slices
from medsynth.training.encoder import FeatureEncoder, encode
from tests.test_evaluation import blobs


def encoder_2d() -> FeatureEncoder:
    """An untrained but fixed 2D encoder: enough to map copies to (nearly) the same features."""
    torch.manual_seed(0)
    return FeatureEncoder(spatial_dims=2, channels=(8, 16)).eval()


def blob_volumes(n: int, *, seed: int, size: int = 8) -> np.ndarray:
    """``(n, 1, size, size, size)`` volumes of a random ball with texture, in [0, 1]."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:size, :size, :size]
    out = np.zeros((n, 1, size, size, size), np.float32)
    for i in range(n):
        c, r = rng.integers(2, size - 2, 3), rng.integers(1, 3)
        ball = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
        out[i, 0] = np.clip(0.5 * ball + 0.1 * rng.random((size, size, size)), 0, 1)
    return out


def brute_rms(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Nearest-reference RMS distance, pair by pair."""
    q, r = queries.reshape(len(queries), -1).astype(np.float64), references.reshape(len(references), -1).astype(np.float64)
    return np.array([np.sqrt(((r - row) ** 2).mean(axis=1)).min() for row in q])


def brute_correlation(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Highest Pearson correlation with any reference, pair by pair."""
    q, r = queries.reshape(len(queries), -1).astype(np.float64), references.reshape(len(references), -1).astype(np.float64)
    return np.array([max(np.corrcoef(row, ref)[0, 1] for ref in r) for row in q])


@pytest.fixture(scope="module")
def data_2d() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, holdout and fresh images from one distribution."""
    return blobs(120, seed=1)[0], blobs(100, seed=2)[0], blobs(300, seed=3)[0]


def test_thresholds_are_the_holdout_quantiles(data_2d: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """The pixel and feature thresholds are the stated quantile of the holdout-to-train nearest distances."""
    train, holdout, _ = data_2d
    encoder = encoder_2d()
    gate = build_privacy_gate(train, holdout, encoder=encoder, privacy=PrivacySettings(holdout_quantile=0.05))
    assert gate.pixel_threshold == pytest.approx(np.quantile(brute_rms(holdout, train), 0.05), abs=2e-4)
    feature_train = encode(encoder, torch.from_numpy(train)).numpy()
    feature_holdout = encode(encoder, torch.from_numpy(holdout)).numpy()
    assert gate.feature_threshold == pytest.approx(np.quantile(brute_rms(feature_holdout, feature_train), 0.05), rel=1e-3)
    described = gate.describe()
    assert described["quantile"] == 0.05 and described["num_references"] == 120 and described["num_holdout"] == 100
    assert described["pixel_threshold"] == gate.pixel_threshold and described["feature_space"] == "2d"
    assert "0.05" in described["method"]


def test_correlation_threshold_is_the_upper_quantile(data_2d: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """With correlation, "closer" is higher: the threshold is the 1 - quantile of holdout correlations."""
    train, holdout, _ = data_2d
    gate = build_privacy_gate(train[:40], holdout[:30], encoder=None,
                              privacy=PrivacySettings(holdout_quantile=0.1, metric="correlation"))
    assert gate.pixel_threshold == pytest.approx(np.quantile(brute_correlation(holdout[:30], train[:40]), 0.9), abs=1e-5)
    brighter = np.clip(0.8 * train[:5] + 0.1, 0, 1)  # an intensity-changed copy: correlation ~1
    result = gate.check(brighter)
    assert not result.accepted.any() and (result.pixel > gate.pixel_threshold).all()
    np.testing.assert_array_equal(result.pixel_index, np.arange(5))


def test_copies_and_noisy_copies_are_rejected(data_2d: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Exact and lightly noised copies of training images fail; the nearest index names the copied record."""
    train, holdout, _ = data_2d
    gate = build_privacy_gate(train, holdout, encoder=encoder_2d())
    picks = np.array([0, 7, 42, 99])
    noise = np.random.default_rng(0).normal(0.0, 0.02, train[picks].shape).astype(np.float32)
    for candidates in (train[picks], np.clip(train[picks] + noise, 0, 1)):
        result = gate.check(torch.from_numpy(candidates))
        assert result.num_rejected == len(picks)
        assert result.pixel_too_close.all()
        np.testing.assert_array_equal(result.pixel_index, picks)
        np.testing.assert_array_equal(result.feature_index, picks)
    assert gate.check(train[picks]).feature_too_close.all()


def test_fresh_images_are_mostly_accepted(data_2d: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Images from the holdout's distribution pass at about 1 - quantile per space."""
    train, holdout, fresh = data_2d
    quantile = 0.05
    privacy = PrivacySettings(holdout_quantile=quantile)
    pixel_only = build_privacy_gate(train, holdout, encoder=None, privacy=privacy).check(fresh)
    assert 1 - quantile - 0.07 <= pixel_only.accepted.mean() <= 1.0
    both = build_privacy_gate(train, holdout, encoder=encoder_2d(), privacy=privacy).check(fresh)
    assert 1 - 2 * quantile - 0.07 <= both.accepted.mean() <= pixel_only.accepted.mean()
    np.testing.assert_array_equal(both.accepted, ~(both.memorised | both.pixel_too_close | both.feature_too_close))
    assert not both.memorised.any()  # fresh blobs never correlate above 0.95 with a training blob


def test_without_encoder_only_pixel_space_is_used(data_2d: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    train, holdout, fresh = data_2d
    gate = build_privacy_gate(train, holdout, encoder=None)
    assert gate.feature_threshold is None and gate.reference_features is None and gate.feature_space == "none"
    result = gate.check(fresh[:10])
    assert result.feature is None and result.feature_index is None and not result.feature_too_close.any()
    np.testing.assert_array_equal(result.accepted, ~(result.pixel_too_close | result.memorised))
    assert gate.describe()["feature_threshold"] is None


@pytest.mark.parametrize("encoder_dims", [2, 3])
def test_volumes(encoder_dims: int) -> None:
    """3D: a 2D encoder gives the evaluation's 2.5D features, a 3D encoder whole-volume ones; copies fail, fresh pass."""
    train, holdout, fresh = blob_volumes(60, seed=1), blob_volumes(60, seed=2), blob_volumes(60, seed=3)
    torch.manual_seed(0)
    encoder = FeatureEncoder(spatial_dims=encoder_dims, channels=(8, 16)).eval()
    gate = build_privacy_gate(torch.from_numpy(train), torch.from_numpy(holdout), encoder=encoder,
                              privacy=PrivacySettings(holdout_quantile=0.05))
    assert gate.feature_space == ("2.5d" if encoder_dims == 2 else "3d")
    if encoder_dims == 2:
        # 2.5D by hand: each plane's slices encoded, averaged per volume, the planes concatenated
        planes = [encode(encoder, torch.from_numpy(cut)).numpy().reshape(60, 8, 16).mean(axis=1)
                  for cut in orthogonal_slices(train).values()]
        np.testing.assert_allclose(gate.reference_features, np.concatenate(planes, axis=1), rtol=1e-5, atol=1e-6)
        assert gate.reference_features.shape == (60, 3 * 16)
    copies = gate.check(train[:5])
    assert not copies.accepted.any() and copies.feature_too_close.all()
    assert gate.check(fresh).accepted.mean() >= 0.75


def test_options_and_inputs_are_checked(data_2d: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    train, holdout, _ = data_2d
    for quantile in (0.0, -0.1, 0.6):
        with pytest.raises(ConfigError, match="privacy.holdout_quantile"):
            PrivacySettings(holdout_quantile=quantile)
    with pytest.raises(ConfigError, match="privacy.metric"):
        PrivacySettings(metric="l1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="privacy.memorisation_threshold"):
        PrivacySettings(memorisation_threshold=1.5)
    with pytest.raises(MedsynthError, match="holdout split is empty"):
        build_privacy_gate(train, holdout[:0], encoder=None)
    with pytest.raises(MedsynthError, match="training split is empty"):
        build_privacy_gate(train[:0], holdout, encoder=None)
    with pytest.raises(MedsynthError, match="shape"):
        build_privacy_gate(train, holdout[:, :, :8, :8], encoder=None)
    gate: PrivacyGate = build_privacy_gate(train, holdout, encoder=None)
    with pytest.raises(ValueError, match="shape"):
        gate.check(train[:2, :, :8])


def test_encoder_is_moved_and_candidates_may_be_tensors(data_2d: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """``device`` places the encoder; tensor and array candidates give the same answer."""
    train, holdout, fresh = data_2d
    encoder: nn.Module = encoder_2d()
    gate = build_privacy_gate(torch.from_numpy(train), holdout, encoder=encoder, device="cpu")
    a, b = gate.check(fresh[:8]), gate.check(torch.from_numpy(fresh[:8]))
    np.testing.assert_array_equal(a.accepted, b.accepted)
    np.testing.assert_allclose(a.feature, b.feature)


def test_memorised_copies_are_rejected_even_when_far_in_pixel_space(data_2d: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """A contrast-changed copy is far in RMS distance but correlates ~1: the memorisation rule rejects it."""
    train, holdout, _ = data_2d
    gate = build_privacy_gate(train, holdout, encoder=None)
    faded = 0.3 * train[:6] + 0.5
    result = gate.check(faded)
    assert result.memorised.all() and not result.accepted.any()
    assert not result.pixel_too_close.any()  # the distance rule alone would have let them through
    np.testing.assert_array_equal(result.correlation_index, np.arange(6))
    assert gate.rejections == {"memorised": 6, "too_close_pixel": 0, "too_close_feature": 0}
    assert "memorised" in gate.describe()["method"] and gate.describe()["memorisation_threshold"] == 0.95


def test_an_exported_set_meets_the_audits_per_sample_rules() -> None:
    """The gate rejects a near-copy of a training image; the audit of the ungated set counts it, of the gated set nothing."""
    from medsynth.evaluation import AuditSet, privacy_figures
    from medsynth.evaluation.instruments import features
    from medsynth.evaluation.rules import calibrate_rules

    (train, train_labels), (holdout, holdout_labels) = blobs(120, seed=1), blobs(100, seed=2)
    fresh, fresh_labels = blobs(40, seed=3)
    near_copy = np.clip(0.7 * train[3:4] + 0.15 + np.random.default_rng(0).normal(0, 0.01, train[3:4].shape), 0, 1)
    candidates = np.concatenate([fresh, near_copy]).astype(np.float32)
    labels = np.concatenate([fresh_labels, train_labels[3:4]])
    encoder, privacy = encoder_2d(), PrivacySettings(holdout_quantile=0.05)

    gate = build_privacy_gate(train, holdout, encoder=encoder, privacy=privacy)
    check = gate.check(candidates[:16])  # the gate sees candidates batch by batch
    check = [check, gate.check(candidates[16:])]
    accepted = np.concatenate([c.accepted for c in check])
    assert not accepted[-1] and check[1].memorised[-1] and 0 < accepted[:-1].mean() < 1

    # the audit, as evaluate does it: features of each whole set, rules calibrated from them
    train_features, holdout_features = features(encoder, train).items, features(encoder, holdout).items
    rules = calibrate_rules(train, holdout, privacy=privacy, encoder=encoder, train_features=train_features,
                            holdout_features=holdout_features)
    assert (rules.pixel_threshold, rules.feature_threshold) == (gate.pixel_threshold, gate.feature_threshold)

    def audit(images: np.ndarray, maps: np.ndarray) -> dict[str, float]:
        figures, _, _ = privacy_figures(
            AuditSet(train, train_labels, train_features), AuditSet(holdout, holdout_labels, holdout_features),
            AuditSet(images, maps, features(encoder, images).items), num_classes=3, member_errors=None,
            nonmember_errors=None, rules=rules)
        return {f.name: f.value for f in figures}

    ungated = audit(candidates, labels)
    assert ungated["privacy/memorised_count"] == 1 and ungated["privacy/rule_violations_count"] == (~accepted).sum()
    gated = audit(candidates[accepted], labels[accepted])
    for name in ("rule_violations_count", "memorised_count", "too_close_count_pixel", "too_close_count_feature"):
        assert gated[f"privacy/{name}"] == 0, name
    preview = gate.preview(candidates[accepted])
    assert preview["rule_violations_count"] == 0
    for space in ("pixel", "feature"):
        name = f"closer_to_train_fraction_{space}"
        assert preview[name] == pytest.approx(gated[f"privacy/{name}"])
