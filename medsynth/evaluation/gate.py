"""The privacy gate of generation: reject a candidate that sits closer to a training record than real unseen patients do.

The gate measures, for every real holdout image, how near its nearest training record is, in
pixel space and in the feature space of the evaluation's encoder, with the same functions the
evaluation uses (:func:`medsynth.metrics.nearest_neighbours`, and optionally
:func:`medsynth.metrics.max_normalised_correlation` in pixel space, and the encoder features of
:func:`medsynth.evaluation.instruments.features`). The ``quantile`` of those
holdout values is the threshold: with ``quantile=0.01``, a real patient the model never saw is
that close to a training record only 1% of the time. A synthetic candidate closer than that in
either space is rejected; the caller draws a replacement.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from medsynth import ConfigError, MedsynthError
from medsynth.metrics import max_normalised_correlation, nearest_neighbours
from medsynth.evaluation import instruments

log = logging.getLogger("medsynth")

PIXEL_METRICS = ("rms", "correlation")
"""``rms``: root-mean-square intensity distance (lower = closer), as the evaluation's nearest-neighbour
figures; ``correlation``: highest normalised correlation (higher = closer, blind to brightness and
contrast), as the evaluation's memorisation figures."""

CONFIG_KEY = "generate.privacy_gate"
"""Where the pipeline keeps the gate's options; named in error messages."""


@dataclasses.dataclass(frozen=True, eq=False)
class GateResult:
    """The gate's decision on a batch of candidates.

    Attributes:
        pixel: ``(N,)`` nearness of each candidate to its nearest training image in pixel space:
            an RMS distance (lower = closer) for the ``rms`` metric, a correlation (higher = closer)
            for ``correlation``.
        pixel_index: ``(N,)`` index of that training image.
        feature: ``(N,)`` RMS distance of each candidate's encoder features to the nearest training
            record's features (lower = closer); ``None`` when the gate has no encoder.
        feature_index: ``(N,)`` index of that training record, or ``None``.
        pixel_too_close: ``(N,)`` closer than the pixel threshold.
        feature_too_close: ``(N,)`` closer than the feature threshold (all False without an encoder).
        accepted: ``(N,)`` neither too close in pixel space nor in feature space.
    """

    pixel: np.ndarray
    pixel_index: np.ndarray
    feature: np.ndarray | None
    feature_index: np.ndarray | None
    pixel_too_close: np.ndarray
    feature_too_close: np.ndarray
    accepted: np.ndarray

    @property
    def num_rejected(self) -> int:
        """Number of candidates rejected."""
        return int(np.sum(~self.accepted))


