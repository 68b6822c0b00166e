"""The privacy gate of generation: reject a candidate that breaks any of the audit's per-sample privacy rules.

The rules live in :mod:`medsynth.evaluation.rules` (memorised: correlation with a training image
above ``privacy.memorisation_threshold``; too close: nearer to a training record than the
``privacy.holdout_quantile`` of real holdout records are, in pixel space and in the dataset
encoder's feature space). The gate calibrates them exactly as the audit does, on the same splits
with the same encoder, and applies them with a tiny safety margin (:data:`GATE_MARGIN`), so a
sample it accepts cannot be counted by the audit. The caller draws a replacement for a rejected
candidate.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from medsynth.config.settings import PrivacySettings
from medsynth.evaluation.rules import PIXEL_METRICS, RULES, PrivacyRules, RuleCheck, calibrate_rules

log = logging.getLogger("medsynth")

__all__ = ["GATE_MARGIN", "PIXEL_METRICS", "GateResult", "PrivacyGate", "build_privacy_gate"]

GATE_MARGIN = 1e-4
"""Relative margin by which the gate applies each threshold more strictly than the audit: the audit
measures the same samples in other batches and chunks, which changes distances and features by
float rounding (about 1e-6), never by this much."""

GateResult = RuleCheck
"""The gate's decision on a batch of candidates: per-candidate nearness, rule flags and ``accepted``."""


@dataclasses.dataclass(frozen=True, eq=False)
class PrivacyGate:
    """The calibrated rules, applied to candidates.

    Build it with :func:`build_privacy_gate`.

    Attributes:
        rules: The per-sample rules, calibrated on this dataset's training and holdout splits.
        margin: Relative safety margin on every threshold (:data:`GATE_MARGIN`).
        rejections: Candidates :meth:`check` found breaking each rule (:data:`RULES`; a candidate
            breaking two counts under both), for the stage's log.
    """

    rules: PrivacyRules
    margin: float = GATE_MARGIN
    rejections: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(RULES, 0))

    @property
    def metric(self) -> str:
        """Pixel-space nearness of the distance rule."""
        return self.rules.metric

    @property
    def quantile(self) -> float:
        """Share of real holdout images that count as too close."""
        return self.rules.quantile

    @property
    def memorisation_threshold(self) -> float:
        """Correlation above which a candidate counts as memorised."""
        return self.rules.memorisation_threshold

    @property
    def pixel_threshold(self) -> float:
        """Pixel-space threshold of the distance rule."""
        return self.rules.pixel_threshold

    @property
    def feature_threshold(self) -> float | None:
        """Feature-space threshold of the distance rule, ``None`` when that rule is off."""
        return self.rules.feature_threshold

    @property
    def feature_space(self) -> str:
        """How features are made (``none`` without an encoder)."""
        return self.rules.feature_space

    @property
    def references(self) -> np.ndarray:
        """``(M, C, *spatial)`` the training images candidates are compared with."""
        return self.rules.train_images

    @property
    def reference_features(self) -> np.ndarray | None:
        """``(M, D)`` their features, or ``None``."""
        return self.rules.train_features

    @property
    def encoder(self) -> nn.Module | None:
        """The feature encoder, or ``None``."""
        return self.rules.encoder

    @property
    def num_holdout(self) -> int:
        """Holdout images the thresholds were set from."""
        return len(self.rules.holdout_images)

    def check(self, images: torch.Tensor | np.ndarray) -> GateResult:
        """Measure candidates against the training records and decide which pass.

        Args:
            images: ``(N, C, *spatial)`` candidates in [0, 1], shaped like the training images
                (any device).

        Returns:
            Per-candidate nearness in each space, the nearest training indices, the rules each
            breaks, and ``accepted``: True when it breaks none.

        Raises:
            ValueError: If the candidates are not shaped like the training images.
        """
        result = self.rules.measure(images, margin=self.margin)
        for rule, n in result.counts().items():
            if rule in self.rejections:
                self.rejections[rule] += n
        return result

    def explain(self, check: GateResult) -> str:
        """The nearest of the rejected candidates of ``check`` against each rule's threshold, in one phrase.

        Args:
            check: A result of :meth:`check`.

        Returns:
            For example ``nearest pixel RMS 0.0121 (too close below 0.034), highest correlation 0.961
            (memorised above 0.95)``: per rule, the most extreme value among the rejected candidates
            and the threshold it is held against; ``""`` when none was rejected.
        """
        rejected = ~np.asarray(check.accepted, dtype=bool)
        if not rejected.any():
            return ""
        rms = self.metric == "rms"
        pixel = np.asarray(check.pixel)[rejected]
        parts = [
            f"nearest pixel {'RMS' if rms else 'correlation'} {(pixel.min() if rms else pixel.max()):.4g} "
            f"(too close {'below' if rms else 'above'} {self.pixel_threshold:.4g})",
            f"highest correlation {np.asarray(check.correlation)[rejected].max():.4g} "
            f"(memorised above {self.memorisation_threshold:.4g})",
        ]
        if check.feature is not None and self.feature_threshold is not None:
            parts.append(
                f"nearest feature distance {np.asarray(check.feature)[rejected].min():.4g} "
                f"(too close below {self.feature_threshold:.4g})"
            )
        return ", ".join(parts)

    def preview(self, images: torch.Tensor | np.ndarray) -> dict[str, float]:
        """The audit's aggregate privacy figures over an exported set, measured as the audit measures them.

        Args:
            images: ``(N, C, *spatial)`` the exported samples.

        Returns:
            ``closer_to_train_fraction_pixel`` (and ``_feature`` with features): share of samples
            nearer to a training record than to any holdout record (0.5 ideal, higher = nearer the
            training data); ``rule_violations_count``: exported samples that break a rule without
            the gate's margin (0 unless the rules changed since the samples were accepted).
        """
        check = self.rules.measure(images)
        out = {f"closer_to_train_fraction_{space}": value for space, value in self.rules.closer_to_train(images, check).items()}
        out["rule_violations_count"] = float(check.num_rejected)
        return out

    def describe(self) -> dict[str, Any]:
        """The gate's rules and thresholds as flat values, for the synthetic manifest and MLflow params.

        Returns:
            :meth:`medsynth.evaluation.rules.PrivacyRules.describe`, with ``method`` saying that
            candidates breaking a rule are rejected.
        """
        described = self.rules.describe()
        described["method"] = "reject a candidate that breaks a rule: " + described["method"]
        return described


