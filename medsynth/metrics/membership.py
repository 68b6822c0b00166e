"""Membership inference: can an attacker tell training images from unseen ones by a score?

The score is anything an attacker can compute per image (e.g. the negative reconstruction or
denoising loss, or the similarity to the nearest synthetic image), oriented so that a HIGHER
score means "more likely a training member".
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import rankdata


def _scores(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    v = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.float64).ravel()
    if v.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains non-finite values")
    return v


def roc_auc(member_scores: np.ndarray | torch.Tensor, nonmember_scores: np.ndarray | torch.Tensor) -> float:
    """Area under the ROC curve of a membership-inference attack.

    The probability that a randomly chosen member gets a higher score than a randomly chosen
    non-member, ties counting one half (the Mann-Whitney U statistic divided by the number of
    pairs), computed from ranks.

    0.5 is ideal for privacy (the attack is no better than chance); higher is worse, 1.0 means the
    scores separate members from non-members perfectly. Values well below 0.5 mean the score is
    informative but oriented the wrong way.

    Args:
        member_scores: Attack scores of training members, any shape (flattened).
        nonmember_scores: Attack scores of non-members (e.g. holdout), any shape (flattened).

    Returns:
        The AUC, in ``[0, 1]``.
    """
    members = _scores(member_scores, "member_scores")
    nonmembers = _scores(nonmember_scores, "nonmember_scores")
    n_members, n_nonmembers = members.size, nonmembers.size
    ranks = rankdata(np.concatenate([members, nonmembers]))  # average ranks: ties count half
    u = ranks[:n_members].sum() - n_members * (n_members + 1) / 2.0
    return float(u / (n_members * n_nonmembers))


def tpr_at_fpr(
    member_scores: np.ndarray | torch.Tensor, nonmember_scores: np.ndarray | torch.Tensor, *, fpr: float = 0.01
) -> float:
    """True-positive rate of a membership-inference attack at a low false-positive rate.

    The attack flags every image whose score is strictly above a threshold; the threshold is the
    lowest non-member score that at most ``fpr`` of the non-members exceed (the
    ``floor(fpr * n) + 1``-th highest non-member score). The result is the fraction of members
    flagged. This reflects how confidently *some* members can be identified, which the AUC averages
    away. With few non-members the achievable false-positive rates are coarse (multiples of
    ``1 / n``); use at least ``1 / fpr`` non-members.

    Lower is better; about ``fpr`` for an attack no better than chance, 1.0 for a perfect one.

    Args:
        member_scores: Attack scores of training members, any shape (flattened).
        nonmember_scores: Attack scores of non-members, any shape (flattened).
        fpr: Largest allowed fraction of non-members flagged, in ``[0, 1]``.

    Returns:
        The fraction of members flagged, in ``[0, 1]``.
    """
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    members = _scores(member_scores, "member_scores")
    nonmembers = np.sort(_scores(nonmember_scores, "nonmember_scores"))[::-1]
    allowed = math.floor(round(fpr * nonmembers.size, 9))  # round: 0.29 * 100 must give 29, not 28
    if allowed >= nonmembers.size:
        return 1.0
    threshold = nonmembers[allowed]
    return float(np.mean(members > threshold))
