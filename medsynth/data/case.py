"""One case in, its records out: load a volume and its label map, preprocess them, cache the records.

:func:`process_case` is what every source runs for each case, in this process or in a worker:
:func:`load_case` reads the image (a DICOM series or a NIfTI file) and its labels (a DICOM SEG, a
NIfTI label map, or a body mask), :func:`preprocess_volume` brings them to the dataset's
orientation, spacing, intensities and size, and the result is cached as one volume record or
one record per kept slice. A case that cannot be used raises :class:`CaseError`, which
``process_case`` turns into a quarantine reason: one bad case never stops the others.

The module is one piece because these steps share one in-memory case and one
:class:`VolumeSettings` (part of each case's cache fingerprint), and a worker process imports
exactly this module to run a case.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from medsynth import ConfigError, MedsynthError
from medsynth.data.discovery import CaseSpec
from medsynth.data.manifest import Record, write_record
from medsynth.io.dicom import load_dicom_seg, load_dicom_series
from medsynth.io.nifti import MAX_IMAGE_BYTES, image_size_problem, load_nifti, one_line
from medsynth.transforms import intensity_scaling, volume_preprocessing
from medsynth.transforms.grid import foreground_box, preprocess_separable

INTENSITY_MODES = ("auto", "percentile", "window")
_MAX_LABEL = 2**31 - 1
RESAMPLE_WORKING_SET = 8
"""float32 values preprocessing holds per voxel of the resampled grid (image, label, sampling grids and
copies; 7.4 measured on the chain of :func:`medsynth.transforms.volume_preprocessing`): the resampled grid is
held to ``max_image_bytes`` with this factor."""


@dataclasses.dataclass(frozen=True)
class VolumeSettings:
    """How every case becomes records; part of each case's cache fingerprint.

    Attributes:
        spatial_dims: 2 (slices along ``slice_axis``) or 3 (one volume per case).
        spacing: Target spacing (mm), 3 values.
        size: Size after centre pad/crop: 2 in-plane values for slices, 3 for volumes.
        slice_axis: Axis cut into slices (2 = axial after RAS reorientation).
        min_foreground: Smallest labelled fraction of a kept slice.
        margin: Voxels kept around the label's bounding box.
        intensity: ``auto`` (``window`` for CT, ``percentile`` otherwise), ``percentile`` or ``window``.
        lower_percentile: Foreground percentile mapped to 0.
        upper_percentile: Foreground percentile mapped to 1.
        window: ``(low, high)`` mapped to [0, 1] by the window mode (HU for CT).
        level_bands: Slice records get attribute ``level`` with this many bands (0 = none).
        label_names: Name per label value, background first.
        max_image_bytes: Largest image a case may declare or become when resampled, in bytes of
            float32 voxels; larger ones are quarantined before their voxels are read.
    """

    spatial_dims: int
    spacing: tuple[float, ...]
    size: tuple[int, ...]
    slice_axis: int = 2
    min_foreground: float = 0.05
    margin: int = 2
    intensity: str = "auto"
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    window: tuple[float, float] = (-1000.0, 1000.0)
    level_bands: int = 0
    label_names: tuple[str, ...] = ()
    max_image_bytes: int = MAX_IMAGE_BYTES

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ConfigError(f"data.spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if len(self.spacing) != 3 or any(float(s) <= 0 for s in self.spacing):
            raise ConfigError(f"data.spacing needs 3 positive values, got {list(self.spacing)}")
        if len(self.size) != self.spatial_dims:
            raise ConfigError(
                f"data.size needs {self.spatial_dims} values for data.spatial_dims={self.spatial_dims}, got {list(self.size)}"
            )
        if self.slice_axis not in (0, 1, 2):
            raise ConfigError(f"data.slice_axis must be 0, 1 or 2, got {self.slice_axis}")
        if self.intensity not in INTENSITY_MODES:
            raise ConfigError(f"data.intensity.mode must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        if len(self.window) != 2 or not self.window[0] < self.window[1]:
            raise ConfigError(f"data.intensity.window must be [low, high] with low < high, got {list(self.window)}")
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ConfigError(
                f"data.intensity.lower/upper must satisfy 0 <= lower < upper <= 100, got {self.lower_percentile}, {self.upper_percentile}"
            )
        if not self.max_image_bytes > 0:
            raise ConfigError(f"data.max_image_gb must be positive, got {self.max_image_bytes / 1e9:g} GB")

    def pad_size(self) -> list[int]:
        """The 3D pad/crop size: ``size`` for volumes; for slices, -1 along the slice axis."""
        if self.spatial_dims == 3:
            return [int(s) for s in self.size]
        in_plane = iter(self.size)
        return [-1 if axis == self.slice_axis else int(next(in_plane)) for axis in range(3)]

    def intensity_for(self, modality: str) -> str:
        """The intensity mode for a case of ``modality``."""
        if self.intensity != "auto":
            return self.intensity
        return "window" if modality.upper() == "CT" else "percentile"

    def as_dict(self) -> dict[str, Any]:
        """Plain values for the manifest and fingerprints."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