def build_privacy_gate(
    train_images: torch.Tensor | np.ndarray,
    holdout_images: torch.Tensor | np.ndarray,
    *,
    encoder: nn.Module | None,
    privacy: PrivacySettings | None = None,
    batch_size: int = 256,
    chunk: int = 512,
    device: torch.device | str | None = None,
) -> PrivacyGate:
    """Calibrate the per-sample rules on the holdout-to-train nearness and wrap them as a gate.

    Args:
        train_images: ``(M, C, *spatial)`` training images in [0, 1]: the records to protect.
        holdout_images: ``(H, C, *spatial)`` real holdout images in [0, 1], never trained on.
        encoder: The dataset's feature encoder (a 2D encoder is applied per slice to volumes, the
            2.5D protocol; an encoder with 3D convolutions to whole volumes); ``None`` gates in
            pixel space only.
        privacy: The rules' settings (``conf/privacy``; default: its defaults).
        batch_size: Images per encoder batch.
        chunk: Queries per nearest-neighbour block (memory grows with ``chunk x M``).
        device: Where to run the encoder (default: where it is).

    Returns:
        The gate.

    Raises:
        ConfigError: If ``privacy.metric`` is not allowed.
        MedsynthError: If the training or holdout set is empty, or their shapes differ.
    """
    rules = calibrate_rules(
        train_images,
        holdout_images,
        privacy=privacy or PrivacySettings(),
        encoder=encoder,
        batch_size=batch_size,
        chunk=chunk,
        device=device,
    )
    gate = PrivacyGate(rules)
    log.info("privacy gate: %s", gate.describe()["method"])
    return gate