@dataclasses.dataclass(frozen=True, eq=False)
class PrivacyGate:
    """Thresholds calibrated on the holdout, and the training references to check candidates against.

    Build it with :func:`build_privacy_gate`. Memory is linear in the number of training records:
    their images (float32), their features, and one ``chunk x records`` block of distances while
    checking.

    Attributes:
        metric: Pixel-space nearness, one of :data:`PIXEL_METRICS`.
        quantile: Share of real holdout images that count as "too close" to a training record.
        pixel_threshold: Pixel-space threshold: a candidate with an RMS distance below it (``rms``)
            or a correlation above it (``correlation``) is rejected.
        feature_threshold: Feature-space RMS distance below which a candidate is rejected; ``None``
            without an encoder.
        feature_space: How features are made: ``none``, ``2d`` (2D encoder on 2D images), ``2.5d``
            (2D encoder on the orthogonal slices of volumes, each plane's mean slice feature
            concatenated, as the evaluation does) or ``3d`` (3D encoder on volumes).
        references: ``(M, C, *spatial)`` training images, float32.
        reference_features: ``(M, D)`` their features, or ``None``.
        encoder: The feature encoder, or ``None``.
        num_holdout: Holdout images the thresholds were set from.
        batch_size: Images per encoder batch.
        chunk: Candidates per nearest-neighbour block.
    """

    metric: str
    quantile: float
    pixel_threshold: float
    feature_threshold: float | None
    feature_space: str
    references: np.ndarray = dataclasses.field(repr=False)
    reference_features: np.ndarray | None = dataclasses.field(repr=False)
    encoder: nn.Module | None = dataclasses.field(repr=False)
    num_holdout: int
    batch_size: int = 256
    chunk: int = 512

    def check(self, images: torch.Tensor | np.ndarray) -> GateResult:
        """Compare candidates with the training records and decide which pass.

        Args:
            images: ``(N, C, *spatial)`` candidates in [0, 1], shaped like the training images
                (any device).

        Returns:
            Per-candidate nearness in each space, the nearest training index, and ``accepted``:
            False when the candidate is closer to a training record than the threshold in
            either space.

        Raises:
            ValueError: If the candidates are not shaped like the training images.
        """
        x = _as_array(images)
        if x.shape[1:] != self.references.shape[1:]:
            raise ValueError(f"privacy gate: candidates have shape {x.shape[1:]}, the training records {self.references.shape[1:]}")
        pixel, pixel_index = _pixel_nearness(x, self.references, metric=self.metric, chunk=self.chunk)
        pixel_too_close = _too_close(pixel, self.pixel_threshold, metric=self.metric)
        feature = feature_index = None
        feature_too_close = np.zeros(len(x), dtype=bool)
        if self.encoder is not None and self.reference_features is not None and self.feature_threshold is not None:
            features = instruments.features(self.encoder, x, batch_size=self.batch_size).items
            feature, feature_index = nearest_neighbours(features, self.reference_features, chunk=self.chunk)
            feature_too_close = _too_close(feature, self.feature_threshold, metric="rms")
        return GateResult(pixel=pixel, pixel_index=pixel_index, feature=feature, feature_index=feature_index,
                          pixel_too_close=pixel_too_close, feature_too_close=feature_too_close,
                          accepted=~(pixel_too_close | feature_too_close))

    def describe(self) -> dict[str, Any]:
        """The gate's method and thresholds as flat values, for the synthetic manifest and MLflow params.

        Returns:
            ``method`` (one sentence), ``metric``, ``quantile``, ``pixel_threshold``, ``feature_space``,
            ``feature_threshold`` (``None`` without an encoder), ``num_references`` and ``num_holdout``.
        """
        pixel_rule = (f"pixel RMS distance below {self.pixel_threshold:.4g}" if self.metric == "rms"
                      else f"pixel normalised correlation above {self.pixel_threshold:.4g}")
        feature_rule = (f" or encoder-feature ({self.feature_space}) RMS distance below {self.feature_threshold:.4g}"
                        if self.feature_threshold is not None else "")
        return {
            "method": (f"reject a candidate whose nearest training record is nearer than the closest {self.quantile:.3g} "
                       f"of holdout records are: {pixel_rule}{feature_rule}"),
            "metric": self.metric,
            "quantile": self.quantile,
            "pixel_threshold": self.pixel_threshold,
            "feature_space": self.feature_space,
            "feature_threshold": self.feature_threshold,
            "num_references": int(len(self.references)),
            "num_holdout": self.num_holdout,
        }


