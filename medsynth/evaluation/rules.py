"""The per-sample privacy rules: one implementation that generate's gate enforces and evaluate's audit checks.

A sample breaks a rule when it is

- **memorised**: its highest normalised correlation with a training image is above
  ``privacy.memorisation_threshold`` (a copy up to brightness and contrast);
- **too close in pixel space**: its nearest training image is nearer (RMS distance, or
  correlation with ``privacy.metric=correlation``) than all but ``privacy.holdout_quantile`` of the
  real holdout images are to theirs;
- **too close in feature space** (with ``privacy.features``): the same, with RMS distances of the
  dataset encoder's features.

:func:`calibrate_rules` measures the holdout against the training split once and fixes the
thresholds; :meth:`PrivacyRules.measure` then gives every sample its nearness values, which
training record is nearest, and which rules it breaks. The gate (:mod:`medsynth.evaluation.gate`)
rejects a candidate that breaks any rule; the audit (:func:`medsynth.evaluation.audit.privacy_figures`)
counts the exported samples that break one and reads its distance-to-closest-record figures from
the same measurements. Calibrated on the same splits with the same encoder, both sides hold the
same thresholds, so an exported set cannot fail the audit's per-sample limits.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from medsynth import ConfigError, MedsynthError
from medsynth.config.settings import PrivacySettings
from medsynth.evaluation import instruments
from medsynth.metrics import closer_to_train_fraction, max_normalised_correlation, nearest_neighbours

log = logging.getLogger("medsynth")

PIXEL_METRICS = ("rms", "correlation")
"""``rms``: root-mean-square intensity distance (lower = closer); ``correlation``: highest
normalised correlation (higher = closer, blind to brightness and contrast)."""

RULES = ("memorised", "too_close_pixel", "too_close_feature")
"""The names of the per-sample rules, as the audit's figures and the docs use them."""


@dataclasses.dataclass(frozen=True, eq=False)
class RuleCheck:
    """Per-sample nearness to the training records, and the rules each sample breaks.

    Attributes:
        correlation: ``(N,)`` highest normalised correlation with any training image (1 = copy).
        correlation_index: ``(N,)`` index of that training image.
        distance: ``(N,)`` RMS pixel distance to the nearest training image (lower = closer).
        distance_index: ``(N,)`` index of that training image.
        feature: ``(N,)`` RMS distance of the encoder features to the nearest training record's,
            or ``None`` without features.
        feature_index: ``(N,)`` index of that training record, or ``None``.
        features: ``(N, D)`` the samples' encoder features, or ``None``.
        metric: The pixel-space rule's nearness, one of :data:`PIXEL_METRICS`.
        memorised: ``(N,)`` breaks the memorisation rule.
        pixel_too_close: ``(N,)`` breaks the pixel-space distance rule.
        feature_too_close: ``(N,)`` breaks the feature-space distance rule (all False when it is off).
    """

    correlation: np.ndarray
    correlation_index: np.ndarray
    distance: np.ndarray
    distance_index: np.ndarray
    feature: np.ndarray | None
    feature_index: np.ndarray | None
    features: np.ndarray | None = dataclasses.field(repr=False)
    metric: str
    memorised: np.ndarray
    pixel_too_close: np.ndarray
    feature_too_close: np.ndarray

    def __len__(self) -> int:
        return len(self.distance)

    @property
    def pixel(self) -> np.ndarray:
        """``(N,)`` nearness in the pixel-space rule's metric: RMS distance, or correlation."""
        return self.correlation if self.metric == "correlation" else self.distance

    @property
    def pixel_index(self) -> np.ndarray:
        """``(N,)`` the nearest training image in the pixel-space rule's metric."""
        return self.correlation_index if self.metric == "correlation" else self.distance_index

    @property
    def violations(self) -> np.ndarray:
        """``(N,)`` breaks at least one rule."""
        return self.memorised | self.pixel_too_close | self.feature_too_close

    @property
    def accepted(self) -> np.ndarray:
        """``(N,)`` breaks no rule."""
        return ~self.violations

    @property
    def num_rejected(self) -> int:
        """Samples that break at least one rule."""
        return int(np.sum(self.violations))

    def counts(self) -> dict[str, int]:
        """Samples breaking each rule (:data:`RULES`) and any rule (``any``)."""
        return {
            "memorised": int(self.memorised.sum()),
            "too_close_pixel": int(self.pixel_too_close.sum()),
            "too_close_feature": int(self.feature_too_close.sum()),
            "any": self.num_rejected,
        }


