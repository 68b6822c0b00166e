"""A figure of the audit: a number with its direction, meaning and a reference value; and the verdict,
group by group (privacy, realism, utility)."""

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
        note: Why the value is missing (NaN), when it is: shown with the verdict's reason.
    """

    name: str
    value: float
    better: str
    meaning: str
    reference: float | None = None
    headline: bool = False
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        """The entry of ``metrics.json``."""
        out: dict[str, Any] = {"value": _plain(self.value), "better": self.better, "meaning": self.meaning}
        if self.reference is not None:
            out["reference"] = _plain(self.reference)
        if self.note:
            out["note"] = self.note
        return out


def _plain(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


GROUPS: tuple[str, ...] = ("privacy", "realism", "utility")
"""The verdict's groups, in the order they are reported; a figure belongs to the group its name starts with."""


@dataclasses.dataclass(frozen=True)
class GroupVerdict:
    """The verdict of one group of limits.

    Attributes:
        name: ``privacy``, ``realism`` or ``utility``.
        passed: Every limit of the group holds (True for a group without limits).
        reasons: Every broken limit of the group, as a sentence.
        limits: The group's limits, ``{figure: {"min"|"max": value}}``.
    """

    name: str
    passed: bool
    reasons: list[str]
    limits: dict[str, dict[str, float]]

    def as_json(self) -> dict[str, Any]:
        """The group's entry of ``metrics.json``."""
        return {"passed": self.passed, "reasons": list(self.reasons), "limits": dict(self.limits)}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The audit's verdict: PASS only when the privacy, realism and utility groups all pass.

    Attributes:
        groups: One :class:`GroupVerdict` per name of :data:`GROUPS`, in that order.
        reasons: Every broken limit, in the order the limits were given.
    """

    groups: dict[str, GroupVerdict]
    reasons: list[str]

    @property
    def passed(self) -> bool:
        """Every group passed."""
        return all(g.passed for g in self.groups.values())

    @property
    def failed_groups(self) -> list[str]:
        """Names of the groups that failed, in :data:`GROUPS` order."""
        return [name for name, g in self.groups.items() if not g.passed]

    def summary(self) -> str:
        """One line: ``PASS`` or ``FAIL (realism, utility): <broken limits>``."""
        if self.passed:
            return "PASS"
        return f"FAIL ({', '.join(self.failed_groups)}): " + "; ".join(self.reasons)

    def as_json(self) -> dict[str, Any]:
        """The ``verdict`` entry of ``metrics.json``: ``passed``, ``failed_groups``, ``reasons`` and
        ``limits`` over all groups (as before groups existed), and one entry per group."""
        limits = {name: bounds for g in self.groups.values() for name, bounds in g.limits.items()}
        return {
            "passed": self.passed,
            "failed_groups": self.failed_groups,
            "reasons": self.reasons,
            "limits": limits,
            **{name: g.as_json() for name, g in self.groups.items()},
        }


def judge(figures: Sequence[Figure], limits: Mapping[str, Mapping[str, float | None]]) -> Verdict:
    """Check figures against limits, group by group; ``None`` bounds are skipped.

    Args:
        figures: The computed figures.
        limits: ``{figure name: {"max": x}}`` or ``{"min": x}`` (or both); the group of a limit is
            the prefix of the figure's name. A figure named in ``limits`` but not computed (or
            NaN) fails its group: the audit of that group is incomplete.

    Returns:
        The verdict, with a :class:`GroupVerdict` for each of :data:`GROUPS`.

    Raises:
        ValueError: For a limit whose figure name does not start with one of :data:`GROUPS`.
    """
    by_name = {f.name: f for f in figures}
    reasons: dict[str, list[str]] = {g: [] for g in GROUPS}
    ordered: list[str] = []
    grouped: dict[str, dict[str, dict[str, float]]] = {g: {} for g in GROUPS}
    for name, bounds in limits.items():
        group = name.split("/", 1)[0]
        if group not in GROUPS:
            raise ValueError(f"limit {name!r}: a figure name must start with one of {list(GROUPS)}")
        grouped[group][name] = {k: float(v) for k, v in bounds.items() if v is not None}
        broken = _broken(by_name.get(name), name, bounds)
        reasons[group] += broken
        ordered += broken
    return Verdict({g: GroupVerdict(g, not reasons[g], reasons[g], grouped[g]) for g in GROUPS}, ordered)


def _broken(figure: Figure | None, name: str, bounds: Mapping[str, float | None]) -> list[str]:
    """The limits of ``bounds`` that ``figure`` breaks, as sentences (a missing or NaN figure breaks them all)."""
    if figure is None or math.isnan(figure.value):
        return [f"{name} was not computed" + (f" ({figure.note})" if figure is not None and figure.note else "")]
    out = []
    high, low = bounds.get("max"), bounds.get("min")
    if high is not None and figure.value > high:
        out.append(f"{name} = {figure.value:.4g} is above the limit {high}")
    if low is not None and figure.value < low:
        out.append(f"{name} = {figure.value:.4g} is below the limit {low}")
    return out


def verdict(figures: Sequence[Figure], limits: Mapping[str, Mapping[str, float | None]]) -> tuple[bool, list[str]]:
    """Check figures against limits; ``None`` limits are skipped (:func:`judge` without the groups).

    Args:
        figures: The computed figures.
        limits: ``{figure name: {"max": x}}`` or ``{"min": x}``; a figure named in ``limits`` but
            not computed is a failure (the audit is incomplete).

    Returns:
        ``(passed, reasons)``: every broken limit as a sentence; empty when passed.
    """
    result = judge(figures, limits)
    return result.passed, result.reasons
