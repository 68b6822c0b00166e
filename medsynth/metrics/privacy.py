"""Privacy: is any synthetic image a near-copy of a training image?"""

from __future__ import annotations

import numpy as np
import torch


def nearest_neighbours(
    queries: np.ndarray | torch.Tensor, references: np.ndarray | torch.Tensor, *, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each query image to its nearest reference image, in pixel space.

    The distance is the root-mean-square intensity difference (L2 norm divided by the square
    root of the number of voxels), so it is comparable across image sizes: 0 means an exact
    copy (up to float32 rounding, about 1e-4); on [0, 1] images, 0.1 means a typical voxel differs by about 10% of the range.
    Queries are processed in chunks, so memory grows with ``chunk x len(references)``, not with
    ``len(queries) x len(references)``.

    Lower means closer to a reference; for privacy, synthetic-to-train distances should not be
    systematically lower than holdout-to-train distances.

    Args:
        queries: ``(N, ...)`` images.
        references: ``(M, ...)`` images of the same shape.
        chunk: Queries per batch.

    Returns:
        ``(distances, indices)``: for each query, the smallest distance and the index of the
        reference that attains it.
    """
    q = torch.as_tensor(np.asarray(queries), dtype=torch.float32).reshape(len(queries), -1)
    r = torch.as_tensor(np.asarray(references), dtype=torch.float32).reshape(len(references), -1)
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"queries and references differ in size: {q.shape[1]} vs {r.shape[1]} voxels")
    scale = float(q.shape[1]) ** 0.5
    dists, idxs = [], []
    for start in range(0, q.shape[0], chunk):
        d = torch.cdist(q[start : start + chunk], r)
        best, index = d.min(dim=1)
        dists.append(best / scale)
        idxs.append(index)
    return torch.cat(dists).numpy(), torch.cat(idxs).numpy()


def closer_to_train_fraction(
    to_train: np.ndarray, to_holdout: np.ndarray, *, train_size: int | None = None, holdout_size: int | None = None
) -> float:
    """Fraction of synthetic samples whose nearest training image is nearer than their nearest holdout image.

    If the generator learnt the population rather than the training images, a synthetic image
    is as likely to be near a holdout image as near a training image, and the fraction is about
    0.5 for train and holdout sets of equal size. Values towards 1 mean the samples sit closer to
    the training data than new patients do: a sign of memorisation.

    With sets of different sizes, a sample of the population has its nearest record in the
    training set with probability ``n / (n + h)``: the larger set simply has more records near it.
    Give ``train_size`` and ``holdout_size`` to compare the sets per record instead: with ``f`` the
    raw fraction, the figure is ``(f / n) / (f / n + (1 - f) / h)``, the share of "nearest record"
    hits a training record gets against a holdout record. It is 0.5 for a generator of the
    population whatever the split sizes, 1 when every sample is nearest to a training record, and
    equals the raw fraction when ``n == h``.

    0.5 is ideal; higher is worse.

    Args:
        to_train: Distance of each synthetic sample to its nearest training image.
        to_holdout: Distance of each synthetic sample to its nearest holdout image.
        train_size: Number of training records the distances were taken to.
        holdout_size: Number of holdout records.

    Returns:
        The fraction in [0, 1].
    """
    to_train, to_holdout = np.asarray(to_train), np.asarray(to_holdout)
    if to_train.shape != to_holdout.shape or to_train.size == 0:
        raise ValueError("need equally long, non-empty distance arrays")
    fraction = float(np.mean(to_train < to_holdout))
    if train_size is None and holdout_size is None:
        return fraction
    if not train_size or not holdout_size or train_size < 1 or holdout_size < 1:
        raise ValueError(f"set sizes must both be positive, got train_size={train_size}, holdout_size={holdout_size}")
    per_train, per_holdout = fraction / train_size, (1.0 - fraction) / holdout_size
    return per_train / (per_train + per_holdout)