@dataclasses.dataclass(frozen=True, eq=False)
class PrivacyRules:
    """The per-sample rules calibrated on one dataset: thresholds, and the records to measure against.

    Build it with :func:`calibrate_rules`. Memory is linear in the number of training and holdout
    records: their images (float32), their features, and one ``chunk x records`` block of
    distances while measuring.

    Attributes:
        memorisation_threshold: Correlation above which a sample counts as memorised.
        quantile: Share of real holdout images that count as too close (``privacy.holdout_quantile``).
        metric: Pixel-space nearness of the distance rule, one of :data:`PIXEL_METRICS`.
        pixel_threshold: A sample with an RMS distance below it (``rms``) or a correlation above it
            (``correlation``) is too close in pixel space.
        feature_threshold: A sample with a feature distance below it is too close in feature space;
            ``None`` when that rule is off (``privacy.features=false`` or no encoder).
        feature_space: ``none``, ``2d``, ``2.5d`` or ``3d`` (see
            :data:`medsynth.evaluation.instruments.FEATURE_SPACES`).
        train_images: ``(M, C, *spatial)`` the training records, float32.
        train_features: ``(M, D)`` their features, or ``None``.
        holdout_images: ``(H, C, *spatial)`` the real holdout records, float32.
        holdout_features: ``(H, D)`` their features, or ``None``.
        holdout: The holdout measured against the training split with these rules: the reference
            every per-sample figure is read against.
        encoder: The feature encoder (``None``: features must be given to :meth:`measure`, or
            there are none).
        batch_size: Images per encoder batch.
        chunk: Queries per nearest-neighbour block.
    """

    memorisation_threshold: float
    quantile: float
    metric: str
    pixel_threshold: float
    feature_threshold: float | None
    feature_space: str
    train_images: np.ndarray = dataclasses.field(repr=False)
    train_features: np.ndarray | None = dataclasses.field(repr=False)
    holdout_images: np.ndarray = dataclasses.field(repr=False)
    holdout_features: np.ndarray | None = dataclasses.field(repr=False)
    holdout: RuleCheck = dataclasses.field(repr=False)
    encoder: nn.Module | None = dataclasses.field(repr=False)
    batch_size: int = 256
    chunk: int = 512

    def measure(self, images: torch.Tensor | np.ndarray, *, features: np.ndarray | None = None, margin: float = 0.0) -> RuleCheck:
        """Measure samples against the training records and apply the rules.

        Args:
            images: ``(N, C, *spatial)`` samples in [0, 1], shaped like the training images (any device).
            features: ``(N, D)`` their encoder features when the caller has them (the audit);
                computed with :attr:`encoder` otherwise.
            margin: Relative safety margin: each threshold is moved this fraction towards "safe"
                before it is applied, so that float rounding (another batch, another chunk) cannot
                turn a sample the gate accepted into one the audit counts. The audit uses 0.

        Returns:
            Per-sample nearness values, nearest training indices and rule flags.

        Raises:
            ValueError: If the samples are not shaped like the training images, or features are
                needed but neither given nor computable.
        """
        x = as_images(images)
        if x.shape[1:] != self.train_images.shape[1:]:
            raise ValueError(
                f"privacy rules: samples have shape {x.shape[1:]}, the training records {self.train_images.shape[1:]}"
            )
        if features is None and self.train_features is not None:
            if self.encoder is None:
                raise ValueError("privacy rules: no encoder to measure the samples' features; pass features=")
            features = instruments.features(self.encoder, x, batch_size=self.batch_size).items
        return _measure(
            x,
            features,
            self.train_images,
            self.train_features,
            metric=self.metric,
            memorisation_threshold=_loosen(self.memorisation_threshold, margin, metric="correlation"),
            pixel_threshold=_loosen(self.pixel_threshold, margin, metric=self.metric),
            feature_threshold=None if self.feature_threshold is None else _loosen(self.feature_threshold, margin, metric="rms"),
            chunk=self.chunk,
        )

    def closer_to_train(self, images: torch.Tensor | np.ndarray, check: RuleCheck) -> dict[str, float]:
        """Fraction of samples nearer to a training record than to any holdout record, per space.

        A set-level figure, not a rule: about 0.5 when the samples are as near to unseen patients
        as to training ones, towards 1 when they sit nearer the training records. The training and
        holdout sets are compared per record, so their sizes do not move the figure
        (:func:`medsynth.metrics.closer_to_train_fraction` with both sizes).

        Args:
            images: The samples :meth:`measure` gave ``check`` for.
            check: Their measurements.

        Returns:
            ``{"pixel": fraction}``, plus ``"feature"`` when the samples have features.
        """
        sizes = {"train_size": len(self.train_images), "holdout_size": len(self.holdout_images)}
        to_holdout, _ = nearest_neighbours(as_images(images), self.holdout_images, chunk=self.chunk)
        out = {"pixel": closer_to_train_fraction(check.distance, to_holdout, **sizes)}
        if check.feature is not None and check.features is not None and self.holdout_features is not None:
            to_holdout_feature, _ = nearest_neighbours(check.features, self.holdout_features, chunk=self.chunk)
            out["feature"] = closer_to_train_fraction(check.feature, to_holdout_feature, **sizes)
        return out

    def describe(self) -> dict[str, Any]:
        """The rules and thresholds as flat values, for the synthetic manifest, MLflow params and the audit.

        Returns:
            ``method`` (one sentence), ``memorisation_threshold``, ``metric``, ``quantile``,
            ``pixel_threshold``, ``feature_space``, ``feature_threshold`` (``None`` when the
            feature rule is off), ``num_references`` and ``num_holdout``.
        """
        pixel_rule = (
            f"pixel RMS distance below {self.pixel_threshold:.4g}"
            if self.metric == "rms"
            else f"pixel normalised correlation above {self.pixel_threshold:.4g}"
        )
        feature_rule = (
            f" or encoder-feature ({self.feature_space}) RMS distance below {self.feature_threshold:.4g}"
            if self.feature_threshold is not None
            else ""
        )
        return {
            "method": (
                f"a sample breaks a rule if its correlation with a training image is above "
                f"{self.memorisation_threshold:.4g} (memorised), or its nearest training record is nearer "
                f"than the closest {self.quantile:.3g} of holdout records are: {pixel_rule}{feature_rule}"
            ),
            "memorisation_threshold": self.memorisation_threshold,
            "metric": self.metric,
            "quantile": self.quantile,
            "pixel_threshold": self.pixel_threshold,
            "feature_space": self.feature_space,
            "feature_threshold": self.feature_threshold,
            "num_references": int(len(self.train_images)),
            "num_holdout": int(len(self.holdout_images)),
        }


