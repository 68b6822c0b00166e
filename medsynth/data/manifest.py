"""The preprocessed dataset's manifest (``data/manifest.json``) and its cached records.

Each record is one training example (a 2D slice or a 3D volume) stored as an ``.npz`` file
holding ``image`` (float32, channel-first, intensities in [0, 1]) and ``label`` (uint8,
channel-first). The manifest lists every record with its source, split, geometry and a
content hash, so later stages and auditors can check what a model was trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medsynth import MedsynthError
from medsynth.io import atomic_path, write_json

MANIFEST_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Record:
    """One cached example.

    Attributes:
        id: Unique record id, also the cache file's stem.
        case: Id of the case (scan) the record comes from; splits never share a case's block.
        split: ``train``, ``validation`` or ``holdout``.
        file: Cache file, relative to the data folder.
        shape: Spatial shape of the record.
        spacing: Voxel spacing in mm for each axis of the source volume after resampling.
        affine: 4x4 voxel-to-world affine of the record (for a slice: of its plane).
        sha256: Hash of the image and label arrays' bytes.
        slice_index: Index of the slice in the preprocessed volume; ``None`` for 3D records.
        source: Input files the record was made from.
        attributes: Per-case attributes (class, age band, sex, ...) as strings, for conditioning.
    """

    id: str
    case: str
    split: str
    file: str
    shape: list[int]
    spacing: list[float]
    affine: list[list[float]]
    sha256: str
    slice_index: int | None = None
    source: dict[str, str] = dataclasses.field(default_factory=dict)
    attributes: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Manifest:
    """The dataset description written by preprocessing.

    Attributes:
        root: The data folder holding ``manifest.json`` (not serialised).
        spatial_dims: 2 for slices, 3 for volumes.
        label_names: Name of each label value, index = value; ``label_names[0]`` is background.
        records: Every cached record.
        settings: Preprocessing settings that produced the records, for provenance.
    """

    root: Path
    spatial_dims: int
    label_names: list[str]
    records: list[Record]
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Number of label values including background."""
        return len(self.label_names)

    def split(self, name: str) -> list[Record]:
        """Records of one split, in manifest order."""
        return [r for r in self.records if r.split == name]

    def counts(self) -> dict[str, int]:
        """Number of records per split."""
        out: dict[str, int] = {}
        for r in self.records:
            out[r.split] = out.get(r.split, 0) + 1
        return out

    def attribute_values(self) -> dict[str, list[str]]:
        """Every attribute name of the records with its sorted distinct values: the conditioning vocabulary."""
        values: dict[str, set[str]] = {}
        for r in self.records:
            for key, value in r.attributes.items():
                values.setdefault(key, set()).add(str(value))
        return {key: sorted(v) for key, v in sorted(values.items())}

    def write(self) -> Path:
        """Write ``manifest.json`` into ``root`` atomically and return its path."""
        body = {
            "version": MANIFEST_VERSION,
            "spatial_dims": self.spatial_dims,
            "label_names": self.label_names,
            "counts": self.counts(),
            "attributes": self.attribute_values(),
            "settings": self.settings,
            "records": [dataclasses.asdict(r) for r in self.records],
        }
        return write_json(self.root / "manifest.json", body)


SPLIT_SETTINGS = "more patients in paths.input, or a larger share for the split in data.splits.fractions (then preprocess again)"
"""What changes the number of records of a split."""


def require_records(manifest: Manifest, needs: Mapping[str, tuple[int, str]], *, stage: str) -> None:
    """Stop before any work when a split has fewer records than the stage needs.

    Args:
        manifest: The dataset.
        needs: ``{split: (at least, what for)}``, for example ``{"holdout": (1, "the privacy gate's thresholds")}``.
        stage: The stage's name, for the message.

    Raises:
        MedsynthError: One line per the first short split: how many records it needs and has, what for,
            and which settings change that.
    """
    counts = manifest.counts()
    for split, (least, why) in needs.items():
        have = counts.get(split, 0)
        if have < least:
            raise MedsynthError(
                f"{stage} needs at least {least} '{split}' record(s) for {why}, but the dataset at {manifest.root} has "
                f"{have} (records per split: {counts or 'none'}): {SPLIT_SETTINGS}"
            )


def read_manifest(data_dir: str | os.PathLike[str]) -> Manifest:
    """Read ``manifest.json`` from a data folder written by preprocessing.

    Args:
        data_dir: The ``data`` folder under ``paths.output``.

    Returns:
        The manifest with ``root`` set to ``data_dir``.

    Raises:
        MedsynthError: If the manifest is missing or malformed (run preprocess first).
    """
    root = Path(data_dir)
    path = root / "manifest.json"
    if not path.is_file():
        raise MedsynthError(f"no dataset manifest at {path}: run `medsynth preprocess` first")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        records = [Record(**r) for r in body["records"]]
        return Manifest(
            root=root,
            spatial_dims=int(body["spatial_dims"]),
            label_names=list(body["label_names"]),
            records=records,
            settings=dict(body.get("settings", {})),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise MedsynthError(f"malformed dataset manifest {path}: {err}") from None


def array_hash(*arrays: np.ndarray) -> str:
    """SHA-256 over the dtype, shape and bytes of each array, in order."""
    digest = hashlib.sha256()
    for array in arrays:
        a = np.ascontiguousarray(array)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def write_record(data_dir: str | os.PathLike[str], record_id: str, image: np.ndarray, label: np.ndarray) -> tuple[str, str]:
    """Cache one record's arrays atomically.

    Args:
        data_dir: The data folder.
        record_id: Record id; the file is ``records/<record_id>.npz``.
        image: Channel-first float image.
        label: Channel-first integer label map.

    Returns:
        ``(relative_file, sha256)``.
    """
    image = np.asarray(image, dtype=np.float32)
    label = np.asarray(label, dtype=np.uint8)
    relative = f"records/{record_id}.npz"
    with atomic_path(Path(data_dir) / relative) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, image=image, label=label)
    return relative, array_hash(image, label)


def read_record(data_dir: str | os.PathLike[str], record: Record) -> tuple[np.ndarray, np.ndarray]:
    """Load one cached record as ``(image, label)``.

    Raises:
        MedsynthError: If the cache file is missing or its content hash differs from the manifest.
    """
    path = Path(data_dir) / record.file
    if not path.is_file():
        raise MedsynthError(f"cached record missing: {path}: rerun `medsynth preprocess`")
    with np.load(path) as npz:
        image, label = npz["image"], npz["label"]
    if array_hash(image, label) != record.sha256:
        raise MedsynthError(f"cached record {path} does not match its manifest hash: rerun `medsynth preprocess`")
    return image, label
