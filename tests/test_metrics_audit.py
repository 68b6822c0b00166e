"""Tests for the distribution, memorisation and membership metrics on constructed cases with known answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from medsynth.metrics.distribution import (
    frechet_distance,
    gaussian_mmd,
    histogram_distance,
    kernel_inception_distance,
    label_intensity_stats,
)
from medsynth.metrics.membership import roc_auc, tpr_at_fpr
from medsynth.metrics.memorisation import dice_to_nearest_label_map, max_normalised_correlation


def _features(seed: int = 0, n: int = 200, d: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mixing + 0.5


# --- frechet_distance ---------------------------------------------------------------------


def test_frechet_identical_sets_is_zero() -> None:
    """A set is 0 from itself (numpy or torch input)."""
    x = _features()
    assert frechet_distance(x, x.copy()) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(torch.from_numpy(x), torch.from_numpy(x)) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("shift", [0.1, 0.5, 2.0])
def test_frechet_mean_shift_is_d_s_squared(shift: float) -> None:
    """Shifting all D features by s (covariance unchanged) gives exactly D * s^2."""
    x = _features(d=8)
    assert frechet_distance(x, x + shift) == pytest.approx(8 * shift**2, rel=1e-6, abs=1e-8)


def test_frechet_scaled_copy_closed_form() -> None:
    """y = 2x has mean 2mu and covariance 4S, so FD = |mu|^2 + tr(S + 4S - 2*2S) = |mu|^2 + tr(S)."""
    x = _features(seed=1, d=5)
    expected = float(x.mean(axis=0) @ x.mean(axis=0) + np.trace(np.cov(x, rowvar=False)))
    assert frechet_distance(x, 2 * x) == pytest.approx(expected, rel=1e-6)


def test_frechet_rank_deficient_covariance_is_finite() -> None:
    """Fewer samples than dimensions (singular covariance) still gives a finite, non-negative value."""
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((6, 10)), rng.standard_normal((6, 10)) + 1.0
    value = frechet_distance(x, y)
    assert np.isfinite(value) and value > 5.0  # mean shift alone contributes about 10


# --- kernel_inception_distance ------------------------------------------------------------


def _kid_brute_force(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], x.shape[0]
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_brute_force_on_full_sets() -> None:
    """Subsets as large as the sets are the whole sets: the value is the pairwise-loop formula, std 0."""
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((7, 3)) + 0.3
    mean, std = kernel_inception_distance(x, y, subset_size=100, num_subsets=3)
    assert mean == pytest.approx(_kid_brute_force(x, y), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_same_distribution_near_zero_and_ranks_noise_worse() -> None:
    """Same-distribution sets are ~0; a slightly perturbed copy beats a set of unrelated noise."""
    real = _features(seed=4, n=300)
    same = _features(seed=4, n=600)[300:]  # fresh draw with the same mixing matrix
    perturbed = real + 0.05 * np.random.default_rng(5).standard_normal(real.shape)
    noise = np.random.default_rng(6).standard_normal(real.shape) * 2.0
    kw = {"subset_size": 100, "num_subsets": 10}
    identical, _ = kernel_inception_distance(real, real, **kw)
    same_dist, _ = kernel_inception_distance(real, same, **kw)
    near, _ = kernel_inception_distance(real, perturbed, **kw)
    far, _ = kernel_inception_distance(real, noise, **kw)
    shifted, _ = kernel_inception_distance(real, real + 1.0, **kw)
    # The unbiased estimate of identical sets is slightly negative (about -2 (mean k(x, x) - mean k(x, x')) / m).
    assert max(abs(identical), abs(same_dist), abs(near)) < 0.2
    assert far > 2.0 and shifted > 2.0
    assert far > 20 * max(abs(near), abs(same_dist))


def test_kid_seed_is_deterministic_and_subsets_vary() -> None:
    """The same seed gives the same result; subsets smaller than the sets give a non-zero spread."""
    x, y = _features(seed=7, n=60), _features(seed=8, n=40)
    a = kernel_inception_distance(x, y, subset_size=20, num_subsets=5, seed=1)
    b = kernel_inception_distance(x, y, subset_size=20, num_subsets=5, seed=1)
    assert a == b
    assert a[1] > 0.0


# --- gaussian_mmd -------------------------------------------------------------------------


def test_gaussian_mmd_identical_zero_shift_positive() -> None:
    """Identical sets give 0; a shifted set gives a clearly positive value; unequal set sizes are fine."""
    x = _features(seed=9, n=120)
    assert gaussian_mmd(x, x.copy()) == pytest.approx(0.0, abs=1e-10)
    assert gaussian_mmd(x, x[:50] + 1.0) > 0.1


def test_gaussian_mmd_ranks_noise_worse_than_perturbed_copy() -> None:
    """A slightly perturbed copy is much closer than unrelated noise."""
    real = _features(seed=10, n=150)
    perturbed = real + 0.05 * np.random.default_rng(11).standard_normal(real.shape)
    noise = np.random.default_rng(12).standard_normal(real.shape) * 2.0
    near, far = gaussian_mmd(real, perturbed), gaussian_mmd(real, noise)
    assert near < 0.01
    assert far > 10 * near and far > 0.05


def test_gaussian_mmd_matches_brute_force_with_given_bandwidth() -> None:
    """The biased estimate equals the explicit pairwise sums."""
    rng = np.random.default_rng(13)
    x, y, sigma = rng.standard_normal((5, 3)), rng.standard_normal((4, 3)) + 0.5, 0.8
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * sigma**2))  # noqa: E731
    mean_k = lambda a, b: np.mean([k(p, q) for p in a for q in b])  # noqa: E731
    expected = mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y)
    assert gaussian_mmd(x, y, bandwidth=sigma) == pytest.approx(expected, rel=1e-9)


def test_gaussian_mmd_median_heuristic() -> None:
    """With no bandwidth the median pairwise distance of the pooled set is used."""
    rng = np.random.default_rng(14)
    x, y = rng.standard_normal((6, 2)), rng.standard_normal((5, 2))
    pooled = np.concatenate([x, y])
    dists = [np.linalg.norm(a - b) for a, b in itertools.combinations(pooled, 2)]
    assert gaussian_mmd(x, y) == pytest.approx(gaussian_mmd(x, y, bandwidth=float(np.median(dists))), rel=1e-9)


# --- histogram_distance -------------------------------------------------------------------


def test_histogram_identical_disjoint_and_hand_case() -> None:
    """0 for identical values, 1 for disjoint ranges, and the hand-computed intersection for a 2-bin case."""
    values = np.random.default_rng(15).random((3, 16, 16))
    assert histogram_distance(values, values.copy()) == pytest.approx(0.0, abs=1e-12)
    assert histogram_distance(values * 0.4, 0.6 + values * 0.4) == pytest.approx(1.0)
    # p = [0.5, 0.5], q = [0.25, 0.75]: 1 - (0.25 + 0.5) = 0.25
    real, synthetic = np.array([0.1, 0.1, 0.9, 0.9]), torch.tensor([0.1, 0.9, 0.9, 0.9])
    assert histogram_distance(real, synthetic, bins=2) == pytest.approx(0.25)


def test_histogram_shift_grows_and_out_of_range_is_clipped() -> None:
    """A larger intensity shift gives a larger distance; values beyond the range land in the edge bins."""
    values = np.random.default_rng(16).random(5000) * 0.5
    small, large = histogram_distance(values, values + 0.05), histogram_distance(values, values + 0.3)
    assert 0.05 < small < large
    assert histogram_distance(np.array([1.5, -0.2]), np.array([1.0, 0.0]), bins=4) == pytest.approx(0.0)


# --- label_intensity_stats ----------------------------------------------------------------


def test_label_intensity_stats_known_values() -> None:
    """Intensities 0..100 give the known percentiles; background and absent labels are left out."""
    images = np.concatenate([np.arange(101, dtype=np.float64), np.full(20, 7.0)])[None]
    labels = np.concatenate([np.ones(101, dtype=np.int64), np.full(20, 2)])[None]
    labels_with_background = np.concatenate([labels, np.zeros_like(labels)], axis=1)
    images_with_background = np.concatenate([images, np.full_like(images, 999.0)], axis=1)
    names = ["bg", "grey", "white", "csf"]
    out = label_intensity_stats(images_with_background, labels_with_background, label_names=names)
    assert set(out) == {"grey", "white"}
    grey = out["grey"]
    assert grey["mean"] == pytest.approx(50.0)
    assert grey["std"] == pytest.approx(np.arange(101).std())
    assert (grey["p05"], grey["p50"], grey["p95"]) == pytest.approx((5.0, 50.0, 95.0))
    assert out["white"] == pytest.approx({"mean": 7.0, "std": 0.0, "p05": 7.0, "p50": 7.0, "p95": 7.0})


# --- max_normalised_correlation -----------------------------------------------------------


def test_correlation_finds_copies_and_affine_copies() -> None:
    """Copies (also a*x + b) score ~1 with the right index; independent noise scores low."""
    rng = np.random.default_rng(17)
    references = rng.random((10, 1, 16, 16)).astype(np.float32)
    noise = rng.random((3, 1, 16, 16)).astype(np.float32)
    queries = np.concatenate([references[3:4], 0.5 * references[7:8] + 0.2, 3.0 * references[1:2] - 1.0, noise])
    corr, index = max_normalised_correlation(queries, torch.from_numpy(references), chunk=2)
    assert corr[:3] == pytest.approx(1.0, abs=1e-5)
    assert list(index[:3]) == [3, 7, 1]
    assert (corr[3:] < 0.4).all()


def test_correlation_matches_corrcoef_and_is_chunk_independent() -> None:
    """Values equal numpy's Pearson correlation, whatever the chunk size."""
    rng = np.random.default_rng(18)
    queries, references = rng.standard_normal((5, 30)), rng.standard_normal((4, 30))
    full = np.corrcoef(queries, references)[:5, 5:]
    corr, index = max_normalised_correlation(queries, references, chunk=256)
    corr1, index1 = max_normalised_correlation(queries, references, chunk=1)
    np.testing.assert_allclose(corr, full.max(axis=1), atol=1e-5)
    np.testing.assert_array_equal(index, full.argmax(axis=1))
    np.testing.assert_array_equal(index1, index)
    np.testing.assert_allclose(corr1, corr, atol=1e-6)


