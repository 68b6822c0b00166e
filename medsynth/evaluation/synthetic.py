"""The synthetic set as the audit reads it: ``synthetic/manifest.csv``, the NIfTI files it lists,
and the generator it names (its files are checked first: :mod:`medsynth.evaluation.provenance`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from medsynth import MedsynthError
from medsynth.data import LabelledArrays
from medsynth.evaluation.provenance import read_rows, shared_value
from medsynth.io import load_nifti


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticSet:
    """The rows of a synthetic manifest and the images and label maps they list.

    Attributes:
        manifest: Path of ``manifest.csv``.
        rows: Its rows, in order.
        images: ``(N, 1, *spatial)`` float32 intensities.
        labels: ``(N, 1, *spatial)`` int64 label maps.
    """

    manifest: Path
    rows: list[dict[str, str]]
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def ids(self) -> list[str]:
        """The sample ids, in order."""
        return [r["sample_id"] for r in self.rows]

    def arrays(self) -> LabelledArrays:
        """The set as tensors, for training on it."""
        return LabelledArrays(torch.from_numpy(self.images), torch.from_numpy(self.labels), self.ids, [])

    def generator_source(self) -> tuple[str, str]:
        """The checkpoint every sample was generated with, and the SHA-256 of its file.

        Returns:
            ``(checkpoint, checkpoint_sha256)`` from the manifest's columns.

        Raises:
            MedsynthError: If a column is missing or empty, or the rows name different generators.
        """
        what = "the generator to audit"
        return (
            shared_value(self.rows, "checkpoint", manifest=self.manifest, what=what),
            shared_value(self.rows, "checkpoint_sha256", manifest=self.manifest, what=what),
        )


def read_synthetic(folder: str | Path, *, spatial_dims: int) -> SyntheticSet:
    """Read ``manifest.csv`` under ``folder`` and the NIfTI images and label maps it lists.

    Args:
        folder: The synthetic set's folder (``paths.synthetic``).
        spatial_dims: 2 or 3, the dataset's records (2D samples are stored as one-slice volumes).

    Returns:
        The set.

    Raises:
        MedsynthError: If there is no manifest, it lists nothing, or it lists no NIfTI files.
    """
    folder = Path(folder)
    path = folder / "manifest.csv"
    rows = read_rows(path)
    if not rows:
        raise MedsynthError(f"{path} lists no samples")
    if not rows[0].get("image"):
        raise MedsynthError(f"{path} lists no NIfTI files: generate with generate.formats including nifti")
    images, labels = [], []
    for row in rows:
        image, _ = load_nifti(folder / row["image"])
        label, _ = load_nifti(folder / row["label"])
        if spatial_dims == 2:
            image, label = image[..., 0], label[..., 0]
        images.append(image[None])
        labels.append(label[None])
    return SyntheticSet(path, rows, np.stack(images).astype(np.float32), np.rint(np.stack(labels)).astype(np.int64))