def calibrate_rules(
    train_images: torch.Tensor | np.ndarray,
    holdout_images: torch.Tensor | np.ndarray,
    *,
    privacy: PrivacySettings,
    encoder: nn.Module | None = None,
    train_features: np.ndarray | None = None,
    holdout_features: np.ndarray | None = None,
    batch_size: int = 256,
    chunk: int = 512,
    device: torch.device | str | None = None,
) -> PrivacyRules:
    """Fix the thresholds of the per-sample rules from the holdout-to-train nearness of real records.

    For each holdout image its nearest training image is found in pixel space (RMS distance, and
    normalised correlation) and, with features, in feature space. The distance thresholds are the
    ``privacy.holdout_quantile`` of the holdout distances (the ``1 - quantile`` quantile of the
    correlations with ``privacy.metric=correlation``), so about that share of real unseen images
    would count as too close in each space. The memorisation threshold is
    ``privacy.memorisation_threshold`` as given.

    Args:
        train_images: ``(M, C, *spatial)`` training images in [0, 1]: the records to protect.
        holdout_images: ``(H, C, *spatial)`` real holdout images in [0, 1], never trained on.
        privacy: The rules' settings (``conf/privacy``).
        encoder: The dataset's feature encoder (a 2D encoder on volumes gives 2.5D features, one
            with 3D convolutions whole-volume ones); used for the features not given.
        train_features, holdout_features: Their features when the caller has them already (same
            encoder, as :func:`medsynth.evaluation.instruments.features` gives them).
        batch_size: Images per encoder batch.
        chunk: Queries per nearest-neighbour block (memory grows with ``chunk x M``).
        device: Where to run the encoder (default: where it is).

    Returns:
        The calibrated rules. Without an encoder and features, or with ``privacy.features=false``,
        the feature rule is off (features are still measured when available, for the figures).

    Raises:
        ConfigError: If ``privacy.metric`` is not one of :data:`PIXEL_METRICS`.
        MedsynthError: If the training or holdout set is empty, or their shapes differ.
    """
    if privacy.metric not in PIXEL_METRICS:
        raise ConfigError(f"privacy.metric must be one of {list(PIXEL_METRICS)}, got {privacy.metric!r}")
    train, holdout = as_images(train_images), as_images(holdout_images)
    if len(train) == 0:
        raise MedsynthError("privacy rules: the training split is empty, so there is nothing to compare samples with")
    if len(holdout) == 0:
        raise MedsynthError(
            "privacy rules: the dataset's holdout split is empty, and the rules set their thresholds from holdout "
            "images; preprocess with a holdout split (or, for generate, set generate.privacy_gate.enabled=false)"
        )
    if train.shape[1:] != holdout.shape[1:]:
        raise MedsynthError(f"privacy rules: training images have shape {train.shape[1:]}, holdout images {holdout.shape[1:]}")
    feature_space = "none"
    if encoder is not None:
        if device is not None:
            encoder = encoder.to(device)
        encoder = encoder.eval()
        feature_space = instruments.feature_space(encoder, spatial_dims=train.ndim - 2)
        if train_features is None:
            train_features = instruments.features(encoder, train, batch_size=batch_size).items
        if holdout_features is None:
            holdout_features = instruments.features(encoder, holdout, batch_size=batch_size).items
    elif train_features is not None:
        feature_space = "given"
    if (train_features is None) != (holdout_features is None):
        raise ValueError("privacy rules: give the features of both the training and the holdout images, or neither")
    train_features = None if train_features is None else np.ascontiguousarray(train_features, dtype=np.float32)
    holdout_features = None if holdout_features is None else np.ascontiguousarray(holdout_features, dtype=np.float32)

    # the holdout against the training split, no rule applied yet: the thresholds come from these values
    raw = _measure(
        holdout,
        holdout_features,
        train,
        train_features,
        metric=privacy.metric,
        memorisation_threshold=privacy.memorisation_threshold,
        pixel_threshold=None,
        feature_threshold=None,
        chunk=chunk,
    )
    q = privacy.holdout_quantile
    pixel_threshold = float(np.quantile(raw.pixel, 1.0 - q if privacy.metric == "correlation" else q))
    feature_threshold = None
    if privacy.features and raw.feature is not None:
        feature_threshold = float(np.quantile(raw.feature, q))
    holdout_check = dataclasses.replace(
        raw,
        pixel_too_close=_too_close(raw.pixel, pixel_threshold, metric=privacy.metric),
        feature_too_close=(
            _too_close(raw.feature, feature_threshold, metric="rms")
            if feature_threshold is not None and raw.feature is not None
            else np.zeros(len(holdout), dtype=bool)
        ),
    )
    rules = PrivacyRules(
        memorisation_threshold=float(privacy.memorisation_threshold),
        quantile=float(q),
        metric=privacy.metric,
        pixel_threshold=pixel_threshold,
        feature_threshold=feature_threshold,
        feature_space=feature_space,
        train_images=train,
        train_features=train_features,
        holdout_images=holdout,
        holdout_features=holdout_features,
        holdout=holdout_check,
        encoder=encoder,
        batch_size=batch_size,
        chunk=chunk,
    )
    if (privacy.metric == "rms" and pixel_threshold < 1e-3) or (privacy.metric == "correlation" and pixel_threshold > 0.999):
        log.warning(
            "privacy rules: some holdout images are near-copies of training images (pixel threshold %.4g), "
            "so the distance rule flags almost nothing; check the splits for the same patient in both",
            pixel_threshold,
        )
    return rules


