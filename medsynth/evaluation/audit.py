"""The figures of an audit, computed from arrays, features and trained models.

Every figure is read against a reference computed the same way on real data: usually real train
against real holdout, which shows what "as good as real" looks like at this sample size. The
``*_ratio`` figures divide a figure by its reference, so the verdict's realism and utility floors
(``evaluate.limits``) hold for any dataset: noise is many times further from the holdout than the
training images are, and real-looking samples are not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import MMDMetric

from medsynth.config.settings import PrivacySettings
from medsynth.evaluation.figures import Figure
from medsynth.evaluation.rules import PrivacyRules, calibrate_rules
from medsynth.metrics import (
    dice_to_nearest_label_map,
    frechet_distance,
    gaussian_mmd,
    histogram_distance,
    kernel_inception_distance,
    mean_pairwise_ssim,
    roc_auc,
    tissue_intensity_distances,
    tpr_at_fpr,
)
from medsynth.metrics.segmentation import mean_dice

FD_REFERENCE_FLOOR = 0.01
"""The Fréchet-distance ratio divides by at least this share of the holdout features' total
variance, so a near-zero real-vs-real reference (records that all look alike) cannot make every
synthetic set fail."""

MIN_REFERENCE_DICE = 0.3
"""Default of ``evaluate.min_reference_dice``: below this Dice on the real holdout the real-data
segmenter finds too little in real images to judge synthetic ones, so the Dice ratios are not
computed (NaN), and a limit on them fails its group: the audit cannot judge it."""


def _ratio(value: float, reference: float | None, *, floor: float | None = None, minimum: float | None = None) -> float:
    """``value / reference`` with the reference clamped up to ``floor``, or NaN when it is below ``minimum``
    (or missing, NaN, or not positive)."""
    if reference is None or not np.isfinite(reference) or not np.isfinite(value):
        return float("nan")
    if minimum is not None and reference < minimum:
        return float("nan")
    denominator = max(reference, floor) if floor is not None else reference
    return float(value / denominator) if denominator > 0 else float("nan")


def _known(x: float) -> float | None:
    """A reference value, or ``None`` when it could not be computed (NaN)."""
    return None if np.isnan(x) else x


def _dice_ratio(name: str, value: float, reference: float, *, minimum: float, better: str, meaning: str) -> Figure:
    """A Dice over the real segmenter's Dice, with a note when that reference is too weak to judge by."""
    ratio = _ratio(value, reference, minimum=minimum)
    note = ""
    if np.isnan(ratio):
        note = (
            f"the real-data segmenter's Dice on the real holdout is {reference:.3g}, below evaluate.min_reference_dice "
            f"({minimum:g}): too weak to judge by; train it longer (evaluate.segmenter.steps)"
        )
    return Figure(name, ratio, better, meaning, 1.0, True, note)


MIN_SET_SIZE = 2
"""Fewest images (or feature rows) a set needs for the figures that compare distributions or pairs:
Fréchet distance and KID (a covariance), MS-SSIM diversity (a pair)."""

MORE_IMAGES: dict[str, str] = {
    "train": "more patients, or a larger data.splits.fractions.train (then preprocess again)",
    "holdout": "more patients, or a larger data.splits.fractions.holdout (then preprocess again)",
    "synthetic": "a larger generate.num_samples",
}
"""What gives each set of the audit more images."""


def not_computable(least: int = MIN_SET_SIZE, **sizes: int) -> str:
    """Why a figure over sets of these sizes cannot be computed, or ``""`` when it can.

    Args:
        least: Fewest images each set needs.
        **sizes: Images per set, by name (``train``, ``holdout``, ``synthetic``).

    Returns:
        ``""``, or for example ``not computable: needs at least 2 images per set, the holdout has 1
        (more: more patients, or a larger data.splits.fractions.holdout ...)``.
    """
    short = {name: n for name, n in sizes.items() if n < least}
    if not short:
        return ""
    have = " and ".join(f"the {name} set has {n}" for name, n in short.items())
    more = "; ".join(f"{name}: {MORE_IMAGES.get(name, 'more images')}" for name in short)
    return f"not computable: needs at least {least} images per set, {have} (for more, {more})"