def test_correlation_constant_images_are_zero_not_nan() -> None:
    """Constant queries or references have correlation 0 rather than NaN."""
    rng = np.random.default_rng(19)
    references = np.concatenate([np.full((1, 8, 8), 0.3), rng.random((2, 8, 8))]).astype(np.float32)
    queries = np.concatenate([np.full((1, 8, 8), 0.3), np.full((1, 8, 8), 0.7), references[2:3]]).astype(np.float32)
    corr, index = max_normalised_correlation(queries, references)
    assert not np.isnan(corr).any()
    assert corr[:2] == pytest.approx(0.0, abs=1e-7)
    assert corr[2] == pytest.approx(1.0, abs=1e-5) and index[2] == 2


# --- dice_to_nearest_label_map ------------------------------------------------------------


def _dice_brute_force(q: np.ndarray, r: np.ndarray, num_classes: int) -> float:
    scores = []
    for c in range(1, num_classes):
        a, b = q == c, r == c
        if a.sum() + b.sum():
            scores.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    return float(np.mean(scores)) if scores else 1.0


def test_dice_hand_computed_case() -> None:
    """Small maps with hand-computed mean foreground Dice."""
    query = np.array([[1, 1, 2, 0, 0, 0]])
    references = np.array(
        [
            [0, 0, 0, 0, 0, 0],  # no foreground: both classes 0
            [1, 0, 2, 2, 0, 0],  # class 1: 2*1/(2+1), class 2: 2*1/(1+2) -> 2/3
            [0, 0, 0, 0, 1, 2],  # no overlap -> 0
        ]
    )
    dice, index = dice_to_nearest_label_map(query, references, num_classes=3)
    assert dice[0] == pytest.approx(2 / 3, abs=1e-6) and index[0] == 1
    # class 2 absent from the reference but present in the query counts as 0: (1 + 0) / 2
    dice, _ = dice_to_nearest_label_map(query, np.array([[1, 1, 0, 0, 0, 0]]), num_classes=3)
    assert dice[0] == pytest.approx(0.5, abs=1e-6)
    # class 2 absent from both is skipped: only class 1 counts
    dice, _ = dice_to_nearest_label_map(np.array([[1, 1, 0, 0, 0, 0]]), np.array([[1, 0, 0, 0, 0, 0]]), num_classes=3)
    assert dice[0] == pytest.approx(2 / 3, abs=1e-6)


