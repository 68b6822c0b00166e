"""The figures of an audit, computed from arrays, features and trained models.

Every figure is read against a reference computed the same way on real data: usually real train
against real holdout, which shows what "as good as real" looks like at this sample size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.metrics import MMDMetric

from medsynth.evaluation.figures import Figure
from medsynth.metrics import (
    closer_to_train_fraction,
    dice_to_nearest_label_map,
    frechet_distance,
    gaussian_mmd,
    histogram_distance,
    kernel_inception_distance,
    max_normalised_correlation,
    mean_pairwise_ssim,
    nearest_neighbours,
    roc_auc,
    tissue_intensity_distances,
    tpr_at_fpr,
)
from medsynth.metrics.segmentation import mean_dice


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

    Returns:
        The figures.
    """
    train_images, train_labels, train_features = train.images, train.labels, train.features
    holdout_images, holdout_labels, holdout_features = holdout.images, holdout.labels, holdout.features
    synthetic_images, synthetic_labels, synthetic_features = synthetic.images, synthetic.labels, synthetic.features
    n = len(synthetic_features)
    ref_features = _subsample(train_features, n, seed)
    figures = [
        Figure("realism/fid_features", frechet_distance(holdout_features, synthetic_features), "lower",
               "Fréchet distance between encoder features of synthetic and real holdout images; reference: "
               "as many real training images against the holdout", frechet_distance(holdout_features, ref_features), True),
        Figure("realism/kid_features", kernel_inception_distance(holdout_features, synthetic_features, seed=seed)[0], "lower",
               "kernel inception distance (unbiased MMD^2, cubic kernel) on encoder features, synthetic vs holdout; "
               "reference: real train vs holdout", kernel_inception_distance(holdout_features, ref_features, seed=seed)[0], True),
        Figure("realism/mmd_gaussian_features", gaussian_mmd(holdout_features, synthetic_features), "lower",
               "Gaussian-kernel MMD^2 on encoder features, synthetic vs holdout; reference: real train vs holdout",
               gaussian_mmd(holdout_features, ref_features)),
    ]
    for plane, synthetic_planes in synthetic.plane_features.items():
        holdout_planes = holdout.plane_features[plane]
        reference_planes = _subsample(train.plane_features[plane], len(synthetic_planes), seed)
        figures += [
            Figure(f"realism/fid_features_{plane}", frechet_distance(holdout_planes, synthetic_planes), "lower",
                   f"Fréchet distance between encoder features of {plane} slices, synthetic vs holdout volumes (2.5D); "
                   "reference: as many training slices", frechet_distance(holdout_planes, reference_planes)),
            Figure(f"realism/kid_features_{plane}", kernel_inception_distance(holdout_planes, synthetic_planes, seed=seed)[0],
                   "lower", f"KID on encoder features of {plane} slices, synthetic vs holdout volumes (2.5D); reference: "
                   "training slices", kernel_inception_distance(holdout_planes, reference_planes, seed=seed)[0]),
        ]
    m = min(n, len(holdout_features))
    mmd = MMDMetric()
    pick = lambda x: torch.as_tensor(_subsample(x, m, seed), dtype=torch.float32)  # noqa: E731
    figures.append(Figure(
        "realism/mmd_monai_features", float(mmd(pick(holdout_features), pick(synthetic_features))), "lower",
        "MONAI's MMD (linear kernel: compares feature means) of equally many synthetic and holdout features; "
        "reference: real train vs holdout", float(mmd(pick(holdout_features), pick(train_features))),
    ))
    figures.append(Figure(
        "realism/ms_ssim_diversity", mean_pairwise_ssim(synthetic_images, spatial_dims=spatial_dims, max_pairs=max_ssim_pairs),
        "close to reference", "mean MS-SSIM between pairs of synthetic images (higher = more alike); reference: the same "
        "among real holdout images; far above it means too little variety",
        mean_pairwise_ssim(holdout_images, spatial_dims=spatial_dims, max_pairs=max_ssim_pairs), True,
    ))
    syn_w1 = tissue_intensity_distances(holdout_images, holdout_labels, synthetic_images, synthetic_labels, label_names=label_names)
    ref_w1 = tissue_intensity_distances(holdout_images, holdout_labels, train_images, train_labels, label_names=label_names)
    for value, name in enumerate(label_names):
        if name not in syn_w1:
            continue
        real_values = holdout_images[holdout_labels == value]
        figures.append(Figure(
            f"realism/intensity_w1_{name}", syn_w1[name], "lower",
            f"Wasserstein-1 distance of {name} intensities ([0,1] scale), synthetic vs holdout; reference: train vs holdout",
            ref_w1.get(name),
        ))
        figures.append(Figure(
            f"realism/histogram_distance_{name}",
            histogram_distance(real_values, synthetic_images[synthetic_labels == value]), "lower",
            f"1 - histogram intersection of {name} intensities, synthetic vs holdout (0 identical, 1 disjoint); "
            "reference: train vs holdout", histogram_distance(real_values, train_images[train_labels == value]),
        ))
    num_classes = len(label_names)
    figures.append(Figure(
        "realism/label_consistency_dice", mean_dice(segment(synthetic_images), synthetic_labels, num_classes=num_classes),
        "higher", "mean Dice between the synthetic label maps and what a segmenter trained on real data finds in the "
        "synthetic images: do image and label agree? reference: the same segmenter on the real holdout",
        mean_dice(segment(holdout_images), holdout_labels, num_classes=num_classes), True,
    ))
    return figures


