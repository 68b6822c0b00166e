"""Memorisation: is a synthetic image or label map a near-copy of a training one, up to intensity changes?"""

from __future__ import annotations

import numpy as np
import torch


def _flat(x: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.reshape(t.shape[0], int(np.prod(t.shape[1:]))).to(dtype)


def _flat_pair(
    queries: np.ndarray | torch.Tensor, references: np.ndarray | torch.Tensor, dtype: torch.dtype, *, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets flattened to ``(N, voxels)``, checked to share a size and to hold a reference."""
    q, r = _flat(queries, dtype), _flat(references, dtype)
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"query and reference {what} differ in size: {q.shape[1]} vs {r.shape[1]} voxels")
    if r.shape[0] == 0:
        raise ValueError(f"need at least one reference among the {what}")
    return q, r


def _normalise_rows(x: torch.Tensor) -> torch.Tensor:
    """Zero-mean, unit-norm rows; exactly constant rows become all zeros (correlation 0 with anything)."""
    constant = x.amax(dim=1) == x.amin(dim=1)
    centred = x - x.mean(dim=1, keepdim=True)
    norm = centred.norm(dim=1, keepdim=True)
    out = centred / torch.where(norm > 0, norm, torch.ones_like(norm))
    out[constant | (norm.squeeze(1) == 0)] = 0.0
    return out


def max_normalised_correlation(
    queries: np.ndarray | torch.Tensor, references: np.ndarray | torch.Tensor, *, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Highest Pearson correlation between each query image and any reference image.

    Each image is flattened, centred to zero mean and scaled to unit norm; the correlation of two
    images is then the dot product of these vectors (the normalised cross-correlation at zero
    shift). It ignores brightness and contrast: ``a * x + b`` with ``a > 0`` has correlation 1 with
    ``x``, so it catches copies that a pixel distance misses after an intensity change. An exactly
    constant image has correlation 0 with everything (and its index is then arbitrary, 0).
    Queries are processed in chunks, so memory grows with ``chunk x len(references)``.

    Higher is worse for privacy: 1.0 means an exact copy up to an affine intensity change;
    independent images score near 0. Compare against the values real holdout images get.

    Args:
        queries: ``(N, ...)`` images (e.g. synthetic).
        references: ``(M, ...)`` images of the same shape (e.g. training).
        chunk: Queries per batch.

    Returns:
        ``(correlations, indices)``: for each query, the highest correlation (in ``[-1, 1]``,
        float32) and the index of the reference that attains it.
    """
    q, r = _flat_pair(queries, references, torch.float32, what="images")
    r = _normalise_rows(r)
    best, index = [], []
    for start in range(0, q.shape[0], chunk):
        corr = _normalise_rows(q[start : start + chunk]) @ r.T
        value, where = corr.max(dim=1)
        best.append(value.clamp(-1.0, 1.0))
        index.append(where)
    if not best:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
    return torch.cat(best).numpy(), torch.cat(index).numpy()


def dice_to_nearest_label_map(
    query_labels: np.ndarray | torch.Tensor,
    reference_labels: np.ndarray | torch.Tensor,
    *,
    num_classes: int,
    chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Highest mean foreground Dice between each query label map and any reference label map.

    For a pair of maps, the Dice of each class ``1 .. num_classes - 1`` is ``2 |A & B| / (|A| + |B|)``;
    classes absent from both maps are skipped and the rest averaged (a class present in only one
    map counts as 0). Two maps that are both all background are identical and score 1.0.
    Intersections are computed for all pairs at once as products of one-hot matrices, with queries
    in chunks so memory grows with ``chunk x len(references)`` (plus one float32 copy of the
    references per class, made in turn).

    Higher means closer to copying a reference label map; 1.0 is an exact copy. For privacy,
    synthetic-to-train values should not be systematically higher than holdout-to-train ones.

    Args:
        query_labels: ``(N, ...)`` integer label maps (e.g. those synthetic images were made from).
        reference_labels: ``(M, ...)`` integer label maps of the same shape (e.g. training).
        num_classes: Number of label values including background; values must lie in
            ``[0, num_classes)``.
        chunk: Queries per batch.

    Returns:
        ``(dice, indices)``: for each query, the highest mean Dice (in ``[0, 1]``, float32) and the
        index of the reference that attains it.
    """
    q, r = _flat_pair(query_labels, reference_labels, torch.int64, what="label maps")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    for name, t in (("query_labels", q), ("reference_labels", r)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{name} has values outside [0, {num_classes})")
    ref_sizes = torch.stack([(r == c).sum(dim=1) for c in range(1, num_classes)]).to(torch.float32)  # (C-1, M)
    best, index = [], []
    for start in range(0, q.shape[0], chunk):
        qc = q[start : start + chunk]
        dice_sum = torch.zeros(qc.shape[0], r.shape[0])
        present = torch.zeros(qc.shape[0], r.shape[0])
        for c in range(1, num_classes):
            a = (qc == c).to(torch.float32)
            if not a.any() and not ref_sizes[c - 1].any():
                continue
            intersection = a @ (r == c).to(torch.float32).T
            total = a.sum(dim=1, keepdim=True) + ref_sizes[c - 1][None, :]
            in_either = total > 0
            dice_sum += torch.where(in_either, 2.0 * intersection / total.clamp(min=1.0), 0.0)
            present += in_either
        dice = torch.where(present > 0, dice_sum / present.clamp(min=1.0), 1.0)
        value, where = dice.max(dim=1)
        best.append(value)
        index.append(where)
    if not best:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
    return torch.cat(best).numpy(), torch.cat(index).numpy()