def test_dice_copy_scores_one_and_matches_brute_force() -> None:
    """A copied label map scores 1 at its index; random maps match the pairwise formula, whatever the chunk."""
    rng = np.random.default_rng(20)
    references = rng.integers(0, 4, (6, 1, 5, 5))
    queries = np.concatenate([references[4:5], rng.integers(0, 4, (3, 1, 5, 5))])
    dice, index = dice_to_nearest_label_map(queries, torch.from_numpy(references), num_classes=4, chunk=2)
    assert dice[0] == pytest.approx(1.0) and index[0] == 4
    for i, q in enumerate(queries):
        expected = [_dice_brute_force(q, r, 4) for r in references]
        assert dice[i] == pytest.approx(max(expected), abs=1e-6)
        assert index[i] == int(np.argmax(expected))
    assert (dice[1:] < 0.6).all()


def test_dice_rejects_out_of_range_labels() -> None:
    """Label values beyond num_classes are an error, not silently ignored."""
    with pytest.raises(ValueError):
        dice_to_nearest_label_map(np.array([[0, 3]]), np.array([[0, 1]]), num_classes=3)


# --- roc_auc ------------------------------------------------------------------------------


def test_auc_separated_and_reversed() -> None:
    """Perfectly separated scores give 1 (members higher) or 0 (members lower); all ties give 0.5."""
    assert roc_auc(np.array([5.0, 6.0, 7.0]), np.array([1.0, 2.0])) == pytest.approx(1.0)
    assert roc_auc(torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0, 7.0])) == pytest.approx(0.0)
    assert roc_auc(np.ones(4), np.ones(3)) == pytest.approx(0.5)