class CaseError(MedsynthError):
    """A case medsynth cannot use, and the file at fault.

    Attributes:
        reason: What is wrong, without the file's path (reports name the file their own way).
        file: The file at fault, when one is.
    """

    def __init__(self, reason: str, file: str | os.PathLike[str] | None = None) -> None:
        self.reason = reason
        self.file = None if file is None else str(file)
        super().__init__(f"{self.file}: {reason}" if self.file else reason)


def body_mask(volume: np.ndarray, *, modality: str) -> np.ndarray:
    """A foreground ("body") mask: above -500 HU for CT, above Otsu's threshold otherwise; holes filled.

    Args:
        volume: ``(X, Y, Z)`` intensities (HU for CT).
        modality: The case's modality.

    Returns:
        ``uint8`` mask, 1 inside the body.
    """
    from skimage.filters import threshold_otsu

    if modality.upper() == "CT":
        threshold = -500.0
    else:
        # Otsu on a 256-bin histogram of the finite values, counted in place: no copy of the volume, so a
        # large series costs its mask and nothing more (the bins span the range in float64, wider than the
        # values' own precision)
        finite = np.isfinite(volume)
        everywhere = bool(finite.all())
        low = float(volume.min(initial=np.inf, where=True if everywhere else finite))
        high = float(volume.max(initial=-np.inf, where=True if everywhere else finite))
        if low < high and np.isfinite(high - low):
            counts, edges = np.histogram(volume if everywhere else volume[finite], bins=256, range=(low, high))
            threshold = float(threshold_otsu(hist=(counts, (edges[:-1] + edges[1:]) / 2)))
        else:
            threshold = float("inf")
    mask = volume > threshold
    _fill_holes(mask)
    return mask.view(np.uint8)  # the same bytes: no copy


def _fill_holes(mask: np.ndarray) -> None:
    """Fill the holes of a 3D boolean mask in place: the result of ``scipy.ndimage.binary_fill_holes``, faster.

    A hole is a connected piece of background (6-connectivity, as scipy's default) that does not touch
    the array's border. The background is labelled in one pass and the pieces that touch no face are
    filled, instead of scipy's repeated dilations. The work follows the axes in memory order (the
    result does not depend on axis order) and stays inside the mask's bounding box (the background
    outside it reaches the border anyway).
    """
    from scipy import ndimage

    order = np.argsort([-abs(s) for s in mask.strides], kind="stable")
    view = mask.transpose(order)
    box = foreground_box(view, 0)
    if box is None:
        return
    region = view[tuple(slice(start, stop) for start, stop in box)]
    try:  # 2 bytes a voxel while the background has fewer than 65536 pieces (4 otherwise)
        pieces, count = ndimage.label(~region, output=np.uint16)
    except RuntimeError:
        pieces, count = ndimage.label(~region)
    if count == 0:
        return
    is_hole = np.ones(count + 1, dtype=bool)
    is_hole[0] = False
    for axis in range(pieces.ndim):
        for end in (0, -1):
            is_hole[np.take(pieces, end, axis=axis)] = False
    if is_hole.any():
        region |= is_hole[pieces]