def privacy_figures(
    train: AuditSet,
    holdout: AuditSet,
    synthetic: AuditSet,
    *,
    num_classes: int,
    member_errors: np.ndarray | None,
    nonmember_errors: np.ndarray | None,
    memorisation_threshold: float = 0.95,
) -> tuple[list[Figure], np.ndarray, np.ndarray]:
    """Privacy of the synthetic set: nearness to training records, memorisation, membership inference.

    Args:
        train: Real training set (the members).
        holdout: Real holdout set (the non-members).
        synthetic: The synthetic set.
        num_classes: Label values including background.
        member_errors, nonmember_errors: The model's denoising error on training and holdout images
            (lower error = more likely a member); ``None`` skips membership inference.
        memorisation_threshold: Correlation above which a synthetic image counts as a copy.

    Returns:
        ``(figures, correlations, nearest)``: the figures, and for each synthetic image its highest
        correlation with a training image and that image's index (for the report's pairs).
    """
    figures: list[Figure] = []
    for space in ("pixel", "feature"):
        field = "images" if space == "pixel" else "features"
        syn, real, hold = (getattr(x, field) for x in (synthetic, train, holdout))
        to_train, _ = nearest_neighbours(syn, real)
        to_holdout, _ = nearest_neighbours(syn, hold)
        ref, _ = nearest_neighbours(hold, real)
        p05 = float(np.percentile(ref, 5))
        figures += [
            Figure(f"privacy/closer_to_train_fraction_{space}", closer_to_train_fraction(to_train, to_holdout),
                   "0.5 (higher = memorisation)", f"fraction of synthetic images nearer ({space} space) to a training "
                   "image than to any holdout image", 0.5, space == "pixel"),
            Figure(f"privacy/min_distance_to_train_{space}", float(to_train.min()), "higher",
                   f"smallest {space}-space distance from a synthetic image to a training image; reference: smallest "
                   "holdout-to-train distance", float(ref.min())),
            Figure(f"privacy/median_distance_to_train_{space}", float(np.median(to_train)), "close to reference",
                   f"median {space}-space distance to the nearest training image; reference: the same for holdout images",
                   float(np.median(ref))),
            Figure(f"privacy/below_holdout_p05_count_{space}", float(np.sum(to_train < p05)), "lower",
                   f"synthetic images nearer ({space} space) to a training image than 95% of real holdout images are; "
                   "reference: the 5% of holdout images expected there", 0.05 * len(syn)),
        ]
    correlation, nearest = max_normalised_correlation(synthetic.images, train.images)
    ref_correlation, _ = max_normalised_correlation(holdout.images, train.images)
    figures += [
        Figure("privacy/max_correlation_to_train", float(correlation.max()), "lower",
               "highest normalised correlation of any synthetic image with any training image (1 = copy); reference: "
               "the same for real holdout images", float(ref_correlation.max()), True),
        Figure("privacy/memorised_count", float(np.sum(correlation > memorisation_threshold)), "lower",
               f"synthetic images whose correlation with a training image exceeds {memorisation_threshold}; reference: "
               "holdout images above it", float(np.sum(ref_correlation > memorisation_threshold)), True),
    ]
    label_dice, _ = dice_to_nearest_label_map(synthetic.labels, train.labels, num_classes=num_classes)
    ref_dice, _ = dice_to_nearest_label_map(holdout.labels, train.labels, num_classes=num_classes)
    figures.append(Figure(
        "privacy/label_dice_to_nearest_train", float(np.mean(label_dice)), "close to reference (higher = copied labels)",
        "mean over synthetic label maps of the Dice with the most similar training label map; reference: the same "
        "for holdout label maps", float(np.mean(ref_dice)),
    ))
    if member_errors is not None and nonmember_errors is not None:
        # attack score: a lower denoising error means "member"
        figures += [
            Figure("privacy/membership_auc", roc_auc(-member_errors, -nonmember_errors), "0.5 (higher = leaks membership)",
                   "AUC of telling training images from holdout images by the model's denoising error", 0.5, True),
            Figure("privacy/membership_tpr_at_1pct_fpr", tpr_at_fpr(-member_errors, -nonmember_errors, fpr=0.01), "lower",
                   "share of training images flagged as members when at most 1% of holdout images are", 0.01),
        ]
    return figures, correlation, nearest


def utility_figures(*, dice_real: float, dice_synthetic: float, dice_both: float) -> list[Figure]:
    """Segmentation Dice on the real holdout for models trained on real, synthetic, and both."""
    return [
        Figure("utility/dice_real_only", dice_real, "higher",
               "mean Dice on the real holdout of a segmenter trained on real training data only", None, True),
        Figure("utility/dice_synthetic_only", dice_synthetic, "higher (compare with real only)",
               "mean Dice on the real holdout of a segmenter trained on synthetic data only", dice_real, True),
        Figure("utility/dice_real_plus_synthetic", dice_both, "higher than real only = augmentation helps",
               "mean Dice on the real holdout of a segmenter trained on real plus synthetic data", dice_real, True),
    ]
