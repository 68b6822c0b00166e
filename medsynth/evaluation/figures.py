"""A figure of the audit: a number with its direction, meaning and a reference value; and the verdict."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Figure:
    """One audited number.

    Attributes:
        name: ``<group>/<metric>``, for example ``privacy/membership_auc``.
        value: The number.
        better: Which way is better: ``lower``, ``higher``, or a target such as ``0.5`` or
            ``close to reference``.
        meaning: One sentence an auditor can read without the code.
        reference: The same metric computed on real data (or its ideal value), to read ``value`` against.
        headline: Also logged as an MLflow metric of the pipeline run.
    """

    name: str
    value: float
    better: str
    meaning: str
    reference: float | None = None
    headline: bool = False

    def as_json(self) -> dict[str, Any]:
        """The entry of ``metrics.json``."""
        out: dict[str, Any] = {"value": _plain(self.value), "better": self.better, "meaning": self.meaning}
        if self.reference is not None:
            out["reference"] = _plain(self.reference)
        return out


def _plain(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def verdict(figures: Sequence[Figure], limits: Mapping[str, Mapping[str, float | None]]) -> tuple[bool, list[str]]:
    """Check figures against limits; ``None`` limits are skipped.

    Args:
        figures: The computed figures.
        limits: ``{figure name: {"max": x}}`` or ``{"min": x}``; a figure named in ``limits`` but
            not computed is a failure (the audit is incomplete).

    Returns:
        ``(passed, reasons)``: every broken limit as a sentence; empty when passed.
    """
    by_name = {f.name: f for f in figures}
    reasons: list[str] = []
    for name, bounds in limits.items():
        figure = by_name.get(name)
        if figure is None or math.isnan(figure.value):
            reasons.append(f"{name} was not computed")
            continue
        high, low = bounds.get("max"), bounds.get("min")
        if high is not None and figure.value > high:
            reasons.append(f"{name} = {figure.value:.4g} is above the limit {high}")
        if low is not None and figure.value < low:
            reasons.append(f"{name} = {figure.value:.4g} is below the limit {low}")
    return not reasons, reasons