def test_auc_same_distribution_is_half() -> None:
    """Scores from the same distribution give about 0.5."""
    rng = np.random.default_rng(21)
    assert roc_auc(rng.standard_normal(5000), rng.standard_normal(5000)) == pytest.approx(0.5, abs=0.02)


def test_auc_matches_pairwise_count_with_ties() -> None:
    """Equals the brute-force fraction of (member, non-member) pairs ordered correctly, ties counting half."""
    rng = np.random.default_rng(22)
    members, nonmembers = rng.integers(0, 6, 17).astype(float), rng.integers(0, 6, 11).astype(float)
    pairs = [(m > n) + 0.5 * (m == n) for m in members for n in nonmembers]
    assert roc_auc(members, nonmembers) == pytest.approx(np.mean(pairs), rel=1e-12)


# --- tpr_at_fpr ---------------------------------------------------------------------------


@pytest.mark.parametrize(("fpr", "expected"), [(0.0, 0.25), (0.1, 0.5), (0.25, 0.75), (1.0, 1.0)])
def test_tpr_at_fpr_hand_case(fpr: float, expected: float) -> None:
    """Non-members 0..9: fpr 0.1 allows one above the threshold (9), so the threshold is 8, and so on."""
    nonmembers = np.arange(10, dtype=float)
    members = np.array([8.0, 8.5, 9.5, 2.0])  # 8.0 ties the fpr=0.1 threshold and is not flagged
    assert tpr_at_fpr(members, nonmembers, fpr=fpr) == pytest.approx(expected)