def _unless(note: str, compute: Callable[[], float | torch.Tensor]) -> float:
    """``compute()``, or NaN when ``note`` says it is not computable."""
    return float("nan") if note else float(compute())


@dataclasses.dataclass(frozen=True)
class AuditSet:
    """One set of the audit (real train, real holdout, or synthetic).

    Attributes:
        images: ``(N, C, *spatial)`` intensities in [0, 1].
        labels: ``(N, 1, *spatial)`` integer label maps.
        features: ``(N, D)`` encoder features of the images.
        plane_features: For 3D sets, features of the 2D slices of each plane (``sagittal``,
            ``coronal``, ``axial``), the 2.5D protocol; empty for 2D sets.
    """

    images: np.ndarray
    labels: np.ndarray
    features: np.ndarray
    plane_features: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)


def _subsample(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` rows of ``x`` drawn without replacement (all rows when ``n >= len(x)``)."""
    if n >= len(x):
        return x
    return x[np.random.default_rng(seed).choice(len(x), size=n, replace=False)]


def realism_figures(
    train: AuditSet,
    holdout: AuditSet,
    synthetic: AuditSet,
    *,
    label_names: Sequence[str],
    spatial_dims: int,
    segment: Callable[[np.ndarray], np.ndarray],
    max_ssim_pairs: int = 2000,
    seed: int = 0,
    min_reference_dice: float = MIN_REFERENCE_DICE,
) -> list[Figure]:
    """Realism of the synthetic set against the real holdout; references from real train vs holdout.

    Feature-based figures compare equally many synthetic and (subsampled) training images with
    the holdout, because Fréchet distance and KID depend on the sample size.

    Args:
        train: Real training set.
        holdout: Real holdout set.
        synthetic: The synthetic set and the label maps it was generated for.
        label_names: Name per label value.
        spatial_dims: 2 or 3.
        segment: A segmenter trained on real data: images in, label maps out.
        max_ssim_pairs: Pairs drawn for the MS-SSIM diversity figure.
        seed: Seed for subsampling.
        min_reference_dice: Below this holdout Dice of ``segment`` the label-consistency ratio is not computed.

    Returns:
        The figures.
    """
    train_images, train_labels, train_features = train.images, train.labels, train.features
    holdout_images, holdout_labels, holdout_features = holdout.images, holdout.labels, holdout.features
    synthetic_images, synthetic_labels, synthetic_features = synthetic.images, synthetic.labels, synthetic.features
    n, h = len(synthetic_features), len(holdout_features)
    ref_features = _subsample(train_features, n, seed)
    short = not_computable(holdout=h, synthetic=n)  # the figure itself
    short_ref = not_computable(holdout=h, train=len(ref_features))  # its real-vs-real reference
    fid = _unless(short, lambda: frechet_distance(holdout_features, synthetic_features))
    fid_reference = _unless(short_ref, lambda: frechet_distance(holdout_features, ref_features))
    variance = float(np.trace(np.atleast_2d(np.cov(holdout_features, rowvar=False)))) if h > 1 else 0.0
    kid = _unless(short, lambda: kernel_inception_distance(holdout_features, synthetic_features, seed=seed)[0])
    kid_reference = _unless(short_ref, lambda: kernel_inception_distance(holdout_features, ref_features, seed=seed)[0])
    figures = [
        Figure(
            "realism/fid_features",
            fid,
            "lower",
            "Fréchet distance between encoder features of synthetic and real holdout images; reference: "
            "as many real training images against the holdout",
            _known(fid_reference),
            True,
            short,
        ),
        Figure(
            "realism/fid_features_ratio",
            _ratio(fid, fid_reference, floor=FD_REFERENCE_FLOOR * variance),
            "lower",
            "feature Fréchet distance divided by its real-vs-real reference (at least "
            f"{FD_REFERENCE_FLOOR:g} of the holdout features' total variance): 1 = as far from the holdout as real "
            "training images are; noise is tens of times further",
            1.0,
            True,
            short or short_ref,
        ),
        Figure(
            "realism/kid_features",
            kid,
            "lower",
            "kernel inception distance (unbiased MMD^2, cubic kernel) on encoder features, synthetic vs holdout; "
            "reference: real train vs holdout",
            _known(kid_reference),
            True,
            short,
        ),
        Figure(
            "realism/mmd_gaussian_features",
            gaussian_mmd(holdout_features, synthetic_features),
            "lower",
            "Gaussian-kernel MMD^2 on encoder features, synthetic vs holdout; reference: real train vs holdout",
            gaussian_mmd(holdout_features, ref_features),
        ),
    ]
    for plane, synthetic_planes in synthetic.plane_features.items():
        holdout_planes = holdout.plane_features[plane]
        reference_planes = _subsample(train.plane_features[plane], len(synthetic_planes), seed)
        figures += [
            Figure(
                f"realism/fid_features_{plane}",
                frechet_distance(holdout_planes, synthetic_planes),
                "lower",
                f"Fréchet distance between encoder features of {plane} slices, synthetic vs holdout volumes (2.5D); "
                "reference: as many training slices",
                frechet_distance(holdout_planes, reference_planes),
            ),
            Figure(
                f"realism/kid_features_{plane}",
                kernel_inception_distance(holdout_planes, synthetic_planes, seed=seed)[0],
                "lower",
                f"KID on encoder features of {plane} slices, synthetic vs holdout volumes (2.5D); reference: training slices",
                kernel_inception_distance(holdout_planes, reference_planes, seed=seed)[0],
            ),
        ]
    m = min(n, h)
    mmd = MMDMetric()
    pick = lambda x: torch.as_tensor(_subsample(x, m, seed), dtype=torch.float32)  # noqa: E731
    mmd_reference = _unless(
        not_computable(holdout=m, train=min(m, len(train_features))), lambda: mmd(pick(holdout_features), pick(train_features))
    )
    figures.append(
        Figure(
            "realism/mmd_monai_features",
            _unless(short, lambda: mmd(pick(holdout_features), pick(synthetic_features))),
            "lower",
            "MONAI's MMD (linear kernel: compares feature means) of equally many synthetic and holdout features; "
            "reference: real train vs holdout",
            _known(mmd_reference),
            False,
            short,
        )
    )
    few_pairs = not_computable(synthetic=len(synthetic_images))
    ssim_reference = _unless(
        not_computable(holdout=len(holdout_images)),
        lambda: mean_pairwise_ssim(holdout_images, spatial_dims=spatial_dims, max_pairs=max_ssim_pairs),
    )
    figures.append(
        Figure(
            "realism/ms_ssim_diversity",
            _unless(few_pairs, lambda: mean_pairwise_ssim(synthetic_images, spatial_dims=spatial_dims, max_pairs=max_ssim_pairs)),
            "close to reference",
            "mean MS-SSIM between pairs of synthetic images (higher = more alike); reference: the same "
            "among real holdout images; far above it means too little variety",
            _known(ssim_reference),
            True,
            few_pairs,
        )
    )
    syn_w1 = tissue_intensity_distances(
        holdout_images, holdout_labels, synthetic_images, synthetic_labels, label_names=label_names
    )
    ref_w1 = tissue_intensity_distances(holdout_images, holdout_labels, train_images, train_labels, label_names=label_names)
    for value, name in enumerate(label_names):
        if name not in syn_w1:
            continue
        real_values = holdout_images[holdout_labels == value]
        figures.append(
            Figure(
                f"realism/intensity_w1_{name}",
                syn_w1[name],
                "lower",
                f"Wasserstein-1 distance of {name} intensities ([0,1] scale), synthetic vs holdout; reference: train vs holdout",
                ref_w1.get(name),
            )
        )
        figures.append(
            Figure(
                f"realism/histogram_distance_{name}",
                histogram_distance(real_values, synthetic_images[synthetic_labels == value]),
                "lower",
                f"1 - histogram intersection of {name} intensities, synthetic vs holdout (0 identical, 1 disjoint); "
                "reference: train vs holdout",
                histogram_distance(real_values, train_images[train_labels == value]),
            )
        )
    num_classes = len(label_names)
    consistency = mean_dice(segment(synthetic_images), synthetic_labels, num_classes=num_classes)
    consistency_reference = mean_dice(segment(holdout_images), holdout_labels, num_classes=num_classes)
    figures += [
        Figure(
            "realism/label_consistency_dice",
            consistency,
            "higher",
            "mean Dice between the synthetic label maps and what a segmenter trained on real data finds in "
            "the synthetic images: do image and label agree? reference: the same segmenter on the real holdout",
            consistency_reference,
            True,
        ),
        _dice_ratio(
            "realism/label_consistency_dice_ratio",
            consistency,
            consistency_reference,
            minimum=min_reference_dice,
            better="higher (1 = as real)",
            meaning="label-consistency Dice divided by the real segmenter's Dice on the real holdout; not "
            f"computed when that reference is below {min_reference_dice:g}",
        ),
    ]
    return figures


def privacy_figures(
    train: AuditSet,
    holdout: AuditSet,
    synthetic: AuditSet,
    *,
    num_classes: int,
    member_errors: np.ndarray | Mapping[str, np.ndarray] | None,
    nonmember_errors: np.ndarray | Mapping[str, np.ndarray] | None,
    rules: PrivacyRules | None = None,
    memorisation_threshold: float = 0.95,
) -> tuple[list[Figure], np.ndarray, np.ndarray]:
    """Privacy of the synthetic set: the per-sample rules, nearness to training records, membership inference.

    The per-sample figures (memorisation, distance to the closest record, rule violations) come
    from one measurement by ``rules``, the object generate's privacy gate applies, so a set the
    gate let through has no rule violations here.

    Args:
        train: Real training set (the members).
        holdout: Real holdout set (the non-members).
        synthetic: The synthetic set.
        num_classes: Label values including background.
        member_errors: The membership attacks' scores of training images (lower = more likely a
            member): ``{attack: errors}``, or one array for the ``loss`` (denoising-error) attack
            alone; ``None`` skips membership inference (:func:`membership_figures`).
        nonmember_errors: The same scores of holdout images.
        rules: The per-sample rules calibrated on ``train`` and ``holdout`` (:func:`calibrate_rules`
            with the sets' features); default: calibrated here from the sets' images and features
            with the default ``conf/privacy`` settings and ``memorisation_threshold``.
        memorisation_threshold: Correlation above which a synthetic image is a copy (only without ``rules``).

    Returns:
        ``(figures, correlations, nearest)``: the figures, and for each synthetic image its highest
        correlation with a training image and that image's index (for the report's pairs).
    """
    if rules is None:
        rules = calibrate_rules(
            train.images,
            holdout.images,
            privacy=PrivacySettings(memorisation_threshold=memorisation_threshold),
            train_features=train.features,
            holdout_features=holdout.features,
        )
    check = rules.measure(synthetic.images, features=synthetic.features if rules.train_features is not None else None)
    reference = rules.holdout
    n = len(check)
    figures: list[Figure] = []
    closer = rules.closer_to_train(synthetic.images, check)
    for space, to_train, ref in (("pixel", check.distance, reference.distance), ("feature", check.feature, reference.feature)):
        if to_train is None or ref is None:
            continue
        p05 = float(np.percentile(ref, 5))
        figures += [
            Figure(
                f"privacy/closer_to_train_fraction_{space}",
                closer[space],
                "0.5 (higher = memorisation)",
                f"fraction of synthetic images nearer ({space} space) to a training image than to any holdout image",
                0.5,
                space == "pixel",
            ),
            Figure(
                f"privacy/min_distance_to_train_{space}",
                float(to_train.min()),
                "higher",
                f"smallest {space}-space distance from a synthetic image to a training image; reference: smallest "
                "holdout-to-train distance",
                float(ref.min()),
            ),
            Figure(
                f"privacy/median_distance_to_train_{space}",
                float(np.median(to_train)),
                "close to reference",
                f"median {space}-space distance to the nearest training image; reference: the same for holdout images",
                float(np.median(ref)),
            ),
            Figure(
                f"privacy/below_holdout_p05_count_{space}",
                float(np.sum(to_train < p05)),
                "lower",
                f"synthetic images nearer ({space} space) to a training image than 95% of real holdout images are; "
                "reference: the 5% of holdout images expected there",
                0.05 * n,
            ),
        ]
    figures += [
        Figure(
            "privacy/max_correlation_to_train",
            float(check.correlation.max()),
            "lower",
            "highest normalised correlation of any synthetic image with any training image (1 = copy); reference: "
            "the same for real holdout images",
            float(reference.correlation.max()),
            True,
        ),
        Figure(
            "privacy/memorised_count",
            float(check.memorised.sum()),
            "lower",
            f"synthetic images whose correlation with a training image exceeds {rules.memorisation_threshold:g} "
            "(rule: memorised); reference: holdout images above it",
            float(reference.memorised.sum()),
            True,
        ),
        Figure(
            "privacy/too_close_count_pixel",
            float(check.pixel_too_close.sum()),
            "lower",
            f"synthetic images nearer to a training image ({rules.metric}) than all but {rules.quantile:g} of real "
            f"holdout images are (rule: too close, pixel); reference: {rules.quantile:g} of the set",
            rules.quantile * n,
        ),
    ]
    if rules.feature_threshold is not None:
        figures.append(
            Figure(
                "privacy/too_close_count_feature",
                float(check.feature_too_close.sum()),
                "lower",
                f"synthetic images nearer to a training record in feature space than all but {rules.quantile:g} of real "
                f"holdout images are (rule: too close, feature); reference: {rules.quantile:g} of the set",
                rules.quantile * n,
            )
        )
    figures.append(
        Figure(
            "privacy/rule_violations_count",
            float(check.num_rejected),
            "lower (0: every sample meets the rules)",
            "synthetic images that break any per-sample privacy rule (memorised, too close in pixel or feature space; "
            "generate's gate rejects these); reference: real holdout images breaking one, scaled to the set size",
            float(reference.violations.mean() * n),
            True,
        )
    )
    label_dice, _ = dice_to_nearest_label_map(synthetic.labels, train.labels, num_classes=num_classes)
    ref_dice, _ = dice_to_nearest_label_map(holdout.labels, train.labels, num_classes=num_classes)
    figures.append(
        Figure(
            "privacy/label_dice_to_nearest_train",
            float(np.mean(label_dice)),
            "close to reference (higher = copied labels)",
            "mean over synthetic label maps of the Dice with the most similar training label map; reference: the same "
            "for holdout label maps",
            float(np.mean(ref_dice)),
        )
    )
    if member_errors is not None and nonmember_errors is not None:
        figures += membership_figures(member_errors, nonmember_errors)
    return figures, check.correlation, check.correlation_index


ATTACK_NAMES: dict[str, str] = {
    "loss": "the model's denoising error at fixed timesteps and noise",
    "pia": "PIA: the model's disagreement with its own noise estimate carried from t = 0 to t (proximal initialisation)",
}
"""What each membership attack measures, for the figures' meanings (unknown attacks are named as given)."""


def membership_figures(
    member_errors: np.ndarray | Mapping[str, np.ndarray],
    nonmember_errors: np.ndarray | Mapping[str, np.ndarray],
) -> list[Figure]:
    """AUC and TPR at 1% FPR of each membership attack, and of the strongest one under the plain names.

    Each attack gets ``privacy/membership_auc_<attack>`` and ``privacy/membership_tpr_at_1pct_fpr_<attack>``.
    ``privacy/membership_auc`` and ``privacy/membership_tpr_at_1pct_fpr`` (the ones the verdict
    reads) are the figures of the attack with the highest AUC (the first on a tie), and their
    meaning names it: a model passes only if *every* attack fails to tell members from non-members.

    Args:
        member_errors: ``{attack: (N,) scores}`` of training images (lower = more likely a
            member), or one array, taken as the ``loss`` attack's.
        nonmember_errors: The same for holdout images, with the same attacks.

    Returns:
        The per-attack figures, in the given order, then the two strongest-attack figures.

    Raises:
        ValueError: When the two sets name different attacks, or none.
    """
    members, nonmembers = _by_attack(member_errors), _by_attack(nonmember_errors)
    if list(members) != list(nonmembers) or not members:
        raise ValueError(f"member and non-member scores must name the same attacks, got {list(members)} and {list(nonmembers)}")
    figures: list[Figure] = []
    scored: dict[str, tuple[float, float]] = {}
    for attack, errors in members.items():
        # attack score: a lower error means "member"
        auc = roc_auc(-np.asarray(errors), -np.asarray(nonmembers[attack]))
        tpr = tpr_at_fpr(-np.asarray(errors), -np.asarray(nonmembers[attack]), fpr=0.01)
        scored[attack] = (auc, tpr)
        what = ATTACK_NAMES.get(attack, attack)
        figures += [
            Figure(
                f"privacy/membership_auc_{attack}",
                auc,
                "0.5 (higher = leaks membership)",
                f"AUC of telling training images from holdout images by {what} ({attack} attack)",
                0.5,
            ),
            Figure(
                f"privacy/membership_tpr_at_1pct_fpr_{attack}",
                tpr,
                "lower",
                f"share of training images the {attack} attack flags as members when at most 1% of holdout images are",
                0.01,
            ),
        ]
    strongest = max(scored, key=lambda k: scored[k][0])  # max keeps the first on a tie
    others = ", ".join(f"{k} {v[0]:.3g}" for k, v in scored.items() if k != strongest)
    also = f"; other attacks' AUC: {others}" if others else ""
    auc, tpr = scored[strongest]
    return figures + [
        Figure(
            "privacy/membership_auc",
            auc,
            "0.5 (higher = leaks membership)",
            f"AUC of telling training images from holdout images by the strongest membership attack run, here "
            f"{strongest} ({ATTACK_NAMES.get(strongest, strongest)}){also}",
            0.5,
            True,
        ),
        Figure(
            "privacy/membership_tpr_at_1pct_fpr",
            tpr,
            "lower",
            f"share of training images the strongest attack ({strongest}) flags as members when at most 1% of holdout images are",
            0.01,
        ),
    ]


def _by_attack(errors: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scores by attack name; a bare array is the ``loss`` attack's."""
    if isinstance(errors, Mapping):
        return {str(k): np.asarray(v) for k, v in errors.items()}
    return {"loss": np.asarray(errors)}


def utility_figures(
    *, dice_real: float, dice_synthetic: float, dice_both: float, min_reference_dice: float = MIN_REFERENCE_DICE
) -> list[Figure]:
    """Segmentation Dice on the real holdout for models trained on real, synthetic, and both.

    Args:
        dice_real: Mean Dice of the segmenter trained on the real training split.
        dice_synthetic: The same for the segmenter trained on the synthetic set only.
        dice_both: The same for the segmenter trained on both.
        min_reference_dice: Below this real-only Dice the ratio is not computed.

    Returns:
        The three Dice figures and ``utility/dice_synthetic_only_ratio`` (synthetic-only over
        real-only; NaN, with a note, when the real-only Dice is below ``min_reference_dice``).
    """
    return [
        Figure(
            "utility/dice_real_only",
            dice_real,
            "higher",
            "mean Dice on the real holdout of a segmenter trained on real training data only",
            None,
            True,
        ),
        Figure(
            "utility/dice_synthetic_only",
            dice_synthetic,
            "higher (compare with real only)",
            "mean Dice on the real holdout of a segmenter trained on synthetic data only",
            dice_real,
            True,
        ),
        Figure(
            "utility/dice_real_plus_synthetic",
            dice_both,
            "higher than real only = augmentation helps",
            "mean Dice on the real holdout of a segmenter trained on real plus synthetic data",
            dice_real,
            True,
        ),
        _dice_ratio(
            "utility/dice_synthetic_only_ratio",
            dice_synthetic,
            dice_real,
            minimum=min_reference_dice,
            better="higher (1 = as useful as real)",
            meaning="synthetic-only Dice divided by real-only Dice on the real holdout: how much of the real "
            f"data's use the synthetic set replaces; not computed when real-only is below {min_reference_dice:g}",
        ),
    ]
