"""Split assignment: whole patients to splits, or slices of one volume in contiguous blocks with gaps."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

SPLITS: tuple[str, ...] = ("train", "validation", "holdout")


def block_splits(n: int, *, block: int, gap: int, fractions: Mapping[str, float]) -> list[str | None]:
    """Assign ``n`` consecutive slices to splits in contiguous blocks separated by gaps.

    Adjacent slices of a scan are near-copies, so a slice-level random split would leak the
    training data into the holdout. Here the slices are cut into blocks of ``block`` slices;
    ``gap`` slices between two blocks are dropped; blocks are dealt to the splits in turn,
    each time to the split furthest below its target fraction, so every split samples the
    whole extent of the scan.

    Args:
        n: Number of slices.
        block: Slices per block (>= 1).
        gap: Slices dropped between two blocks (>= 0).
        fractions: Target share of blocks per split name, for example
            ``{"train": 0.7, "validation": 0.1, "holdout": 0.2}``; must be positive and sum to 1.

    Returns:
        One entry per slice: the split name, or ``None`` for a gap slice.

    Raises:
        ValueError: On a bad block size, gap or fractions, or too few slices for one block per
            split.
    """
    if block < 1 or gap < 0:
        raise ValueError(f"block must be >= 1 and gap >= 0, got block={block}, gap={gap}")
    names = [name for name, share in fractions.items() if share > 0]
    if any(share < 0 for share in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {dict(fractions)}")
    starts = list(range(0, n, block + gap))
    if len(starts) < len(names):
        raise ValueError(
            f"{n} slices make {len(starts)} block(s) of {block} with gap {gap}; "
            f"need at least one per split {names}: use smaller data.splits.block or gap"
        )
    counts = dict.fromkeys(names, 0)
    assignment: list[str | None] = [None] * n
    for i, start in enumerate(starts):
        remaining = len(starts) - i
        missing = [name for name in names if counts[name] == 0]
        if len(missing) >= remaining:  # make sure every split gets a block
            name = missing[0]
        else:
            name = max(names, key=lambda s: fractions[s] * (i + 1) - counts[s])
        counts[name] += 1
        for j in range(start, min(start + block, n)):
            assignment[j] = name
    return assignment


def patient_splits(patients: Sequence[str], *, fractions: Mapping[str, float]) -> dict[str, str]:
    """Assign whole patients to splits, so that no patient appears in two splits.

    Patients are ordered by a hash of their (pseudonymous) id, which is stable across runs and
    independent of the input order, then dealt out by largest remainder: each split with a
    positive share gets ``round(share * n)`` patients, at least one, and train takes what is left.

    Args:
        patients: Distinct patient ids.
        fractions: Target share per split name; non-negative, summing to 1.

    Returns:
        Split name per patient.

    Raises:
        ValueError: On bad fractions, or fewer patients than splits with a positive share.
    """
    names = [name for name, share in fractions.items() if share > 0]
    if any(share < 0 for share in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {dict(fractions)}")
    unique = sorted(set(patients), key=lambda p: hashlib.sha256(f"split:{p}".encode()).hexdigest())
    n = len(unique)
    if n < len(names):
        raise ValueError(f"{n} patient(s) cannot fill the {len(names)} splits {names}; each needs one patient")
    exact = {name: fractions[name] * n for name in names}
    counts = {name: max(1, int(exact[name])) for name in names}
    by_remainder = sorted(names, key=lambda s: exact[s] - int(exact[s]), reverse=True)
    i = 0
    while sum(counts.values()) < n:
        counts[by_remainder[i % len(names)]] += 1
        i += 1
    while sum(counts.values()) > n:  # the minimum of one per split overshot: take from the largest
        largest = max((s for s in names if counts[s] > 1), key=lambda s: counts[s])
        counts[largest] -= 1
    order = ["train", *[s for s in names if s != "train"]] if "train" in names else names
    assignment: dict[str, str] = {}
    position = 0
    for name in order:
        for patient in unique[position : position + counts[name]]:
            assignment[patient] = name
        position += counts[name]
    return assignment
