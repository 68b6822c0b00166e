"""Turn an image and its label map into cached records and a manifest."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

from medsynth import ConfigError, MedsynthError
from medsynth.data.manifest import Manifest, Record, write_record
from medsynth.data.splits import block_splits
from medsynth.io import load_nifti
from medsynth.transforms import volume_preprocessing


def load_pair(image_path: str | os.PathLike[str], label_path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read an image and its label map and check that they share one voxel grid.

    Args:
        image_path: The image file.
        label_path: The label map file.

    Returns:
        ``(image, label, affine)``.

    Raises:
        MedsynthError: If a file is missing or unreadable, or the shapes or affines differ.
    """
    image, affine = load_nifti(image_path)
    label, label_affine = load_nifti(label_path)
    if image.ndim != 3:
        raise MedsynthError(f"{image_path}: expected a 3D image, got shape {image.shape}")
    if label.shape != image.shape:
        raise MedsynthError(f"label map {label_path} has shape {label.shape}, but image {image_path} has {image.shape}")
    if not np.allclose(label_affine, affine, atol=1e-3):
        raise MedsynthError(
            f"label map {label_path} and image {image_path} have different affines (voxel grids):\n"
            f"label:\n{np.round(label_affine, 4)}\nimage:\n{np.round(affine, 4)}"
        )
    if np.any(label < 0) or not np.allclose(label, np.round(label)):
        raise MedsynthError(f"label map {label_path} must hold non-negative integer values")
    return image, label.astype(np.int64), affine