def test_tpr_at_fpr_chance_and_perfect_attack() -> None:
    """A useless attack gives about fpr; a perfectly separating one gives 1."""
    rng = np.random.default_rng(23)
    assert tpr_at_fpr(rng.standard_normal(20000), rng.standard_normal(20000), fpr=0.1) == pytest.approx(0.1, abs=0.015)
    assert tpr_at_fpr(np.array([3.0, 4.0]), np.array([0.0, 1.0, 2.0]), fpr=0.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        tpr_at_fpr(np.array([1.0]), np.array([0.0]), fpr=1.5)


def test_dice_per_class_pooled_over_the_set() -> None:
    from medsynth.metrics.segmentation import dice_per_class, mean_dice

    target = np.array([[[1, 1, 0, 2]], [[0, 0, 0, 0]]])
    prediction = np.array([[[1, 0, 0, 2]], [[0, 0, 0, 1]]])
    # class 1: |P & T| = 1, |P| = 2, |T| = 2 -> 0.5; class 2: 1.0; class 3 absent -> NaN
    values = dice_per_class(prediction, target, num_classes=4)
    np.testing.assert_allclose(values[:2], [0.5, 1.0])
    assert np.isnan(values[2])
    assert mean_dice(prediction, target, num_classes=4) == pytest.approx(0.75)


def test_orthogonal_slices_cut_every_axis() -> None:
    from medsynth.metrics.realism import orthogonal_slices

    volumes = np.arange(2 * 1 * 3 * 4 * 5, dtype=np.float32).reshape(2, 1, 3, 4, 5)
    cuts = orthogonal_slices(volumes)
    assert cuts["sagittal"].shape == (6, 1, 4, 5)
    assert cuts["coronal"].shape == (8, 1, 3, 5)
    assert cuts["axial"].shape == (10, 1, 3, 4)
    np.testing.assert_array_equal(cuts["axial"][1], volumes[0, :, :, :, 1])
    with pytest.raises(ValueError):
        orthogonal_slices(volumes[0])


# --- the per-sample privacy rules ---------------------------------------------------------


def test_rules_are_calibrated_on_the_holdout_and_flag_about_the_quantile() -> None:
    """Thresholds are holdout quantiles; the holdout's own flags (the audit's reference) follow from them."""
    from medsynth.config.settings import PrivacySettings
    from medsynth.evaluation.rules import calibrate_rules

    rng = np.random.default_rng(24)
    train, holdout = rng.random((60, 1, 8, 8)).astype(np.float32), rng.random((101, 1, 8, 8)).astype(np.float32)
    train_f, holdout_f = rng.standard_normal((60, 5)), rng.standard_normal((101, 5))
    rules = calibrate_rules(train, holdout, privacy=PrivacySettings(holdout_quantile=0.1), train_features=train_f,
                            holdout_features=holdout_f)
    ref = rules.holdout
    assert rules.pixel_threshold == pytest.approx(np.quantile(ref.distance, 0.1))
    assert rules.feature_threshold == pytest.approx(np.quantile(ref.feature, 0.1))
    assert ref.pixel_too_close.sum() == ref.feature_too_close.sum() == 10  # 101 values: the 10 strictly below the 11th
    np.testing.assert_array_equal(ref.memorised, ref.correlation > 0.95)
    np.testing.assert_array_equal(ref.violations, ref.memorised | ref.pixel_too_close | ref.feature_too_close)
    assert ref.counts()["any"] == int(ref.violations.sum())
    # without the feature rule, features are still measured (for the figures) but flag nothing
    off = calibrate_rules(train, holdout, privacy=PrivacySettings(holdout_quantile=0.1, features=False),
                          train_features=train_f, holdout_features=holdout_f)
    assert off.feature_threshold is None and off.holdout.feature is not None and not off.holdout.feature_too_close.any()


def test_the_gate_margin_is_stricter_than_the_audit() -> None:
    """A sample exactly at a threshold passes the audit's strict rule and is rejected with the gate's margin."""
    from medsynth.config.settings import PrivacySettings
    from medsynth.evaluation.gate import GATE_MARGIN
    from medsynth.evaluation.rules import calibrate_rules

    rng = np.random.default_rng(25)
    train, holdout = rng.random((40, 1, 8, 8)).astype(np.float32), rng.random((101, 1, 8, 8)).astype(np.float32)
    rules = calibrate_rules(train, holdout, privacy=PrivacySettings(holdout_quantile=0.01))
    at = int(np.argsort(rules.holdout.distance)[1])  # 101 values, quantile 0.01: the threshold is the 2nd smallest
    assert rules.holdout.distance[at] == rules.pixel_threshold
    assert not rules.measure(holdout[at : at + 1]).pixel_too_close[0]
    assert rules.measure(holdout[at : at + 1], margin=GATE_MARGIN).pixel_too_close[0]