def as_images(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(N, C, *spatial)`` float32 on the CPU as a contiguous NumPy array (no copy when it already is one).

    Args:
        images: Images or volumes, as a tensor (any device) or an array.

    Returns:
        The array.

    Raises:
        ValueError: If the array does not have 2 or 3 spatial dimensions after batch and channel.
    """
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.ndim not in (4, 5):
        raise ValueError(f"privacy rules: expected (N, C, *spatial) images with 2 or 3 spatial dims, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _measure(
    x: np.ndarray,
    features: np.ndarray | None,
    train: np.ndarray,
    train_features: np.ndarray | None,
    *,
    metric: str,
    memorisation_threshold: float,
    pixel_threshold: float | None,
    feature_threshold: float | None,
    chunk: int,
) -> RuleCheck:
    """Nearness of ``x`` to the training records in every space, with the rules applied (a ``None``
    threshold flags nothing)."""
    correlation, correlation_index = max_normalised_correlation(x, train, chunk=chunk)
    distance, distance_index = nearest_neighbours(x, train, chunk=chunk)
    feature = feature_index = None
    if features is not None and train_features is not None:
        feature, feature_index = nearest_neighbours(features, train_features, chunk=chunk)
    pixel = correlation if metric == "correlation" else distance
    none = np.zeros(len(x), dtype=bool)
    return RuleCheck(
        correlation=correlation,
        correlation_index=correlation_index,
        distance=distance,
        distance_index=distance_index,
        feature=feature,
        feature_index=feature_index,
        features=None if features is None else np.asarray(features, dtype=np.float32),
        metric=metric,
        memorised=correlation > memorisation_threshold,
        pixel_too_close=none if pixel_threshold is None else _too_close(pixel, pixel_threshold, metric=metric),
        feature_too_close=(
            none if feature_threshold is None or feature is None else _too_close(feature, feature_threshold, metric="rms")
        ),
    )


def _loosen(threshold: float, margin: float, *, metric: str) -> float:
    """Move a pixel threshold ``margin`` (relative) towards flagging more: a lower correlation, a larger distance."""
    step = margin * abs(threshold)
    return threshold - step if metric == "correlation" else threshold + step


def _too_close(values: np.ndarray, threshold: float, *, metric: str) -> np.ndarray:
    """Strictly nearer than the threshold: a higher correlation, or a lower distance."""
    return values > threshold if metric == "correlation" else values < threshold