def slice_affine(affine: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Affine of plane ``index`` along ``axis`` of a volume with ``affine``.

    The plane's pixel axes are the volume's other two axes, in order, and its third axis (the
    single-slice depth when written as NIfTI) is ``axis``; the origin moves to that plane.
    """
    volume = np.asarray(affine, dtype=np.float64)
    order = [a for a in range(3) if a != axis] + [axis]
    out = np.eye(4)
    out[:3, :3] = volume[:3, order]
    out[:3, 3] = volume[:3, 3] + volume[:3, axis] * index
    return out


def build_slice_dataset(
    image_path: str | os.PathLike[str],
    label_path: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str],
    label_names: Sequence[str],
    case_id: str,
    spacing: Sequence[float],
    size: Sequence[int],
    slice_axis: int = 2,
    min_foreground: float = 0.05,
    margin: int = 2,
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
    block: int = 8,
    gap: int = 2,
    fractions: Mapping[str, float] | None = None,
    attributes: Mapping[str, str] | None = None,
    level_bands: int = 0,
    intensity: str = "percentile",
    window: Sequence[float] | None = None,
) -> Manifest:
    """Preprocess one image/label volume into 2D slice records, then write the manifest.

    The volume is reoriented to RAS, resampled, intensity-scaled and cropped by
    :func:`medsynth.transforms.volume_preprocessing`; slices along ``slice_axis`` whose labelled
    fraction reaches ``min_foreground`` are kept and split with :func:`block_splits`. Inputs are
    validated before anything is written; the manifest is written last, atomically.

    Args:
        image_path: The image file.
        label_path: The label map file.
        out_dir: The data folder to write ``records/`` and ``manifest.json`` into.
        label_names: Name per label value, background first.
        case_id: Id of this case in the manifest.
        spacing: Target spacing in mm per axis.
        size: In-plane size (the two axes other than ``slice_axis``).
        slice_axis: Axis cut into slices.
        min_foreground: Smallest labelled fraction for a slice to be kept.
        margin: Voxels kept around the label's bounding box.
        lower_percentile: Foreground intensity percentile mapped to 0.
        upper_percentile: Foreground intensity percentile mapped to 1.
        block: Slices per split block.
        gap: Slices dropped between blocks.
        fractions: Split shares; default 70/10/20 train/validation/holdout.
        attributes: Case attributes given to every record (class, age band, ...).
        level_bands: If > 0, each record gets the attribute ``level``: the band (``1`` = lowest
            slice index .. ``level_bands``) of equal width along ``slice_axis`` that its slice lies in,
            over the kept slices; a body-region class that needs no annotation.
        intensity: ``percentile`` (foreground percentiles) or ``window`` (``window`` to [0, 1], the CT preset).
        window: ``(low, high)`` for the window mode.

    Returns:
        The written manifest.
    """
    if slice_axis not in (0, 1, 2):
        raise ConfigError(f"data.slice_axis must be 0, 1 or 2, got {slice_axis}")
    if len(spacing) != 3 or len(size) != 2:
        raise ConfigError(f"data.spacing needs 3 values and data.size 2, got {list(spacing)} and {list(size)}")
    if intensity not in ("percentile", "window"):
        raise ConfigError(f"data.intensity.mode must be percentile or window, got {intensity!r}")
    fractions = dict(fractions or {"train": 0.7, "validation": 0.1, "holdout": 0.2})
    image, label, affine = load_pair(image_path, label_path)
    if label.max() >= len(label_names):
        raise MedsynthError(
            f"label map {label_path} holds value {int(label.max())}, but data.label_names names only "
            f"{len(label_names)} values (0..{len(label_names) - 1})"
        )

    volume, labels, vol_affine = preprocess_volume(
        image, label, affine, spacing=spacing, size=_slab_size(size, slice_axis), margin=margin,
        lower_percentile=lower_percentile, upper_percentile=upper_percentile, intensity=intensity, window=window,
    )
    kept = kept_slices(labels, slice_axis=slice_axis, min_foreground=min_foreground)
    if not kept:
        raise MedsynthError(f"no slice of {label_path} has {min_foreground:.0%} labelled pixels; lower data.min_foreground")
    try:
        splits = block_splits(len(kept), block=block, gap=gap, fractions=fractions)
    except ValueError as err:
        raise ConfigError(f"data.splits: {err}") from None

    out_dir = Path(out_dir)
    records = slice_records(
        volume, labels, vol_affine, kept=kept, splits=splits, out_dir=out_dir, id_prefix=case_id, case=case_id,
        slice_axis=slice_axis, source={"image": str(image_path), "label": str(label_path)},
        attributes=attributes, level_bands=level_bands,
    )
    manifest = Manifest(
        root=out_dir, spatial_dims=2, label_names=list(label_names), records=records,
        settings={
            "spacing": list(spacing), "size": list(size), "slice_axis": slice_axis,
            "min_foreground": min_foreground, "level_bands": level_bands, "intensity_percentiles": [lower_percentile, upper_percentile],
            **({"intensity_window": [float(w) for w in window or ()]} if intensity == "window" else {}),
            "splits": {"block": block, "gap": gap, "fractions": fractions},
        },
    )
    manifest.write()
    remove_stale_records(out_dir, {r.file for r in records})
    return manifest


def _slab_size(size: Sequence[int], slice_axis: int) -> list[int]:
    """A 2D in-plane size as a 3D pad/crop size that keeps ``slice_axis`` whole."""
    in_plane = iter(size)
    return [-1 if axis == slice_axis else int(next(in_plane)) for axis in range(3)]


def preprocess_volume(
    image: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray,
    *,
    spacing: Sequence[float],
    size: Sequence[int],
    margin: int = 2,
    intensity: str = "percentile",
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
    window: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bring one 3D image and its label map to the dataset's orientation, spacing, intensities and size.

    Args:
        image: ``(X, Y, Z)`` intensities.
        label: ``(X, Y, Z)`` integer label map on the same grid.
        affine: Their 4x4 RAS+ affine.
        spacing: Target spacing (mm) per axis.
        size: Pad/crop size per axis (-1 keeps an axis).
        margin: Voxels kept around the label's bounding box.
        intensity: ``percentile`` or ``window`` (see :func:`medsynth.transforms.volume_preprocessing`).
        lower_percentile: Foreground percentile mapped to 0.
        upper_percentile: Foreground percentile mapped to 1.
        window: ``(low, high)`` for the ``window`` mode.

    Returns:
        ``(volume, labels, affine)``: ``(1, X', Y', Z')`` float32 in [0, 1], ``(1, X', Y', Z')``
        uint8, and the RAS affine of the result.
    """
    chain = volume_preprocessing(
        spacing=spacing, lower_percentile=lower_percentile, upper_percentile=upper_percentile,
        spatial_size=size, margin=margin, intensity=intensity, window=window,
    )
    data = chain({
        "image": MetaTensor(torch.from_numpy(np.asarray(image, dtype=np.float32)[None]), affine=torch.from_numpy(affine)),
        "label": MetaTensor(torch.from_numpy(label[None].astype(np.float32)), affine=torch.from_numpy(affine)),
    })
    volume = data["image"].numpy().astype(np.float32)
    labels = np.rint(data["label"].numpy()).astype(np.uint8)
    return volume, labels, np.asarray(data["image"].affine, dtype=np.float64)


def kept_slices(labels: np.ndarray, *, slice_axis: int, min_foreground: float) -> list[int]:
    """Indices of the slices of a ``(1, X, Y, Z)`` label map whose labelled fraction reaches ``min_foreground``."""
    return [
        k for k in range(labels.shape[1 + slice_axis])
        if (np.take(labels, k, axis=1 + slice_axis) > 0).mean() >= min_foreground
    ]


def slice_records(
    volume: np.ndarray,
    labels: np.ndarray,
    vol_affine: np.ndarray,
    *,
    kept: Sequence[int],
    splits: Sequence[str | None],
    out_dir: str | os.PathLike[str],
    id_prefix: str,
    case: str,
    slice_axis: int,
    source: Mapping[str, str],
    attributes: Mapping[str, str] | None = None,
    level_bands: int = 0,
) -> list[Record]:
    """Cache the kept slices of a preprocessed volume as records ``<id_prefix>_s<k>``.

    Args:
        volume: ``(1, X, Y, Z)`` preprocessed image.
        labels: ``(1, X, Y, Z)`` label map.
        vol_affine: The volume's affine.
        kept: Slice indices to keep.
        splits: Split of each kept slice; ``None`` drops it (a gap).
        out_dir: The data folder.
        id_prefix: Record id prefix.
        case: Case id of the records.
        slice_axis: Axis cut into slices.
        source: What the records were made from.
        attributes: Case attributes given to every record.
        level_bands: If > 0, add the attribute ``level`` (see :func:`build_slice_dataset`).

    Returns:
        The records, in slice order.
    """
    vol_spacing = [float(v) for v in np.linalg.norm(vol_affine[:3, :3], axis=0)]
    records: list[Record] = []
    for k, split in zip(kept, splits):
        if split is None:
            continue
        record_id = f"{id_prefix}_s{k:03d}"
        img = np.take(volume, k, axis=1 + slice_axis)
        lbl = np.take(labels, k, axis=1 + slice_axis)
        file, digest = write_record(out_dir, record_id, img, lbl)
        record_attributes = {str(key): str(value) for key, value in (attributes or {}).items()}
        if level_bands > 0:
            position = (k - kept[0]) / max(1, kept[-1] - kept[0] + 1)
            record_attributes["level"] = str(1 + int(position * level_bands))
        records.append(
            Record(
                id=record_id, case=case, split=split, file=file, shape=list(img.shape[1:]),
                spacing=vol_spacing, affine=slice_affine(vol_affine, slice_axis, k).tolist(),
                sha256=digest, slice_index=k, source=dict(source), attributes=record_attributes,
            )
        )
    return records


def remove_stale_records(out_dir: Path, keep: set[str]) -> None:
    """Delete cached records that an earlier run wrote and the new manifest no longer lists."""
    for path in (Path(out_dir) / "records").glob("*.npz"):
        if f"records/{path.name}" not in keep:
            path.unlink()
