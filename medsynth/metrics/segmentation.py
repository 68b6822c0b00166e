"""Agreement of label maps: the basis of label-consistency and utility figures."""

from __future__ import annotations

import numpy as np
import torch


def dice_per_class(prediction: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, *, num_classes: int) -> np.ndarray:
    """Dice of each foreground class, pooled over a whole set of label maps.

    ``Dice_c = 2 |P_c & T_c| / (|P_c| + |T_c|)`` with the voxel counts summed over every map in
    the set, so small structures in single images do not dominate. 1 is perfect agreement, 0 none;
    higher is better. A class absent from both prediction and target gets NaN (nothing to score).

    Args:
        prediction: ``(N, ...)`` integer label maps.
        target: ``(N, ...)`` integer label maps of the same shape.
        num_classes: Number of label values including background (value 0, not scored).

    Returns:
        ``(num_classes - 1,)`` Dice per class 1..num_classes-1.
    """
    p = torch.as_tensor(np.asarray(prediction)).long().reshape(-1)
    t = torch.as_tensor(np.asarray(target)).long().reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"prediction and target differ in size: {p.numel()} vs {t.numel()} voxels")
    out = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        pc, tc = p == c, t == c
        total = int(pc.sum() + tc.sum())
        if total:
            out[c - 1] = 2.0 * int((pc & tc).sum()) / total
    return out


def mean_dice(prediction: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, *, num_classes: int) -> float:
    """Mean of :func:`dice_per_class` over the classes present; higher is better, 1 is perfect."""
    values = dice_per_class(prediction, target, num_classes=num_classes)
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")
