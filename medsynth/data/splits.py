"""Split assignment for slices of one volume: contiguous blocks with gaps between them."""

from __future__ import annotations

from collections.abc import Mapping

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
