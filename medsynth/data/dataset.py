"""In-memory datasets of cached records and an endless, reproducible batch stream."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from medsynth import MedsynthError
from medsynth.data.manifest import Manifest, read_record


@dataclasses.dataclass
class LabelledArrays:
    """Images and label maps of one split, stacked.

    Attributes:
        images: ``(N, C, *spatial)`` float32 in [0, 1].
        labels: ``(N, 1, *spatial)`` int64 label values.
        ids: Record id of each row.
        affines: 4x4 affine of each row.
    """

    images: torch.Tensor
    labels: torch.Tensor
    ids: list[str]
    affines: list[np.ndarray]

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_split(manifest: Manifest, split: str) -> LabelledArrays:
    """Load every record of one split into memory, checking each record's hash.

    Args:
        manifest: The dataset manifest.
        split: Split name.

    Returns:
        The stacked arrays.

    Raises:
        MedsynthError: If the split is empty.
    """
    records = manifest.split(split)
    if not records:
        raise MedsynthError(f"the dataset at {manifest.root} has no '{split}' records; check data.splits")
    pairs = [read_record(manifest.root, r) for r in records]
    images = torch.from_numpy(np.stack([p[0] for p in pairs]))
    labels = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
    return LabelledArrays(images, labels, [r.id for r in records], [np.asarray(r.affine) for r in records])


def infinite_batches(
    data: LabelledArrays,
    *,
    batch_size: int,
    generator: torch.Generator,
    flip_dims: Sequence[int] = (),
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield shuffled ``(images, labels)`` batches forever, reshuffling every epoch.

    Args:
        data: The split to draw from.
        batch_size: Examples per batch; capped at the split size.
        generator: Source of randomness for order and flips (reproducible runs).
        flip_dims: Spatial axes (0-based) along which each example is flipped with probability
            0.5, image and label together.

    Returns:
        An endless iterator of batches.
    """
    n = len(data)
    if n == 0 or batch_size < 1:
        raise ValueError(f"need a non-empty dataset and batch_size >= 1, got {n} examples and batch_size {batch_size}")
    batch_size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            images, labels = data.images[idx], data.labels[idx]
            for axis in flip_dims:
                flip = torch.rand(len(idx), generator=generator) < 0.5
                dim = axis + 2
                images = torch.where(_expand(flip, images), images.flip(dim), images)
                labels = torch.where(_expand(flip, labels), labels.flip(dim), labels)
            yield images, labels


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.ndim - 1)))
