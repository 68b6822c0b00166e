"""The report's pictures of a 2D audit: synthetic samples beside real images, and the closest pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsynth.data import LabelledArrays
from medsynth.evaluation.synthetic import SyntheticSet
from medsynth.io import colorize_labels, display_slice, picture_sheet, save_png


def picture_sheets(
    out: str | Path,
    synthetic: SyntheticSet,
    train: LabelledArrays,
    correlation: np.ndarray,
    nearest: np.ndarray,
    *,
    sheet_rows: int,
) -> dict[str, Path]:
    """Write ``comparison.png`` (label, synthetic, real source, nearest training image per row) and
    ``most_similar_pairs.png`` (the five synthetic images most correlated with a training image).

    Args:
        out: The evaluation folder.
        synthetic: The synthetic set (2D).
        train: The real training split.
        correlation: ``(N,)`` each synthetic image's highest correlation with a training image.
        nearest: ``(N,)`` the index of that training image.
        sheet_rows: Synthetic samples shown in the comparison sheet.

    Returns:
        ``{caption: path}`` of the two pictures, for the report.
    """
    out = Path(out)
    images, labels = synthetic.images, synthetic.labels
    source_index = {rid: i for i, rid in enumerate(train.ids)}
    blank = np.zeros(images.shape[2:])
    comparison = []
    for i, row in enumerate(synthetic.rows[:sheet_rows]):
        src = source_index.get(row["label_source"])
        comparison.append(
            [
                colorize_labels(display_slice(labels[i, 0])),
                display_slice(images[i, 0]),
                display_slice(train.images[src, 0].numpy() if src is not None else blank),
                display_slice(train.images[nearest[i], 0].numpy()),
            ]
        )
    top = np.argsort(-correlation)[:5]
    pairs = [[display_slice(images[i, 0]), display_slice(train.images[nearest[i], 0].numpy())] for i in top]
    return {
        "Synthetic samples beside real images": save_png(
            out / "comparison.png", picture_sheet(comparison, titles=["label", "synthetic", "real (label src)", "nearest train"])
        ),
        "The five synthetic images most correlated with a training image": save_png(
            out / "most_similar_pairs.png", picture_sheet(pairs, titles=["synthetic", "training"])
        ),
    }
