"""Many scans in, one de-identified dataset out: DICOM exports, nnU-Net raw datasets, folders of NIfTI.

Discovery (``discover_*``) scans the input without loading pixels and turns it into
:class:`CaseSpec` s, one per volume, plus quarantine entries for everything it skips. Then
:func:`build_dataset` loads, preprocesses and caches one case at a time (optionally in worker
processes), assigns whole patients to splits and writes ``manifest.json`` and ``quarantine.json``.

What is written holds no identifier: patients and series are named by keyed hashes
(:mod:`medsynth.data.deid`), paths are relative to the input with suspicious components
pseudonymised, and error text is scrubbed of every identifying value seen in the headers.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsynth import ConfigError, MedsynthError
from medsynth.data.deid import Scrubber, pseudonym
from medsynth.data.manifest import Manifest, Record, array_hash
from medsynth.data.preprocess import kept_slices, preprocess_volume, remove_stale_records, slice_records
from medsynth.data.splits import block_splits, patient_splits
from medsynth.io import write_json
from medsynth.io.dicom import DICOMDIR, OTHER, SEG, DicomHeader, dicom_files, load_dicom_seg, load_dicom_series, read_header
from medsynth.io.nifti import load_nifti

log = logging.getLogger("medsynth")

LABEL_MODES = ("auto", "seg", "body")
INTENSITY_MODES = ("auto", "percentile", "window")
ATTRIBUTE_MATCHES = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")
BODY_LABELS = ("background", "body")
_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


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

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ConfigError(f"data.spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if len(self.spacing) != 3 or any(float(s) <= 0 for s in self.spacing):
            raise ConfigError(f"data.spacing needs 3 positive values, got {list(self.spacing)}")
        if len(self.size) != self.spatial_dims:
            raise ConfigError(f"data.size needs {self.spatial_dims} values for data.spatial_dims={self.spatial_dims}, got {list(self.size)}")
        if self.slice_axis not in (0, 1, 2):
            raise ConfigError(f"data.slice_axis must be 0, 1 or 2, got {self.slice_axis}")
        if self.intensity not in INTENSITY_MODES:
            raise ConfigError(f"data.intensity.mode must be one of {INTENSITY_MODES}, got {self.intensity!r}")
        if len(self.window) != 2 or not self.window[0] < self.window[1]:
            raise ConfigError(f"data.intensity.window must be [low, high] with low < high, got {list(self.window)}")
        if not 0.0 <= self.lower_percentile < self.upper_percentile <= 100.0:
            raise ConfigError(f"data.intensity.lower/upper must satisfy 0 <= lower < upper <= 100, got {self.lower_percentile}, {self.upper_percentile}")

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


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """One volume to preprocess. Holds raw paths: never write it out as it is.

    Attributes:
        key: Record id prefix, ``<patient>_<series>``; pseudonymous.
        patient: Pseudonymous patient id (the records' ``case``).
        kind: ``dicom`` or ``nifti``.
        files: The image's files (a DICOM series, or one NIfTI file).
        label: The label file (DICOM SEG or NIfTI), or ``None`` for a body mask.
        modality: ``CT``, ``MR``, ... (chooses the intensity preset under ``auto``).
        channel: Volume of a 4D NIfTI image to use, or ``None``.
        source: Pseudonymous description of the input, for the manifest.
        display: Pseudonymised path shown in the quarantine report.
        attributes: Per-case attributes.
        segment_names: For a SEG label, label value per segment number.
    """

    key: str
    patient: str
    kind: str
    files: tuple[str, ...]
    label: str | None
    modality: str
    channel: int | None = None
    source: Mapping[str, str] = dataclasses.field(default_factory=dict)
    display: str = ""
    attributes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    segment_names: Mapping[int, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Discovery:
    """What a scan of the input found.

    Attributes:
        cases: Volumes to preprocess.
        quarantine: Items skipped, as ``{"file", "series", "reason"}``.
        label_names: Label names of the dataset, background first.
        scrubber: Scrubber that knows every identifier seen.
        source: ``dicom``, ``nnunet``, ``folder`` or ``nifti``.
        root: The input folder (paths in reports are relative to it).
    """

    cases: list[CaseSpec]
    quarantine: list[dict[str, str | None]]
    label_names: list[str]
    scrubber: Scrubber
    source: str
    root: Path | None = None


def _entry(file: str | None, series: str | None, reason: str) -> dict[str, str | None]:
    return {"file": file, "series": series, "reason": reason}


# --- attributes CSV -----------------------------------------------------------------------


def read_attributes(
    path: str | os.PathLike[str], *, key: str, columns: Sequence[str] | None = None
) -> dict[str, dict[str, str]]:
    """Per-case attributes from a CSV with a header row.

    Args:
        path: The CSV file.
        key: The column that identifies the case (its values are matched against PatientID,
            a UID or a case name; they are never written out).
        columns: Columns to keep as attributes; ``None`` keeps every column but ``key``.

    Returns:
        Attributes per key value (empty cells are left out).

    Raises:
        ConfigError: If the file, the key column or a named column is missing, or a key repeats.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.attributes.csv: file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        if key not in header:
            raise ConfigError(f"data.attributes.key: column {key!r} is not in {path} (columns: {header})")
        keep = [c for c in header if c != key] if columns is None else list(columns)
        unknown = [c for c in keep if c not in header]
        if unknown:
            raise ConfigError(f"data.attributes.columns: {unknown} not in {path} (columns: {header})")
        table: dict[str, dict[str, str]] = {}
        for n, row in enumerate(reader, start=2):
            value = (row.get(key) or "").strip()
            if not value:
                continue
            if value in table:
                raise ConfigError(f"data.attributes.csv: {path} line {n} repeats a value of column {key!r}")
            table[value] = {c: str(row[c]).strip() for c in keep if row.get(c) not in (None, "")}
    return table


def _check_attribute_values(table: Mapping[str, Mapping[str, str]], scrubber: Scrubber) -> None:
    """Refuse attribute values that hold an identifier seen in the input (a name, an id, a date)."""
    for attributes in table.values():
        for column, value in attributes.items():
            if scrubber.text(value) != value:
                raise ConfigError(
                    f"data.attributes: column {column!r} holds values that also appear in identifying DICOM "
                    "attributes (names, ids, dates, UIDs); leave it out with data.attributes.columns")


# --- DICOM discovery --------------------------------------------------------------------


def scan_headers(files: Sequence[Path], *, workers: int = 0, progress: bool = False) -> list[DicomHeader]:
    """Read every file's header (no pixel data), in worker processes when ``workers > 1``."""
    paths = [str(f) for f in files]
    bar = _progress(len(paths), "scan", progress)
    try:
        if workers > 1 and len(paths) > 64:
            with _pool(workers) as pool:
                headers = []
                for header in pool.map(read_header, paths, chunksize=64):
                    headers.append(header)
                    bar.update(1)
                return headers
        headers = []
        for path in paths:
            headers.append(read_header(path))
            bar.update(1)
        return headers
    finally:
        bar.close()


def discover_dicom(
    root: str | os.PathLike[str],
    *,
    salt: bytes,
    labels: str = "auto",
    label_names: Sequence[str] | None = None,
    modality: str | None = None,
    attributes: Mapping[str, Mapping[str, str]] | None = None,
    attribute_match: str = "PatientID",
    exclude: Iterable[str | os.PathLike[str]] = (),
    hash_all_paths: bool = False,
    workers: int = 0,
    progress: bool = False,
) -> Discovery:
    """Find every DICOM series under ``root`` and decide what becomes a case.

    Files are grouped by SeriesInstanceUID whatever their names and folders. Skipped, each with
    a reason: files that are not DICOM or are damaged, DICOMDIR files, non-image objects
    (structured reports, presentation states, ...), images without pixel data, series of
    another modality than ``modality``, series without a SEG when labels come from SEGs, SEGs
    whose series is not in the export.

    Args:
        root: The export folder.
        salt: The project's secret salt.
        labels: ``seg`` (a SEG object referencing a series is its label map; series without
            one are skipped), ``body`` (a body mask from an intensity threshold; SEGs are
            ignored) or ``auto`` (``seg`` when the export holds a SEG, else ``body``).
        label_names: Names of the label values, background first; SEG segments are matched by
            their SegmentLabel. ``None``: background plus every segment label found (``seg``) or
            ``[background, body]``.
        modality: Keep only series of this Modality (``CT``, ``MR``, ...); ``None`` keeps all.
        attributes: Per-case attributes keyed by the value of ``attribute_match``.
        attribute_match: DICOM attribute the attribute table's keys hold.
        exclude: Folders under ``root`` not to scan (an output folder inside the export).
        hash_all_paths: Pseudonymise every path component in reports, not only suspicious ones.
        workers: Processes for the header scan.
        progress: Show a progress bar.

    Returns:
        The discovery.

    Raises:
        ConfigError: On a bad option.
        MedsynthError: If ``root`` is not a folder.
    """
    if labels not in LABEL_MODES:
        raise ConfigError(f"data.labels must be one of {LABEL_MODES}, got {labels!r}")
    if attribute_match not in ATTRIBUTE_MATCHES:
        raise ConfigError(f"data.attributes.match must be one of {ATTRIBUTE_MATCHES}, got {attribute_match!r}")
    root = Path(root)
    if not root.is_dir():
        raise MedsynthError(f"paths.input={root} is not a folder")
    headers = scan_headers(dicom_files(root, exclude=exclude), workers=workers, progress=progress)
    scrubber = Scrubber(salt, (v for h in headers for v in h.identifiers), hash_all_paths=hash_all_paths)
    if attributes:
        _check_attribute_values(attributes, scrubber)

    def show(path: str) -> str:
        return scrubber.path(path, root)

    def series_key(uid: str) -> str:
        return pseudonym(uid, salt, prefix="s", length=8)

    quarantine: list[dict[str, str | None]] = []
    series: dict[str, list[DicomHeader]] = {}
    segs: dict[str, list[DicomHeader]] = {}
    for h in headers:
        if h.kind is None:
            quarantine.append(_entry(show(h.path), None, h.error or "not a DICOM file"))
        elif h.kind == DICOMDIR:
            quarantine.append(_entry(show(h.path), None, "DICOMDIR (media directory), not an image: the files it lists are found by the folder scan"))
        elif h.kind == OTHER:
            quarantine.append(_entry(show(h.path), series_key(h.series_uid) if h.series_uid else None,
                                     f"not an image ({h.sop_class or 'unknown SOP class'}): skipped"))
        elif not h.series_uid:
            quarantine.append(_entry(show(h.path), None, "no SeriesInstanceUID: cannot tell which series the file belongs to"))
        elif h.kind == SEG:
            for uid in h.referenced_series or ("",):
                segs.setdefault(uid, []).append(h)
        elif not h.has_pixels:
            quarantine.append(_entry(show(h.path), series_key(h.series_uid), f"image without pixel data ({h.sop_class}): skipped"))
        else:
            series.setdefault(h.series_uid, []).append(h)

    mode = labels if labels != "auto" else ("seg" if segs else "body")
    if labels == "auto":
        log.info("preprocess: labels from %s (data.labels=auto)", "DICOM SEG objects" if mode == "seg" else "a body mask")
    seg_names: list[str] = []
    chosen_seg: dict[str, DicomHeader] = {}
    for uid, found in sorted(segs.items(), key=lambda kv: kv[1][0].path):
        if uid not in series:
            for h in found:
                quarantine.append(_entry(show(h.path), series_key(h.series_uid), "SEG references a series that is not in the export (or was skipped)"))
            continue
        if mode == "body":
            for h in found:
                quarantine.append(_entry(show(h.path), series_key(h.series_uid), "SEG ignored: data.labels=body makes body masks"))
            continue
        chosen_seg[uid] = found[0]
        for h in found[1:]:
            quarantine.append(_entry(show(h.path), series_key(h.series_uid), "another SEG of the same series was used (the first by path)"))
        for name in found[0].segment_labels:
            if name not in seg_names:
                seg_names.append(name)
    if mode == "seg":
        names = list(label_names) if label_names else ["background", *seg_names]
    else:
        names = list(label_names) if label_names else list(BODY_LABELS)
        if len(names) != 2:
            raise ConfigError(f"data.label_names: body masks have 2 values (background, body), got {names}")

    cases: list[CaseSpec] = []
    for uid, members in sorted(series.items(), key=lambda kv: kv[1][0].path):
        members = sorted(members, key=lambda h: h.path)
        key = series_key(uid)
        folders = sorted({show(str(Path(h.path).parent)) for h in members})
        if len(members) == 1:
            display = show(members[0].path)
        else:
            display = folders[0] if len(folders) == 1 else f"{folders[0]} (+{len(folders) - 1} folder(s))"
        series_modality = members[0].modality
        if modality and series_modality.upper() != modality.upper():
            quarantine.append(_entry(display, key, f"modality {series_modality or 'unknown'} is not data.modality={modality}"))
            continue
        label_file = None
        segment_names: dict[int, int] = {}
        if mode == "seg":
            seg = chosen_seg.get(uid)
            if seg is None:
                quarantine.append(_entry(display, key, "no SEG object references this series (data.labels=seg; use data.labels=body to keep unlabelled series)"))
                continue
            unknown = [n for n in seg.segment_labels if n not in names]
            if unknown:
                quarantine.append(_entry(show(seg.path), key, f"SEG segment label(s) {unknown} are not in data.label_names {names}"))
                continue
            label_file = seg.path
            segment_names = {number: names.index(name) for number, name in zip(seg.segment_numbers, seg.segment_labels)}
        first = members[0]
        patient_value = first.patient_id or first.study_uid or uid
        patient = pseudonym(patient_value, salt, prefix="p", length=12)
        match = {"PatientID": first.patient_id, "StudyInstanceUID": first.study_uid, "SeriesInstanceUID": uid}[attribute_match]
        case_attributes = dict((attributes or {}).get(match, {})) if match else {}
        cases.append(CaseSpec(
            key=f"{patient}_{key}", patient=patient, kind="dicom", files=tuple(h.path for h in members), label=label_file,
            modality=series_modality, source={"format": "dicom", "series": key, "files": str(len(members)),
                                              **({"seg": "yes"} if label_file else {})},
            display=display, attributes=case_attributes, segment_names=segment_names,
        ))
    return Discovery(cases, quarantine, names, scrubber, "dicom", root)


# --- NIfTI discovery --------------------------------------------------------------------


def _case_name(path: Path) -> str:
    return _NIFTI.sub("", path.name)


def discover_nnunet(
    root: str | os.PathLike[str],
    *,
    salt: bytes,
    channel: int | str | None = 0,
    attributes: Mapping[str, Mapping[str, str]] | None = None,
    modality: str | None = None,
) -> Discovery:
    """Cases of an nnU-Net v2 raw dataset: ``dataset.json``, ``imagesTr/<case>_<XXXX>``, ``labelsTr/<case>``.

    Args:
        root: The dataset folder (``DatasetXXX_Name``).
        salt: The project's secret salt; case names are pseudonymised like patient ids.
        channel: Channel to use: its index (the ``_XXXX`` suffix) or its name in
            ``channel_names``.
        attributes: Per-case attributes keyed by nnU-Net case name.
        modality: Modality for the intensity preset; ``None`` takes ``CT`` when the channel is
            named so (nnU-Net's convention), else ``MR``.

    Returns:
        The discovery; label names come from ``dataset.json``'s ``labels``.

    Raises:
        MedsynthError: If the layout or ``dataset.json`` is not as nnU-Net v2 writes it.
    """
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise MedsynthError(f"{meta_path} not found: data=nnunet expects an nnU-Net v2 raw dataset folder")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        raw_labels = dict(meta["labels"])
        channels = {str(k): str(v) for k, v in dict(meta.get("channel_names") or meta.get("modality") or {"0": "image"}).items()}
    except (ValueError, KeyError, TypeError) as err:
        raise MedsynthError(f"{meta_path}: not a valid nnU-Net dataset.json ({type(err).__name__}: {err})") from None
    if any(not isinstance(v, int) for v in raw_labels.values()):
        raise MedsynthError(f"{meta_path}: region-based labels (lists of values) are not supported; give one value per label")
    by_value = sorted(raw_labels.items(), key=lambda kv: kv[1])
    if [v for _, v in by_value] != list(range(len(by_value))):
        raise MedsynthError(f"{meta_path}: label values must be 0..N-1 without gaps, got {sorted(raw_labels.values())}")
    names = [name for name, _ in by_value]
    if isinstance(channel, str) and not channel.isdigit():
        found = [k for k, v in channels.items() if v == channel]
        if not found:
            raise ConfigError(f"data.channel={channel!r} is not a channel of {meta_path}: {channels}")
        index = int(found[0])
    else:
        index = int(channel or 0)
        if str(index) not in channels:
            raise ConfigError(f"data.channel={index} is not a channel of {meta_path}: {channels}")
    ending = str(meta.get("file_ending", ".nii.gz"))
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise MedsynthError(f"{images_dir} not found: data=nnunet expects imagesTr/ and labelsTr/")
    series_modality = modality or ("CT" if channels[str(index)].upper() == "CT" else "MR")
    scrubber = Scrubber(salt)
    quarantine: list[dict[str, str | None]] = []
    cases: list[CaseSpec] = []
    suffix = f"_{index:04d}{ending}"
    for image in sorted(images_dir.iterdir()):
        if not image.name.endswith(ending):
            if image.is_file() and not image.name.startswith("."):
                quarantine.append(_entry(f"imagesTr/{scrubber.component(image.name)}", None, f"not a {ending} file: skipped"))
            continue
        if not image.name.endswith(suffix):
            continue
        name = image.name[: -len(suffix)]
        label = labels_dir / f"{name}{ending}"
        patient = pseudonym(name, salt, prefix="p", length=12)
        display = f"imagesTr/{scrubber.component(image.name)}"
        if not label.is_file():
            quarantine.append(_entry(display, None, f"no label map labelsTr/<case>{ending} for this image"))
            continue
        cases.append(CaseSpec(
            key=patient, patient=patient, kind="nifti", files=(str(image),), label=str(label), modality=series_modality,
            source={"format": "nnunet", "case": patient, "channel": str(index)}, display=display,
            attributes=dict((attributes or {}).get(name, {})),
        ))
    if not cases and not quarantine:
        raise MedsynthError(f"{images_dir} holds no image of channel {index} (files named <case>{suffix})")
    return Discovery(cases, quarantine, names, scrubber, "nnunet", root)


def discover_folder(
    root: str | os.PathLike[str],
    *,
    salt: bytes,
    channel: int | None = None,
    modality: str | None = None,
    attributes: Mapping[str, Mapping[str, str]] | None = None,
    label_names: Sequence[str] | None = None,
) -> Discovery:
    """Every NIfTI image under ``root`` as an unlabelled case (a body mask becomes its label map).

    Args:
        root: The folder.
        salt: The project's secret salt.
        channel: Volume of 4D images to use; a 4D image with several volumes and no channel is refused.
        modality: ``CT`` selects the HU window under ``data.intensity.mode=auto``.
        attributes: Per-case attributes keyed by file name without ``.nii[.gz]``.
        label_names: Two names for background and body.

    Returns:
        The discovery.
    """
    root = Path(root)
    if not root.is_dir():
        raise MedsynthError(f"paths.input={root} is not a folder")
    names = list(label_names) if label_names else list(BODY_LABELS)
    if len(names) != 2:
        raise ConfigError(f"data.label_names: body masks have 2 values (background, body), got {names}")
    scrubber = Scrubber(salt)
    cases = []
    quarantine: list[dict[str, str | None]] = []
    for path in dicom_files(root):
        display = scrubber.path(path, root)
        if not _NIFTI.search(path.name):
            quarantine.append(_entry(display, None, "not a NIfTI file (.nii or .nii.gz): skipped"))
            continue
        name = _case_name(path)
        patient = pseudonym(name, salt, prefix="p", length=12)
        cases.append(CaseSpec(
            key=patient, patient=patient, kind="nifti", files=(str(path),), label=None, modality=modality or "",
            channel=channel, source={"format": "nifti", "case": patient}, display=display,
            attributes=dict((attributes or {}).get(name, {})),
        ))
    if not cases:
        raise MedsynthError(f"no NIfTI image (.nii, .nii.gz) under paths.input={root}")
    return Discovery(cases, quarantine, names, scrubber, "folder", root)


def nifti_pair_case(image: str | os.PathLike[str], label: str | os.PathLike[str], *, case_id: str, label_names: Sequence[str],
                    modality: str = "MR", attributes: Mapping[str, str] | None = None) -> Discovery:
    """One NIfTI image with its label map as a single-case discovery (``data=nifti`` / the demo in 3D)."""
    case = CaseSpec(
        key=case_id, patient=case_id, kind="nifti", files=(str(image),), label=str(label), modality=modality,
        source={"image": str(image), "label": str(label)}, display=Path(image).name, attributes=dict(attributes or {}),
    )
    return Discovery([case], [], list(label_names), Scrubber(b""), "nifti")


# --- one case -----------------------------------------------------------------------------


def body_mask(volume: np.ndarray, *, modality: str) -> np.ndarray:
    """A foreground ("body") mask: above -500 HU for CT, above Otsu's threshold otherwise; holes filled.

    Args:
        volume: ``(X, Y, Z)`` intensities (HU for CT).
        modality: The case's modality.

    Returns:
        ``uint8`` mask, 1 inside the body.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    if modality.upper() == "CT":
        threshold = -500.0
    else:
        finite = volume[np.isfinite(volume)]
        threshold = float(threshold_otsu(finite)) if finite.size and finite.min() < finite.max() else float("inf")
    mask = volume > threshold
    mask = ndimage.binary_fill_holes(mask) if mask.any() else mask
    return mask.astype(np.uint8)


def _load_nifti_image(path: str, channel: int | None) -> tuple[np.ndarray, np.ndarray]:
    image, affine = load_nifti(path)
    if image.ndim == 4:
        volumes = image.shape[3]
        if channel is None and volumes > 1:
            raise MedsynthError(f"4D image with {volumes} volumes: choose one with data.channel (0..{volumes - 1})")
        index = 0 if channel is None else int(channel)
        if not 0 <= index < volumes:
            raise MedsynthError(f"data.channel={index} but the 4D image has {volumes} volumes")
        image = image[..., index]
    elif image.ndim != 3:
        raise MedsynthError(f"expected a 3D image (or 4D with data.channel), got {image.ndim}D")
    return np.ascontiguousarray(image), affine


def load_case(spec: CaseSpec, *, label_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load a case's image and label map on one grid.

    Args:
        spec: The case.
        label_count: Number of label names; a label value at or above it is refused.

    Returns:
        ``(image, label, affine)``.

    Raises:
        MedsynthError: For anything that keeps the case out of the dataset.
    """
    if spec.kind == "dicom":
        image, affine = load_dicom_series(spec.files)
    else:
        image, affine = _load_nifti_image(spec.files[0], spec.channel)
    if spec.label is None:
        label = body_mask(image, modality=spec.modality)
    elif spec.kind == "dicom":
        segments, _ = load_dicom_seg(spec.label, affine=affine, shape=image.shape)
        lookup = np.zeros(int(segments.max()) + 1, dtype=np.int64)
        for number, value in spec.segment_names.items():
            if number < lookup.size:
                lookup[number] = value
        label = lookup[segments]
    else:
        label, label_affine = load_nifti(spec.label)
        if label.shape != image.shape:
            raise MedsynthError(f"label map has shape {label.shape}, image {image.shape}")
        if not np.allclose(label_affine, affine, atol=1e-3):
            raise MedsynthError("label map and image have different affines (voxel grids)")
        if np.any(label < 0) or not np.allclose(label, np.round(label)):
            raise MedsynthError("label map must hold non-negative integer values")
    label = np.asarray(label).astype(np.uint8 if label_count <= 256 else np.int32, copy=False)
    if label.max(initial=0) >= label_count:
        raise MedsynthError(f"label map holds value {int(label.max())}, but only {label_count} label names are given")
    if not label.any():
        raise MedsynthError("the label map is empty (no foreground)")
    return image, label, affine


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
        image, label, affine = load_case(spec, label_count=len(settings.label_names))
        if image.shape[2] == 1 and spec.kind == "dicom":
            affine = _single_slice_affine(affine, settings)
        volume, labels, vol_affine = preprocess_volume(
            image, label, affine, spacing=settings.spacing, size=settings.pad_size(), margin=settings.margin,
            intensity=settings.intensity_for(spec.modality), lower_percentile=settings.lower_percentile,
            upper_percentile=settings.upper_percentile, window=settings.window,
        )
        del image, label
        if settings.spatial_dims == 3:
            records = _volume_record(volume, labels, vol_affine, spec=spec, out_dir=out_dir)
        else:
            kept = kept_slices(labels, slice_axis=settings.slice_axis, min_foreground=settings.min_foreground)
            if not kept:
                raise MedsynthError(f"no slice has {settings.min_foreground:.0%} labelled pixels after preprocessing (data.min_foreground)")
            records = slice_records(
                volume, labels, vol_affine, kept=kept, splits=[""] * len(kept), out_dir=out_dir, id_prefix=spec.key,
                case=spec.patient, slice_axis=settings.slice_axis, source=spec.source, attributes=spec.attributes,
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
        return {"records": [], "error": f"unexpected error while preprocessing ({type(err).__name__}: {err})", "file": None}


def _volume_record(volume: np.ndarray, labels: np.ndarray, vol_affine: np.ndarray, *, spec: CaseSpec, out_dir: str) -> list[Record]:
    from medsynth.data.manifest import write_record

    record_id = f"{spec.key}_vol"
    file, digest = write_record(out_dir, record_id, volume, labels)
    spacing = [float(v) for v in np.linalg.norm(vol_affine[:3, :3], axis=0)]
    return [Record(
        id=record_id, case=spec.patient, split="", file=file,
        shape=list(volume.shape[1:]), spacing=spacing, affine=vol_affine.tolist(), sha256=digest, slice_index=None,
        source=dict(spec.source), attributes={str(k): str(v) for k, v in spec.attributes.items()},
    )]


# --- the dataset --------------------------------------------------------------------------


def _fingerprint(spec: CaseSpec, settings: VolumeSettings) -> str:
    """Hash of the case's input files (size, mtime), settings and attributes."""
    digest = hashlib.sha256()
    for path in (*spec.files, *([spec.label] if spec.label else [])):
        stat = os.stat(path)
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    digest.update(json.dumps([settings.as_dict(), dict(spec.attributes), dict(spec.source), spec.channel,
                              sorted(spec.segment_names.items()), spec.modality], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _cached(out_dir: Path, spec: CaseSpec, fingerprint: str) -> dict[str, Any] | None:
    """The result of an earlier run of this case if its fingerprint matches: its records if every
    record file still verifies, or the reason it was quarantined."""
    path = out_dir / "cases" / f"{spec.key}.json"
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if body.get("fingerprint") != fingerprint:
        return None
    if body.get("error"):
        return {"records": [], "error": body["error"], "file": body.get("file")}
    if not body.get("records"):
        return None
    for record in body["records"]:
        try:
            with np.load(out_dir / record["file"]) as npz:
                if array_hash(npz["image"], npz["label"]) != record["sha256"]:
                    return None
        except (OSError, KeyError, ValueError):
            return None
    return {"records": list(body["records"]), "error": None}


def _pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    # spawn: torch and MONAI are not fork-safe once their thread pools are up.
    return concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_worker_init)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=f"preprocess: {desc}", unit="case" if desc == "cases" else "file",
                disable=not enabled, file=sys.stderr, leave=False)


def assign_splits(records: Sequence[Record], *, spatial_dims: int, fractions: Mapping[str, float], block: int,
                  gap: int) -> list[Record]:
    """Give every record its split: whole patients per split, so no patient is in two splits.

    With fewer patients (with records) than splits that have a positive share: 3D records all go
    to train; 2D records are split in blocks of slices within each case, as the single-volume demo
    is (the splits then share patients, which is logged as a warning because privacy figures
    become optimistic). Gap slices are left out.

    Args:
        records: Records of every case, split still empty.
        spatial_dims: 2 or 3.
        fractions: Split shares.
        block: Slices per block in the fallback.
        gap: Slices dropped between blocks in the fallback.

    Returns:
        The records that stay, with their split.

    Raises:
        ConfigError: On bad fractions.
    """
    patients = sorted({r.case for r in records})
    names = [n for n, share in fractions.items() if share > 0]
    try:
        by_patient = patient_splits(patients, fractions=fractions)
    except ValueError as err:
        if "sum to 1" in str(err) or "non-negative" in str(err):
            raise ConfigError(f"data.splits.fractions: {err}") from None
        by_patient = None
    if by_patient is not None:
        return [dataclasses.replace(r, split=by_patient[r.case]) for r in records]
    if spatial_dims == 3:
        log.warning("preprocess: %d patient(s) cannot fill the splits %s: every volume goes to train", len(patients), names)
        return [dataclasses.replace(r, split="train") for r in records]
    log.warning(
        "preprocess: %d patient(s) cannot fill the splits %s: slices are split in blocks within each case, so the "
        "splits share patients and privacy figures are optimistic", len(patients), names)
    by_case: dict[str, list[Record]] = {}
    for r in records:
        by_case.setdefault(r.id.rsplit("_s", 1)[0], []).append(r)
    out = []
    for case_records in by_case.values():
        case_records.sort(key=lambda r: r.slice_index or 0)
        try:
            splits = block_splits(len(case_records), block=block, gap=gap, fractions=fractions)
        except ValueError as err:
            raise ConfigError(f"data.splits: {err}") from None
        out.extend(dataclasses.replace(r, split=s) for r, s in zip(case_records, splits) if s is not None)
    return out


def build_dataset(
    discovery: Discovery,
    *,
    out_dir: str | os.PathLike[str],
    settings: VolumeSettings,
    fractions: Mapping[str, float] | None = None,
    block: int = 8,
    gap: int = 2,
    workers: int = 0,
    progress: bool = False,
    extra_settings: Mapping[str, Any] | None = None,
) -> Manifest:
    """Preprocess every discovered case into records, then write ``manifest.json`` and ``quarantine.json``.

    One case at a time is in memory per worker. A case whose input files (sizes, modification
    times) and settings are unchanged since the last run, and whose cached records still
    match their hashes, is reused without loading it. Cases that fail are added to the
    quarantine with a scrubbed reason; the others go on.

    Args:
        discovery: What to preprocess.
        out_dir: The data folder.
        settings: Preprocessing settings (``label_names`` is taken from the discovery).
        fractions: Split shares; default 70/10/20 train/validation/holdout.
        block: Slices per block when cases must be split in blocks.
        gap: Slices dropped between blocks.
        workers: Worker processes (0 or 1: in this process).
        progress: Show a progress bar.
        extra_settings: More provenance for the manifest's settings.

    Returns:
        The written manifest.

    Raises:
        MedsynthError: If no case makes it into the dataset (the quarantine is still written).
    """
    out = Path(out_dir)
    settings = dataclasses.replace(settings, label_names=tuple(discovery.label_names))
    fractions = dict(fractions or {"train": 0.7, "validation": 0.1, "holdout": 0.2})
    quarantine = list(discovery.quarantine)
    records: list[Record] = []
    todo: list[tuple[CaseSpec, str]] = []
    reused = 0
    cached: list[tuple[CaseSpec, str, dict[str, Any]]] = []
    for spec in discovery.cases:
        fingerprint = _fingerprint(spec, settings)
        earlier = _cached(out, spec, fingerprint)
        if earlier is not None:
            cached.append((spec, fingerprint, earlier))
        else:
            todo.append((spec, fingerprint))

    def finish(spec: CaseSpec, fingerprint: str, result: dict[str, Any], *, save: bool = True) -> None:
        if result["error"] is not None:
            index = result.get("file")
            where = spec.display
            if index == -1 and spec.label and discovery.root is not None:
                where = discovery.scrubber.path(spec.label, discovery.root)
            elif index is not None and index >= 0 and len(spec.files) > 1 and discovery.root is not None:
                where = discovery.scrubber.path(spec.files[index], discovery.root)
            reason = discovery.scrubber.text(str(result["error"]))
            quarantine.append(_entry(where, spec.source.get("series") or spec.key, reason))
            if save:
                write_json(out / "cases" / f"{spec.key}.json", {"fingerprint": fingerprint, "error": reason, "file": index})
            return
        records.extend(Record(**r) for r in result["records"])
        if save:
            write_json(out / "cases" / f"{spec.key}.json", {"fingerprint": fingerprint, "records": result["records"]})

    for spec, fingerprint, earlier in cached:
        finish(spec, fingerprint, earlier, save=False)
        reused += 1

    bar = _progress(len(todo), "cases", progress)
    try:
        if workers > 1 and len(todo) > 1:
            with _pool(workers) as pool:
                futures = {pool.submit(process_case, spec, settings, str(out)): (spec, fp) for spec, fp in todo}
                for future in concurrent.futures.as_completed(futures):
                    spec, fp = futures[future]
                    finish(spec, fp, future.result())
                    bar.update(1)
        else:
            for spec, fp in todo:
                finish(spec, fp, process_case(spec, settings, str(out)))
                bar.update(1)
    finally:
        bar.close()

    written = {r.file for r in records}
    records = assign_splits(sorted(records, key=lambda r: r.id), spatial_dims=settings.spatial_dims,
                            fractions=fractions, block=block, gap=gap)
    quarantine_path = write_json(out / "quarantine.json", {"count": len(quarantine), "items": quarantine})
    log.info("preprocess: %d case(s): %d preprocessed, %d reused from the cache; %d item(s) quarantined -> %s",
             len(discovery.cases), len(todo), reused, len(quarantine), quarantine_path)
    if not records:
        raise MedsynthError(f"no case made it into the dataset; see {quarantine_path} for why each item was skipped")
    keys = {spec.key for spec in discovery.cases}
    manifest = Manifest(
        root=out, spatial_dims=settings.spatial_dims, label_names=list(discovery.label_names), records=records,
        settings={
            "source": discovery.source, **settings.as_dict(), "splits": {"fractions": fractions, "block": block, "gap": gap},
            "cases": len({r.case for r in records}), "quarantined": len(quarantine), **dict(extra_settings or {}),
        },
    )
    manifest.write()
    remove_stale_records(out, written)  # gap slices stay cached for the next run
    for stale in (out / "cases").glob("*.json"):
        if stale.stem not in keys:
            stale.unlink()
    return manifest


__all__ = [
    "CaseSpec",
    "Discovery",
    "VolumeSettings",
    "body_mask",
    "build_dataset",
    "discover_dicom",
    "discover_folder",
    "discover_nnunet",
    "load_case",
    "nifti_pair_case",
    "process_case",
    "read_attributes",
    "assign_splits",
    "scan_headers",
]
