"""Split assignment: whole patients to splits, or slices of one volume in contiguous blocks with gaps."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

SPLITS: tuple[str, ...] = ("train", "validation", "holdout")

BALANCE_TOLERANCE = 0.05
"""A patient split whose share of records is within this (absolute) of its fraction for every split is
kept as dealt; otherwise patients are moved between splits until the record shares are as near the
fractions as moves and swaps get them (:func:`balance_records`)."""


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


def patient_splits(
    patients: Sequence[str], *, fractions: Mapping[str, float], sizes: Mapping[str, int] | None = None
) -> dict[str, str]:
    """Assign whole patients to splits, so that no patient appears in two splits.

    Patients are ordered by a hash of their (pseudonymous) id, which is stable across runs and
    independent of the input order, then dealt out by largest remainder: each split with a
    positive share gets ``round(share * n)`` patients, at least one, and train takes what is left.
    With ``sizes`` (records per patient), a dealing whose record shares miss the fractions by more
    than :data:`BALANCE_TOLERANCE` (few patients with unequal record counts) is then balanced by
    records (:func:`balance_records`).

    Args:
        patients: Distinct patient ids.
        fractions: Target share per split name; non-negative, summing to 1.
        sizes: Records per patient (default: patients are balanced by count alone).

    Returns:
        Split name per patient.

    Raises:
        ValueError: On bad fractions, or fewer patients than splits with a positive share.
    """
    names = _positive(fractions)
    unique = _hash_order(patients)
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
    if sizes is not None:
        assignment = balance_records(assignment, sizes=sizes, fractions=fractions)
    return assignment


def record_shares(assignment: Mapping[str, str], *, sizes: Mapping[str, int], fractions: Mapping[str, float]) -> dict[str, float]:
    """Share of all records that each split with a positive fraction holds.

    Args:
        assignment: Split per patient.
        sizes: Records per patient.
        fractions: Target share per split name.

    Returns:
        ``{split: share}`` for every split with a positive fraction (shares sum to 1).
    """
    totals = dict.fromkeys(_positive(fractions), 0)
    for patient, split in assignment.items():
        totals[split] = totals.get(split, 0) + int(sizes[patient])
    everything = sum(totals.values())
    return {name: (n / everything if everything else 0.0) for name, n in totals.items()}


def balance_records(
    assignment: Mapping[str, str],
    *,
    sizes: Mapping[str, int],
    fractions: Mapping[str, float],
    tolerance: float = BALANCE_TOLERANCE,
) -> dict[str, str]:
    """Move whole patients between splits so that each split's share of *records* nears its fraction.

    With few patients, a split by patient count can starve a split of records: three patients with
    20, 170 and 86 slices dealt one per split may leave training 20 records and validation 170. When
    some split's record share misses its fraction by more than ``tolerance``, this searches locally:
    at each round it applies the one move (a patient to another split, never emptying a split) or
    swap (two patients of different splits) that most lowers the summed absolute gap between record
    shares and fractions, and stops when none lowers it. Patients are tried in hash order and splits
    in the order of ``fractions``, so the result is deterministic; patients stay whole.

    Args:
        assignment: Split per patient, every split with a positive fraction holding at least one.
        sizes: Records per patient.
        fractions: Target share per split name.
        tolerance: Largest gap between a record share and its fraction that needs no balancing.

    Returns:
        Split per patient (``assignment`` unchanged when already within ``tolerance``).
    """
    names = _positive(fractions)
    split = dict(assignment)
    if (
        max(abs(share - fractions[name]) for name, share in record_shares(split, sizes=sizes, fractions=fractions).items())
        <= tolerance
    ):
        return split
    order = _hash_order(split)
    total = sum(int(sizes[p]) for p in order)
    records = {name: sum(int(sizes[p]) for p in order if split[p] == name) for name in names}
    members = {name: sum(1 for p in order if split[p] == name) for name in names}

    def gap(changed: Mapping[str, int]) -> float:
        return sum(abs(changed.get(s, records[s]) / total - fractions[s]) for s in names)

    for _ in range(len(order) + 1):  # every round strictly lowers the gap
        change: tuple[str, str, str | None] | None
        best, change = gap({}) - 1e-12, None
        for i, p in enumerate(order):
            a = split[p]
            if members[a] > 1:
                for b in names:
                    if b != a and (value := gap({a: records[a] - sizes[p], b: records[b] + sizes[p]})) < best:
                        best, change = value, (p, b, None)
            for q in order[i + 1 :]:
                b = split[q]
                moved = int(sizes[q]) - int(sizes[p])
                if b != a and moved and (value := gap({a: records[a] + moved, b: records[b] - moved})) < best:
                    best, change = value, (p, b, q)
        if change is None:
            break
        p, b, swap = change
        a = split[p]
        records[a] -= sizes[p]
        records[b] += sizes[p]
        split[p] = b
        if swap is None:
            members[a] -= 1
            members[b] += 1
        else:
            records[b] -= sizes[swap]
            records[a] += sizes[swap]
            split[swap] = a
    return split


def _positive(fractions: Mapping[str, float]) -> list[str]:
    """The split names with a positive share, after checking that the shares are valid."""
    if any(share < 0 for share in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {dict(fractions)}")
    return [name for name, share in fractions.items() if share > 0]


def _hash_order(patients: Sequence[str] | Mapping[str, str]) -> list[str]:
    """Distinct patient ids ordered by a hash of the id: stable across runs, independent of input order."""
    return sorted(set(patients), key=lambda p: hashlib.sha256(f"split:{p}".encode()).hexdigest())


def shard_of(patient: str, count: int) -> int:
    """The shard (1 to ``count``) that preprocesses ``patient``'s cases when the input is cut into ``count`` shards.

    A hash of the (pseudonymous) patient id modulo ``count``: every series of a patient lands in the
    same shard, and a patient's shard depends on nothing but its id and ``count`` (not on the input's
    order, nor on what the other shards hold), so independent processes agree on it.

    Args:
        patient: Pseudonymous patient id.
        count: Number of shards (>= 1).

    Returns:
        The shard's number, 1-based.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return int(hashlib.sha256(f"shard:{patient}".encode()).hexdigest(), 16) % count + 1