def _read_nifti(path: str | os.PathLike[str], *, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        return load_nifti(path, max_bytes=max_bytes)
    except MedsynthError as err:  # its message holds the raw path: reports name the file their own way
        raise CaseError(str(err).replace(str(path), "<file>"), file=path) from None


def load_nifti_image(
    path: str | os.PathLike[str], *, channel: int | None = None, max_bytes: int = MAX_IMAGE_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """A 3D NIfTI image, or one volume of a 4D one.

    Args:
        path: The image file.
        channel: Volume of a 4D image to use; a 4D image with several volumes needs it.
        max_bytes: Largest image accepted (see :func:`medsynth.io.nifti.load_nifti`).

    Returns:
        ``(image, affine)``.

    Raises:
        CaseError: If the file cannot be read, or is not 3D (or 4D with a valid ``channel``).
    """
    image, affine = _read_nifti(path, max_bytes=max_bytes)
    if image.ndim == 4:
        volumes = image.shape[3]
        if channel is None and volumes > 1:
            raise CaseError(f"4D image with {volumes} volumes: choose one with data.channel (0..{volumes - 1})", file=path)
        index = 0 if channel is None else int(channel)
        if not 0 <= index < volumes:
            raise CaseError(f"data.channel={index} but the 4D image has {volumes} volumes", file=path)
        image = image[..., index]
    elif image.ndim != 3:
        raise CaseError(f"expected a 3D image (or 4D with data.channel), got {image.ndim}D", file=path)
    return np.ascontiguousarray(image), affine


def load_pair(
    image_path: str | os.PathLike[str],
    label_path: str | os.PathLike[str],
    *,
    channel: int | None = None,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a NIfTI image and its label map and check that they share one voxel grid.

    Args:
        image_path: The image file.
        label_path: The label map file.
        channel: Volume of a 4D image to use.
        max_bytes: Largest image accepted (see :func:`medsynth.io.nifti.load_nifti`).

    Returns:
        ``(image, label, affine)``, the label map as ``int64``.

    Raises:
        CaseError: If a file is missing or unreadable, the shapes or affines differ, or the label
            map holds other values than non-negative integers; it names the file at fault.
    """
    image, affine = load_nifti_image(image_path, channel=channel, max_bytes=max_bytes)
    label, label_affine = _read_nifti(label_path, max_bytes=max_bytes)
    if label.shape != image.shape:
        raise CaseError(f"label map has shape {label.shape}, but the image has {image.shape}", file=label_path)
    if not (np.all(np.isfinite(label_affine)) and np.allclose(label_affine, affine, atol=1e-3)):
        raise CaseError(
            "label map and image have different affines (voxel grids): "
            f"label {np.round(label_affine, 4).tolist()}, image {np.round(affine, 4).tolist()}",
            file=label_path,
        )
    if not np.all(np.isfinite(label)) or np.any(label < 0) or not np.allclose(label, np.round(label)):
        raise CaseError("label map must hold non-negative integer values", file=label_path)
    if label.max(initial=0) > _MAX_LABEL:
        raise CaseError(
            f"label map holds value {float(label.max()):.6g}; label values above {_MAX_LABEL} are not supported", file=label_path
        )
    return image, label.astype(np.int64), affine


def load_case(spec: CaseSpec, *, label_count: int, max_bytes: int = MAX_IMAGE_BYTES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load a case's image and label map on one grid.

    Headers that declare more than ``max_bytes`` are refused before their voxels are read, and an
    image with NaN or infinite values is refused (intensity scaling would spread them over the volume).

    Args:
        spec: The case.
        label_count: Number of label names; a label value at or above it is refused.
        max_bytes: Largest image accepted, in bytes of float32 voxels.

    Returns:
        ``(image, label, affine)``.

    Raises:
        MedsynthError: For anything that keeps the case out of the dataset (a :class:`CaseError`
            or :class:`~medsynth.io.dicom.DicomSeriesError` names the file at fault).
    """
    if spec.kind == "dicom":
        image, affine = load_dicom_series(spec.files, max_bytes=max_bytes)
        _check_finite(image, spec)
        if spec.label is None:
            label = body_mask(image, modality=spec.modality)
        else:
            segments, _ = load_dicom_seg(spec.label, affine=affine, shape=image.shape, max_bytes=max_bytes)
            lookup = np.zeros(int(segments.max()) + 1, dtype=np.int64)
            for number, value in spec.segment_names.items():
                if number < lookup.size:
                    lookup[number] = value
            label = lookup[segments]
    elif spec.label is None:
        image, affine = load_nifti_image(spec.files[0], channel=spec.channel, max_bytes=max_bytes)
        _check_finite(image, spec)
        label = body_mask(image, modality=spec.modality)
    else:
        image, label, affine = load_pair(spec.files[0], spec.label, channel=spec.channel, max_bytes=max_bytes)
        _check_finite(image, spec)
    label = np.asarray(label)
    if label.max(initial=0) >= label_count:  # checked before the cast, which would wrap large values
        raise CaseError(
            f"label map holds value {int(label.max())}, but data.label_names names only {label_count} "
            f"value(s) (0..{label_count - 1})",
            file=spec.label,
        )
    label = label.astype(np.uint8 if label_count <= 256 else np.int32, copy=False)
    if not label.any():
        raise CaseError("the label map is empty (no foreground)", file=spec.label)
    return image, label, affine


def _check_finite(image: np.ndarray, spec: CaseSpec) -> None:
    bad = int(image.size - np.count_nonzero(np.isfinite(image)))
    if bad:
        raise CaseError(
            f"the image holds {bad} NaN or infinite voxel(s) of {image.size}; replace them (for example "
            "with the background value) before preprocessing",
            file=spec.files[0] if len(spec.files) == 1 else None,
        )


def check_grid(shape: Sequence[int], affine: np.ndarray, *, spacing: Sequence[float], max_bytes: int) -> None:
    """Refuse a voxel grid that cannot be resampled: an affine that is not finite and invertible, or one
    whose resampling to ``spacing`` would need more than ``max_bytes`` (huge declared voxel sizes): the
    resampled grid counts :data:`RESAMPLE_WORKING_SET` float32 values per voxel, what preprocessing holds.

    Args:
        shape: Voxels per axis of the image.
        affine: Its 4x4 voxel-to-world affine.
        spacing: Target spacing (mm) along the world axes (after reorientation to RAS).
        max_bytes: Largest working set accepted, in bytes.

    Raises:
        CaseError: Naming what is wrong.
    """
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    with np.errstate(all="ignore"):
        det = float(np.linalg.det(matrix)) if np.all(np.isfinite(affine)) else float("nan")
    if not np.isfinite(det) and np.all(np.isfinite(affine)):
        raise CaseError("the image's voxel sizes are too large to resample to data.spacing")
    if not np.isfinite(det) or abs(det) < 1e-12:
        raise CaseError("the image's affine (voxel sizes, orientation) is not a finite, invertible voxel-to-world transform")
    # the resampled grid keeps each voxel axis with the target spacing of the RAS axis it becomes after reorientation
    with np.errstate(all="ignore"):
        extent = np.array(
            [
                (int(n) - 1) * float(np.linalg.norm(matrix[:, axis])) / float(spacing[int(np.argmax(np.abs(matrix[:, axis])))])
                for axis, n in enumerate(shape[:3])
            ]
        )
    if not np.all(np.isfinite(extent)) or extent.max() > 2.0**40:
        raise CaseError("the image's voxel sizes are too large to resample to data.spacing")
    counts = [math.ceil(float(e) - 1e-9) + 1 for e in extent]
    problem = image_size_problem(
        counts,
        max_bytes=max_bytes,
        itemsize=4 * RESAMPLE_WORKING_SET,
        what=f"resampled to data.spacing={list(spacing)} (preprocessing holds about "
        f"{RESAMPLE_WORKING_SET} float32 values per voxel)",
    )
    if problem is not None:
        raise CaseError(problem)


def _single_slice_affine(affine: np.ndarray, settings: VolumeSettings) -> np.ndarray:
    """The rule for a single-slice series: kept as one slice in 2D when its plane is cut along the
    slice axis (its thickness set to the target slice spacing, so it stays one slice); refused in 3D."""
    if settings.spatial_dims == 3:
        raise MedsynthError("a single-slice series is not a volume (data.spatial_dims=3)")
    normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    if int(np.argmax(np.abs(normal))) != settings.slice_axis:
        raise MedsynthError(f"a single slice whose plane is not across data.slice_axis={settings.slice_axis}")
    out = np.array(affine, dtype=np.float64)
    out[:3, 2] = normal * float(settings.spacing[settings.slice_axis])
    return out


def process_case(spec: CaseSpec, settings: VolumeSettings, out_dir: str) -> dict[str, Any]:
    """Load, preprocess and cache one case; never raises for a bad case.

    Records are written with an empty split: splits are assigned once every case is known.

    Args:
        spec: The case.
        settings: Preprocessing settings.
        out_dir: The data folder.

    Returns:
        ``{"records": [...record dicts], "error": None}`` or ``{"records": [], "error": reason,
        "file": index of the file at fault (-1: the label file) or None}``; reasons are not yet scrubbed.
    """
    try:
        image, label, affine = load_case(spec, label_count=len(settings.label_names), max_bytes=settings.max_image_bytes)
        if image.shape[2] == 1 and spec.kind == "dicom":
            affine = _single_slice_affine(affine, settings)
        check_grid(image.shape, affine, spacing=settings.spacing, max_bytes=settings.max_image_bytes)
        volume, labels, vol_affine = preprocess_volume(
            image,
            label,
            affine,
            spacing=settings.spacing,
            size=settings.pad_size(),
            margin=settings.margin,
            intensity=settings.intensity_for(spec.modality),
            lower_percentile=settings.lower_percentile,
            upper_percentile=settings.upper_percentile,
            window=settings.window,
        )
        del image, label
        if not np.all(np.isfinite(volume)):
            raise MedsynthError(
                "intensity scaling gave non-finite values: the image's intensity range is too narrow or "
                "too wide to scale (a damaged scaling slope?)"
            )
        if settings.spatial_dims == 3:
            records = _volume_record(volume, labels, vol_affine, spec=spec, out_dir=out_dir)
        else:
            kept = kept_slices(labels, slice_axis=settings.slice_axis, min_foreground=settings.min_foreground)
            if not kept:
                raise MedsynthError(
                    f"no slice has {settings.min_foreground:.0%} labelled pixels after preprocessing (data.min_foreground)"
                )
            records = slice_records(
                volume,
                labels,
                vol_affine,
                kept=kept,
                splits=[""] * len(kept),
                out_dir=out_dir,
                id_prefix=spec.key,
                case=spec.patient,
                slice_axis=settings.slice_axis,
                source=spec.source,
                attributes=spec.attributes,
                level_bands=settings.level_bands,
            )
        return {"records": [dataclasses.asdict(r) for r in records], "error": None}
    except MedsynthError as err:
        reason = getattr(err, "reason", None) or str(err)
        bad = getattr(err, "file", None)
        index = spec.files.index(bad) if bad in spec.files else None
        if bad is not None and bad == spec.label:
            index = -1
        return {"records": [], "error": reason, "file": index}
    except Exception as err:  # a case must never stop the others; the reason says what happened
        return {"records": [], "error": f"unexpected error while preprocessing ({one_line(err)})", "file": None}


def _volume_record(
    volume: np.ndarray, labels: np.ndarray, vol_affine: np.ndarray, *, spec: CaseSpec, out_dir: str
) -> list[Record]:
    record_id = f"{spec.key}_vol"
    file, digest = write_record(out_dir, record_id, volume, labels)
    spacing = [float(v) for v in np.linalg.norm(vol_affine[:3, :3], axis=0)]
    return [
        Record(
            id=record_id,
            case=spec.patient,
            split="",
            file=file,
            shape=list(volume.shape[1:]),
            spacing=spacing,
            affine=vol_affine.tolist(),
            sha256=digest,
            slice_index=None,
            source=dict(spec.source),
            attributes={str(k): str(v) for k, v in spec.attributes.items()},
        )
    ]


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
    fast = preprocess_separable(
        image,
        label,
        affine,
        spacing=spacing,
        size=size,
        margin=margin,
        scaling=intensity_scaling(intensity, window=window, lower_percentile=lower_percentile, upper_percentile=upper_percentile),
        pointwise=intensity == "window",
    )
    if fast is not None:
        return fast
    chain = volume_preprocessing(
        spacing=spacing,
        lower_percentile=lower_percentile,
        upper_percentile=upper_percentile,
        spatial_size=size,
        margin=margin,
        intensity=intensity,
        window=window,
    )
    data = chain(
        {
            "image": MetaTensor(torch.from_numpy(np.asarray(image, dtype=np.float32)[None]), affine=torch.from_numpy(affine)),
            "label": MetaTensor(torch.from_numpy(label[None].astype(np.float32)), affine=torch.from_numpy(affine)),
        }
    )
    volume = data["image"].numpy().astype(np.float32)
    labels = np.rint(data["label"].numpy()).astype(np.uint8)
    return volume, labels, np.asarray(data["image"].affine, dtype=np.float64)


def kept_slices(labels: np.ndarray, *, slice_axis: int, min_foreground: float) -> list[int]:
    """Indices of the slices of a ``(1, X, Y, Z)`` label map whose labelled fraction reaches ``min_foreground``."""
    others = tuple(axis for axis in range(labels.ndim) if axis != 1 + slice_axis)
    fractions = np.count_nonzero(labels, axis=others) / max(1, labels.size // labels.shape[1 + slice_axis])
    return [int(k) for k in np.flatnonzero(fractions >= min_foreground)]


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
        level_bands: If > 0, add the attribute ``level`` (see :func:`level_band`).

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
            record_attributes["level"] = level_band(k, kept, level_bands)
        records.append(
            Record(
                id=record_id,
                case=case,
                split=split,
                file=file,
                shape=list(img.shape[1:]),
                spacing=vol_spacing,
                affine=slice_affine(vol_affine, slice_axis, k).tolist(),
                sha256=digest,
                slice_index=k,
                source=dict(source),
                attributes=record_attributes,
            )
        )
    return records


def level_band(index: int, kept: Sequence[int], bands: int) -> str:
    """The ``level`` attribute of slice ``index``: a body-region class that needs no annotation.

    Args:
        index: The slice.
        kept: The kept slices of its volume, in order.
        bands: Number of bands of equal width along the slice axis, over the kept slices.

    Returns:
        The band, ``"1"`` (lowest slice index) .. ``str(bands)``.
    """
    position = (index - kept[0]) / max(1, kept[-1] - kept[0] + 1)
    return str(1 + int(position * bands))


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