def build_privacy_gate(
    train_images: torch.Tensor | np.ndarray,
    holdout_images: torch.Tensor | np.ndarray,
    *,
    encoder: nn.Module | None,
    quantile: float = 0.01,
    metric: str = "rms",
    batch_size: int = 256,
    chunk: int = 512,
    device: torch.device | str | None = None,
) -> PrivacyGate:
    """Calibrate a :class:`PrivacyGate` on the holdout-to-train nearest-neighbour distances.

    For each holdout image the nearest training image is found in pixel space (RMS distance, or
    normalised correlation with ``metric="correlation"``) and, with an encoder, in feature space
    (RMS distance of encoder features, as the evaluation's feature-space privacy figures). The
    thresholds are the ``quantile`` of the holdout distances (the ``1 - quantile`` quantile of the
    correlations), so about ``quantile`` of real unseen images would be rejected in each space.

    Args:
        train_images: ``(M, C, *spatial)`` training images in [0, 1]: the records to protect.
        holdout_images: ``(H, C, *spatial)`` real holdout images in [0, 1], never trained on.
        encoder: The evaluation's feature encoder (a 2D encoder is applied per slice to volumes,
            the 2.5D protocol; an encoder with 3D convolutions to whole volumes); ``None`` gates
            in pixel space only.
        quantile: Share of holdout images that count as too close, in (0, 0.5].
        metric: Pixel-space nearness: ``rms`` or ``correlation`` (see :data:`PIXEL_METRICS`).
        batch_size: Images per encoder batch.
        chunk: Queries per nearest-neighbour block (memory grows with ``chunk x M``).
        device: Where to run the encoder (default: where it is).

    Returns:
        The gate.

    Raises:
        ConfigError: If ``quantile`` or ``metric`` is not allowed.
        MedsynthError: If the training or holdout set is empty, or their shapes differ.
    """
    if not 0.0 < quantile <= 0.5:
        raise ConfigError(f"{CONFIG_KEY}.quantile must be in (0, 0.5] (the share of real holdout images "
                          f"counted as too close), got {quantile}")
    if metric not in PIXEL_METRICS:
        raise ConfigError(f"{CONFIG_KEY}.metric must be one of {list(PIXEL_METRICS)}, got {metric!r}")
    references, holdout = _as_array(train_images), _as_array(holdout_images)
    if len(references) == 0:
        raise MedsynthError("privacy gate: the training split is empty, so there is nothing to compare candidates with")
    if len(holdout) == 0:
        raise MedsynthError(
            "privacy gate: the dataset's holdout split is empty, and the gate sets its threshold from holdout images; "
            f"preprocess with a holdout split or set {CONFIG_KEY}.enabled=false"
        )
    if references.shape[1:] != holdout.shape[1:]:
        raise MedsynthError(f"privacy gate: training images have shape {references.shape[1:]}, holdout images {holdout.shape[1:]}")
    pixel, _ = _pixel_nearness(holdout, references, metric=metric, chunk=chunk)
    pixel_threshold = float(np.quantile(pixel, 1.0 - quantile if metric == "correlation" else quantile))
    feature_space, reference_features, feature_threshold = "none", None, None
    if encoder is not None:
        if device is not None:
            encoder = encoder.to(device)
        encoder = encoder.eval()
        reference = instruments.features(encoder, references, batch_size=batch_size)
        feature_space, reference_features = reference.space, reference.items
        holdout_features = instruments.features(encoder, holdout, batch_size=batch_size).items
        feature, _ = nearest_neighbours(holdout_features, reference_features, chunk=chunk)
        feature_threshold = float(np.quantile(feature, quantile))
    gate = PrivacyGate(metric=metric, quantile=float(quantile), pixel_threshold=pixel_threshold,
                       feature_threshold=feature_threshold, feature_space=feature_space, references=references,
                       reference_features=reference_features, encoder=encoder, num_holdout=len(holdout),
                       batch_size=batch_size, chunk=chunk)
    if (metric == "rms" and pixel_threshold < 1e-3) or (metric == "correlation" and pixel_threshold > 0.999):
        log.warning("privacy gate: some holdout images are near-copies of training images (pixel threshold %.4g), "
                    "so the gate rejects almost nothing; check the splits for the same patient in both", pixel_threshold)
    log.info("privacy gate: %s", gate.describe()["method"])
    return gate


def _as_array(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(N, C, *spatial)`` float32 on the CPU, as a NumPy array (no copy when it already is one)."""
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.ndim not in (4, 5):
        raise ValueError(f"privacy gate: expected (N, C, *spatial) images with 2 or 3 spatial dims, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _pixel_nearness(queries: np.ndarray, references: np.ndarray, *, metric: str, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearness of each query to its nearest reference, and that reference's index, with the evaluation's functions."""
    if metric == "correlation":
        return max_normalised_correlation(queries, references, chunk=chunk)
    return nearest_neighbours(queries, references, chunk=chunk)


def _too_close(values: np.ndarray, threshold: float, *, metric: str) -> np.ndarray:
    """Strictly nearer than the threshold: a higher correlation, or a lower distance."""
    return values > threshold if metric == "correlation" else values < threshold

