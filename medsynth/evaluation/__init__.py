"""The audit of a synthetic set: realism, privacy and utility figures, a verdict, and the report."""

from __future__ import annotations

from medsynth.evaluation.audit import AuditSet, privacy_figures, realism_figures, utility_figures
from medsynth.evaluation.figures import Figure, verdict
from medsynth.evaluation.report import render_report

__all__ = ["AuditSet", "Figure", "privacy_figures", "realism_figures", "render_report", "utility_figures", "verdict"]
