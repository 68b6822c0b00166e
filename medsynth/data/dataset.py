"""In-memory datasets of cached records and an endless, reproducible batch stream."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from medsynth import MedsynthError
from medsynth.data.manifest import Manifest, Record, read_record


@dataclasses.dataclass
class LabelledArrays:
    """Images and label maps of one split, stacked.

    Attributes:
        images: ``(N, C, *spatial)`` float32 in [0, 1].
        labels: ``(N, 1, *spatial)`` int64 label values.
        ids: Record id of each row.
        affines: 4x4 affine of each row.
        codes: ``(N, A)`` int64 attribute codes (see :func:`attribute_codes`); ``A = 0`` without a vocabulary.
    """

    images: torch.Tensor
    labels: torch.Tensor
    ids: list[str]
    affines: list[np.ndarray]
    codes: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.long))

    def __post_init__(self) -> None:
        if self.codes.shape[0] != self.images.shape[0]:
            self.codes = torch.zeros(self.images.shape[0], self.codes.shape[1] if self.codes.ndim == 2 else 0, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def attribute_codes(records: Sequence[Record], vocabulary: Mapping[str, Sequence[str]]) -> torch.Tensor:
    """Each record's attributes as integer codes: column ``k`` holds the index of the record's value
    of the ``k``-th vocabulary attribute, or ``len(values)`` ("not given") when the record lacks it.

    Raises:
        MedsynthError: If a record has a value the vocabulary does not know.
    """
    rows = []
    for r in records:
        row = []
        for key, values in vocabulary.items():
            value = r.attributes.get(key)
            if value is not None and str(value) not in values:
                raise MedsynthError(f"record {r.id}: attribute {key}={value!r} is not in the model's vocabulary {list(values)}")
            row.append(list(values).index(str(value)) if value is not None else len(values))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long).reshape(len(records), len(vocabulary))


def load_split(
    manifest: Manifest, split: str, *, vocabulary: Mapping[str, Sequence[str]] | None = None, limit: int | None = None
) -> LabelledArrays:
    """Load every record of one split into memory, checking each record's hash.

    Args:
        manifest: The dataset manifest.
        split: Split name.
        vocabulary: Attributes to encode as ``codes`` (name -> values), for conditioned models.
        limit: Load at most this many records, evenly spaced over the split (the first always among
            them); ``None``: all.

    Returns:
        The stacked arrays.

    Raises:
        MedsynthError: If the split is empty.
    """
    records = manifest.split(split)
    if not records:
        raise MedsynthError(f"the dataset at {manifest.root} has no '{split}' records; check data.splits")
    if limit is not None and len(records) > limit:
        records = [records[i] for i in np.unique(np.linspace(0, len(records) - 1, limit).round().astype(int))]
    pairs = [read_record(manifest.root, r) for r in records]
    images = torch.from_numpy(np.stack([p[0] for p in pairs]))
    labels = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
    codes = attribute_codes(records, vocabulary or {})
    return LabelledArrays(images, labels, [r.id for r in records], [np.asarray(r.affine) for r in records], codes)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator fixed by ``(seed, step, stream)`` alone, so a resumed run draws what the original would have."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1))


def batch_draws(
    n: int,
    *,
    batch_size: int,
    seed: int,
    flip_dims: Sequence[int] = (),
    start_step: int = 0,
) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Which examples each step takes and which of them it flips, forever: ``(indices, flips)``.

    The draw of step ``k`` depends only on ``seed`` and ``k``: each epoch's order comes from a
    generator seeded by the epoch, each step's flips from one seeded by the step, so a run resumed
    at ``start_step`` sees exactly the batches the uninterrupted run would have seen.

    Args:
        n: Examples in the split (at least 1).
        batch_size: Examples per step (at least 1); capped at ``n``.
        seed: Seed of the stream.
        flip_dims: Spatial axes (0-based); each example is flipped along each with probability 0.5.
        start_step: Index of the first step to yield.

    Returns:
        An endless iterator of ``(indices, flips)``: ``flips[i]`` is a boolean ``(batch,)`` mask
        for ``flip_dims[i]``.
    """
    if n == 0 or batch_size < 1:
        raise ValueError(f"need a non-empty dataset and batch_size >= 1, got {n} examples and batch_size {batch_size}")
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size
    step = start_step
    while True:
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(n, generator=step_generator(seed, epoch, stream=1))
        idx = order[position * batch_size : (position + 1) * batch_size]
        draws = step_generator(seed, step, stream=2)
        yield idx, [torch.rand(len(idx), generator=draws) < 0.5 for _ in flip_dims]
        step += 1


def flip_where(x: torch.Tensor, flip: torch.Tensor, axis: int) -> torch.Tensor:
    """``x`` (``(N, C, *spatial)``) with the examples where ``flip`` is true flipped along spatial ``axis``."""
    return torch.where(_expand(flip, x), x.flip(axis + 2), x)


def infinite_batches(
    data: LabelledArrays,
    *,
    batch_size: int,
    seed: int,
    flip_dims: Sequence[int] = (),
    start_step: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield shuffled ``(images, labels, codes)`` batches forever, a new order every epoch.

    Which examples a step takes and which it flips is :func:`batch_draws`, so the batch of step
    ``k`` depends only on ``seed`` and ``k``, and a resumed run sees the batches of the
    uninterrupted one.

    Args:
        data: The split to draw from.
        batch_size: Examples per batch; capped at the split size.
        seed: Seed of the stream.
        flip_dims: Spatial axes (0-based) along which each example is flipped with probability
            0.5, image and label together.
        start_step: Index of the first batch to yield (0 = from the beginning).

    Returns:
        An endless iterator of batches.
    """
    for idx, flips in batch_draws(len(data), batch_size=batch_size, seed=seed, flip_dims=flip_dims, start_step=start_step):
        images, labels, codes = data.images[idx], data.labels[idx], data.codes[idx]
        for axis, flip in zip(flip_dims, flips):
            images, labels = flip_where(images, flip, axis), flip_where(labels, flip, axis)
        yield images, labels, codes


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.ndim - 1)))
