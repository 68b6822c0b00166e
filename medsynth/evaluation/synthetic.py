"""The synthetic set as the audit reads it: ``synthetic/manifest.csv``, the NIfTI files it lists,
and the generator it names."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import torch

from medsynth import MedsynthError
from medsynth.data import LabelledArrays
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
        found = []
        for column in ("checkpoint", "checkpoint_sha256"):
            values = {row.get(column) or "" for row in self.rows}
            if values == {""} or "" in values:
                raise MedsynthError(f"{self.manifest} has no {column} column for every sample, so the generator to audit "
                                    "is unknown: generate the set again with `medsynth generate`")
            if len(values) > 1:
                raise MedsynthError(f"{self.manifest} lists samples of {len(values)} different generators ({column}: "
                                    f"{sorted(values)[:3]}); audit one generator's set at a time")
            found.append(values.pop())
        return found[0], found[1]


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
    if not path.is_file():
        raise MedsynthError(f"no synthetic manifest at {path}: run `medsynth generate` first")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
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
