"""Reading DICOM: file headers for grouping, one series as a volume with its affine, SEG label maps.

With :mod:`medsynth.io.nifti` the only place pydicom is imported. Geometry follows nibabel's
convention: a volume is indexed ``(i, j, k)`` = (column, row, slice) and its affine maps voxel
indices to RAS+ millimetres (DICOM's LPS with x and y negated).

Messages of :class:`DicomSeriesError` carry a ``reason`` that holds no value read from a header
(no name, id, date or UID), so callers can report it without leaking identifiers.

The module is one piece because headers, series geometry and SEG placement share one set of
rules (which tags identify a series, how slices are ordered, what the affine is): a SEG is put on
its series' grid with the same code that built that grid.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from medsynth import MedsynthError

# pydicom warns with header values in the message (an invalid UID, a malformed name): keep it quiet.
logging.getLogger("pydicom").setLevel(logging.CRITICAL)
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

IMAGE = "image"
SEG = "seg"
DICOMDIR = "dicomdir"
OTHER = "other"

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
MEDIA_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"

# Transfer syntaxes pydicom does not name itself, so a refusal can still say what the data is.
_EXTRA_SYNTAX_NAMES = {
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
    "1.2.840.10008.1.2.4.100": "MPEG2 Main Profile / Main Level",
    "1.2.840.10008.1.2.4.102": "MPEG-4 AVC/H.264 High Profile",
    "1.2.840.10008.1.2.4.107": "HEVC/H.265 Main Profile",
}

# Attributes that the DICOM Basic Application Level Confidentiality Profile removes or replaces,
# by keyword; with every PN, DA, DT, TM and non-registry UI value they make a header's identifiers.
IDENTIFYING_KEYWORDS = frozenset({
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "OtherPatientIDsSequence",
    "PatientBirthDate", "PatientBirthTime", "PatientBirthName", "PatientMotherBirthName", "PatientAddress",
    "PatientTelephoneNumbers", "PatientComments", "AdditionalPatientHistory", "MedicalRecordLocator",
    "IssuerOfPatientID", "MilitaryRank", "BranchOfService", "Occupation", "CountryOfResidence", "RegionOfResidence",
    "EthnicGroup", "PatientReligiousPreference", "PatientInsurancePlanCodeSequence",
    "AccessionNumber", "StudyID", "StudyDescription", "SeriesDescription", "ImageComments", "StudyComments",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "OperatorsName",
    "RequestingPhysician", "ScheduledPerformingPhysicianName", "RequestedProcedureDescription",
    "PerformedProcedureStepDescription", "PerformedProcedureStepID", "ScheduledProcedureStepDescription",
    "AdmittingDiagnosesDescription", "DerivationDescription", "ProtocolName", "AcquisitionComments",
    "ContentCreatorName", "RequestAttributesSequence", "ReasonForStudy", "RequestedProcedureID",
    "AdmissionID", "PerformedLocation", "ScheduledStudyLocation", "OtherPatientIDs", "PatientAge",
    "PatientSize", "PatientWeight", "SegmentAlgorithmName", "SegmentDescription", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "ClinicalTrialSiteName", "ClinicalTrialSponsorName", "TextValue",
    "ContentSequence", "FrameComments", "LabelText",
})
_IDENTIFYING_VRS = frozenset({"PN", "DA", "DT", "TM"})
_CONVERTED_VRS = frozenset({"PN", "DA", "DT", "TM", "UI", "SQ"})
_PIXEL_GROUP = 0x7FE00000


def transfer_syntax_name(uid: str) -> str:
    """A person-readable name of a transfer syntax UID (the UID itself when unknown)."""
    name = UID(uid).name
    if name == uid:
        name = _EXTRA_SYNTAX_NAMES.get(uid, "unknown transfer syntax")
    return f"{name} ({uid})"


class DicomSeriesError(MedsynthError):
    """A DICOM series medsynth refuses to read.

    Attributes:
        reason: What is wrong, without any header value that could identify a patient.
        file: The file at fault, when one is.
    """

    def __init__(self, reason: str, file: str | os.PathLike[str] | None = None) -> None:
        self.reason = reason
        self.file = None if file is None else str(file)
        super().__init__(f"{self.file}: {reason}" if self.file else reason)


@dataclasses.dataclass(frozen=True)
class DicomHeader:
    """What a header scan learns about one file, enough to group files into series.

    Attributes:
        path: The file.
        kind: ``image``, ``seg``, ``dicomdir`` or ``other`` (structured report, presentation
            state, ...); ``None`` when the file could not be read as DICOM.
        error: Why the file could not be read (no identifiers in it), else ``None``.
        sop_class: Name of the SOP class, e.g. ``CT Image Storage``.
        modality: The Modality attribute.
        transfer_syntax: The transfer syntax UID.
        patient_id: PatientID (identifying: never write it out).
        study_uid: StudyInstanceUID (identifying).
        series_uid: SeriesInstanceUID (identifying).
        has_pixels: Whether the file holds pixel data.
        referenced_series: For a SEG, the SeriesInstanceUIDs it references (identifying).
        identifiers: Every identifying value of the header, to scrub from text.
    """

    path: str
    kind: str | None
    error: str | None = None
    sop_class: str = ""
    modality: str = ""
    transfer_syntax: str = ""
    patient_id: str = ""
    study_uid: str = ""
    series_uid: str = ""
    has_pixels: bool = False
    referenced_series: tuple[str, ...] = ()
    segment_numbers: tuple[int, ...] = ()
    segment_labels: tuple[str, ...] = ()
    identifiers: tuple[str, ...] = ()


def _read(path: str | os.PathLike[str], **kwargs: Any) -> Dataset:
    """``dcmread`` without warnings; falls back to ``force`` only for files that are clearly DICOM."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path, **kwargs)
        except InvalidDicomError:
            ds = pydicom.dcmread(path, force=True, **kwargs)
            if "SOPClassUID" not in ds or "SeriesInstanceUID" not in ds:
                raise
            return ds


def identifying_values(ds: Dataset) -> set[str]:
    """Every value of ``ds`` (sequences included) that could identify a patient or a study.

    Values of the confidentiality profile's attributes, of every person name, date, date-time
    and time, and of every UID that is not a registry UID (SOP classes, transfer syntaxes).
    """
    found: set[str] = set()

    def visit(dataset: Dataset) -> None:
        for tag in list(dataset.keys()):
            if tag >= _PIXEL_GROUP or tag.is_private:
                continue  # pixel data (deferred: touching it would read it) and private tags are never written out
            vr = getattr(dataset.get_item(tag), "VR", None)
            if vr is None:
                try:
                    vr = dictionary_VR(tag)
                except KeyError:
                    vr = "UN"
            if vr not in _CONVERTED_VRS and keyword_for_tag(tag) not in IDENTIFYING_KEYWORDS:
                continue  # converting every element is the slow part of a header scan
            element = dataset[tag]
            if element.VR == "SQ":
                for item in element.value or ():
                    visit(item)
                continue
            identifying = element.keyword in IDENTIFYING_KEYWORDS or element.VR in _IDENTIFYING_VRS
            if element.VR == "UI":
                identifying = True
            if not identifying or element.value is None:
                continue
            values = element.value if isinstance(element.value, (list, tuple, pydicom.multival.MultiValue)) else [element.value]
            for value in values:
                text = str(value).strip()
                if not text:
                    continue
                if element.VR == "UI" and UID(text).name != text:
                    continue  # a registry UID (SOP class, transfer syntax, coding scheme) identifies no one
                found.add(text)
                if element.VR == "PN":
                    found.update(part for part in text.replace("=", "^").split("^") if part.strip())

    visit(ds)
    if hasattr(ds, "file_meta"):
        visit(ds.file_meta)
    return found


def read_header(path: str | os.PathLike[str]) -> DicomHeader:
    """Read one file's header (pixel data is not loaded) and classify it.

    Args:
        path: Any file; files that are not DICOM come back with ``kind=None`` and an ``error``.

    Returns:
        The header summary.
    """
    path = str(path)
    try:
        ds = _read(path, defer_size=1024)
    except InvalidDicomError:
        return DicomHeader(path, None, "not a DICOM file")
    except Exception as err:  # pydicom raises many types for damaged files
        return DicomHeader(path, None, f"cannot read the DICOM header (damaged or truncated file): {type(err).__name__}")
    meta = getattr(ds, "file_meta", None)
    sop = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""))
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    if sop == MEDIA_DIRECTORY_SOP_CLASS or "DirectoryRecordSequence" in ds:
        kind = DICOMDIR
    elif sop == SEG_SOP_CLASS:
        kind = SEG
    elif has_pixels or "Rows" in ds or UID(sop).name.endswith("Image Storage"):
        kind = IMAGE  # an image object without pixel data is quarantined as such, not as a non-image
    else:
        kind = OTHER
    referenced: tuple[str, ...] = ()
    numbers: tuple[int, ...] = ()
    labels: tuple[str, ...] = ()
    if kind == SEG:
        referenced = tuple(str(item.get("SeriesInstanceUID", "")) for item in ds.get("ReferencedSeriesSequence", []) or [])
        segments = sorted(ds.get("SegmentSequence", []) or [], key=lambda s: int(s.SegmentNumber))
        numbers = tuple(int(s.SegmentNumber) for s in segments)
        labels = tuple(str(s.get("SegmentLabel", "") or f"segment_{int(s.SegmentNumber)}") for s in segments)
    try:
        identifiers = identifying_values(ds)
    except Exception:  # a damaged element deep in a sequence: the values we could read still count
        identifiers = set()
    for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = str(ds.get(keyword, "") or "")
        if value:
            identifiers.add(value)
    return DicomHeader(
        path=path, kind=kind, sop_class=UID(sop).name if sop else "", modality=str(ds.get("Modality", "") or ""),
        transfer_syntax=syntax, patient_id=str(ds.get("PatientID", "") or ""),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""), series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        has_pixels=has_pixels, referenced_series=referenced, segment_numbers=numbers, segment_labels=labels,
        identifiers=tuple(sorted(identifiers)),
    )


# --- one series as a volume -------------------------------------------------------------


@dataclasses.dataclass
class _Plane:
    """One 2D frame of a series with its geometry."""

    index: int                   # position in the input (file index, or frame index of a multi-frame object)
    file: str
    position: np.ndarray         # ImagePositionPatient (LPS mm)
    orientation: np.ndarray      # ImageOrientationPatient (6 cosines)
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns)
    slope: float
    intercept: float
    shape: tuple[int, int]       # (rows, columns)
    thickness: float | None


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return array if array.shape == (n,) and np.all(np.isfinite(array)) else None


def _first(ds: Dataset | None, sequence: str) -> Dataset | None:
    if ds is None or sequence not in ds or not ds[sequence].value:
        return None
    return ds[sequence].value[0]


def _group_value(groups: Sequence[Dataset | None], sequence: str, keyword: str) -> Any:
    """A value from the first functional group (per-frame first, then shared) that has it."""
    for group in groups:
        item = _first(group, sequence)
        if item is not None and keyword in item and item[keyword].value not in (None, ""):
            return item[keyword].value
    return None


def _planes_of_multiframe(ds: Dataset, file: str) -> list[_Plane]:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []) or [])
    if len(per_frame) not in (0, frames):
        raise DicomSeriesError(f"the multi-frame object has {frames} frames but {len(per_frame)} per-frame descriptions", file)
    planes = []
    for f in range(frames):
        groups = [per_frame[f] if per_frame else None, shared]
        position = _group_value(groups, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _group_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _group_value(groups, "PixelMeasuresSequence", "PixelSpacing")
        thickness = _group_value(groups, "PixelMeasuresSequence", "SpacingBetweenSlices") or _group_value(
            groups, "PixelMeasuresSequence", "SliceThickness")
        slope = _group_value(groups, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _group_value(groups, "PixelValueTransformationSequence", "RescaleIntercept")
        if position is None and frames == 1:
            position = ds.get("ImagePositionPatient")
        if orientation is None:
            orientation = ds.get("ImageOrientationPatient")
        if spacing is None:
            spacing = ds.get("PixelSpacing")
        planes.append(_plane(f, file, ds, position, orientation, spacing, slope, intercept, thickness))
    return planes


def _plane(index: int, file: str, ds: Dataset, position: Any, orientation: Any, spacing: Any,
           slope: Any = None, intercept: Any = None, thickness: Any = None) -> _Plane:
    pos, ori, pix = _floats(position or (), 3), _floats(orientation or (), 6), _floats(spacing or (), 2)
    missing = [name for name, v in (("ImagePositionPatient", pos), ("ImageOrientationPatient", ori), ("PixelSpacing", pix)) if v is None]
    if missing:
        raise DicomSeriesError(
            f"no patient geometry ({', '.join(missing)} missing or malformed): a projection image or a "
            "secondary capture cannot be placed in a volume", file)
    if np.any(pix <= 0):
        raise DicomSeriesError("PixelSpacing must be positive", file)
    slope = ds.get("RescaleSlope", 1.0) if slope is None else slope
    intercept = ds.get("RescaleIntercept", 0.0) if intercept is None else intercept
    if thickness is None:
        thickness = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    try:
        thick = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        thick = None
    return _Plane(
        index=index, file=file, position=pos, orientation=ori, spacing=(float(pix[0]), float(pix[1])),
        slope=float(slope if slope not in (None, "") else 1.0), intercept=float(intercept if intercept not in (None, "") else 0.0),
        shape=(int(ds.Rows), int(ds.Columns)), thickness=thick if thick and thick > 0 else None,
    )


def _pixels(ds: Dataset, file: str) -> np.ndarray:
    """Decoded stored values; a refusal names the transfer syntax when decoding is the problem."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomSeriesError("the image holds no pixel data", file)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise DicomSeriesError(f"colour images ({ds.get('PhotometricInterpretation', '?')}) are not supported; expected greyscale", file)
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.pixel_array
    except (NotImplementedError, RuntimeError, ValueError, AttributeError, KeyError, TypeError, OSError, EOFError) as err:
        known = UID(syntax).is_transfer_syntax if syntax else True
        if syntax and (not known or UID(syntax).is_compressed) and _is_decoder_problem(err):
            raise DicomSeriesError(
                f"pixel data in transfer syntax {transfer_syntax_name(syntax)} cannot be decoded with the installed "
                "plugins (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pyjpegls); convert the files, for "
                "example with dcmtk's dcmdjpeg, or install a decoder", file) from None
        raise DicomSeriesError(f"the pixel data is damaged or truncated ({type(err).__name__})", file) from None


def _is_decoder_problem(err: Exception) -> bool:
    text = str(err).lower()
    return isinstance(err, NotImplementedError) or any(
        word in text for word in ("decod", "plugin", "transfer syntax", "not supported", "no pixel data handler", "unable to"))


def _read_planes(files: Sequence[str]) -> tuple[list[_Plane], list[np.ndarray]]:
    """Read every file, returning its planes and their stored values (rows, columns)."""
    planes: list[_Plane] = []
    arrays: list[np.ndarray] = []
    for i, file in enumerate(files):
        try:
            ds = _read(file)
        except InvalidDicomError:
            raise DicomSeriesError("not a DICOM file", file) from None
        except Exception as err:
            raise DicomSeriesError(f"cannot read the file (damaged or truncated): {type(err).__name__}", file) from None
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
        if frames > 1 or enhanced:
            if len(files) > 1:
                raise DicomSeriesError(
                    f"the series mixes {len(files)} files with a multi-frame object; expected one multi-frame object "
                    "or single-frame files only", file)
            new = _planes_of_multiframe(ds, file)
            data = _pixels(ds, file)
            data = data.reshape(len(new), *data.shape[-2:])
            planes.extend(new)
            arrays.extend(data[f] for f in range(len(new)))
        else:
            plane = _plane(i, file, ds, ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), ds.get("PixelSpacing"))
            planes.append(plane)
            arrays.append(_pixels(ds, file))
    return planes, arrays


def _check_and_sort(
    planes: list[_Plane], arrays: list[np.ndarray], *, spacing_tolerance: float, max_tilt_degrees: float
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Order the planes along the slice normal after checking the stack is a regular grid.

    Returns:
        ``(order, normal, step)``: plane indices sorted along the normal, the unit normal and the
        LPS vector from one slice to the next.
    """
    shapes = sorted({p.shape for p in planes})
    if len(shapes) > 1:
        sizes = ", ".join(f"{r}x{c}" for r, c in shapes)
        raise DicomSeriesError(f"slices of different sizes in one series (rows x columns: {sizes})")
    first = planes[0].orientation
    if any(np.abs(p.orientation - first).max() > 1e-4 for p in planes):
        raise DicomSeriesError("slices have different orientations (a localizer or a multi-plane series)")
    row, col = first[:3], first[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(float(row @ col)) > 1e-3:
        raise DicomSeriesError(
            f"non-orthogonal ImageOrientationPatient (row/column cosines at {np.degrees(np.arccos(np.clip(row @ col, -1, 1))):.2f} degrees)")
    if any(p.spacing != planes[0].spacing for p in planes):
        raise DicomSeriesError("slices have different PixelSpacing")
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    distance = np.array([p.position @ normal for p in planes])
    order = [int(i) for i in np.argsort(distance, kind="stable")]
    if len(planes) == 1:
        thickness = planes[0].thickness or 1.0
        return order, normal, normal * thickness

    # Duplicate positions: identical copies are dropped; different images at one place are refused.
    keep = [order[0]]
    for i in order[1:]:
        if abs(distance[i] - distance[keep[-1]]) < 1e-3:
            if np.array_equal(arrays[i], arrays[keep[-1]]):
                continue
            same = sum(abs(distance[j] - distance[i]) < 1e-3 for j in order)
            raise DicomSeriesError(
                f"{same} different slices share one position along the slice normal (several echoes, phases or "
                "acquisitions in one series?)")
        keep.append(i)
    order = keep
    if len(order) == 1:
        thickness = planes[order[0]].thickness or 1.0
        return order, normal, normal * thickness
    gaps = np.diff(distance[order])
    typical = float(np.median(gaps))
    tolerance = max(spacing_tolerance * typical, 1e-3)
    if np.abs(gaps - typical).max() > tolerance:
        smallest = float(gaps.min())
        multiples = gaps / smallest
        if np.all(np.abs(multiples - np.rint(multiples)) * smallest <= tolerance):
            missing = int(np.rint(multiples).sum() - len(gaps))
            raise DicomSeriesError(
                f"{missing} slice(s) missing: gaps of up to {gaps.max():.3g} mm in a series spaced {smallest:.3g} mm")
        raise DicomSeriesError(f"inconsistent slice spacing: gaps from {gaps.min():.3g} to {gaps.max():.3g} mm")
    step = (planes[order[-1]].position - planes[order[0]].position) / (len(order) - 1)
    cos = abs(float(step @ normal)) / max(float(np.linalg.norm(step)), 1e-12)
    tilt = float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
    if tilt > max_tilt_degrees:
        raise DicomSeriesError(
            f"the slices are sheared by {tilt:.2f} degrees against their normal (gantry tilt); resample the series "
            "to an orthogonal grid first")
    deviation = np.array([np.linalg.norm(planes[i].position - (planes[order[0]].position + n * step)) for n, i in enumerate(order)])
    if deviation.max() > tolerance + 1e-2:
        raise DicomSeriesError(f"slice positions do not lie on one line (off by up to {deviation.max():.3g} mm)")
    return order, normal, step


def series_affine(position: np.ndarray, orientation: np.ndarray, spacing: Sequence[float], step: np.ndarray) -> np.ndarray:
    """The RAS+ affine of a slice stack from its DICOM (LPS) geometry.

    Args:
        position: ImagePositionPatient of the first slice.
        orientation: ImageOrientationPatient (row cosines, then column cosines).
        spacing: PixelSpacing (between rows, between columns).
        step: LPS vector from one slice to the next.

    Returns:
        4x4 affine mapping ``(i, j, k)`` = (column, row, slice) to RAS+ mm.
    """
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(orientation[:3]) * spacing[1]
    lps[:3, 1] = np.asarray(orientation[3:]) * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = position
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def load_dicom_series(
    files: Sequence[str | os.PathLike[str]],
    *,
    spacing_tolerance: float = 0.01,
    max_tilt_degrees: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Read one series (single-frame files or one multi-frame object) as a volume.

    Rules for a stack that is not a clean grid: identical copies at one position are dropped;
    different images at one position, missing slices, uneven spacing, gantry tilt, non-orthogonal
    or mixed orientations, mixed sizes and missing geometry are refused. A single slice becomes
    a one-slice volume as thick as SpacingBetweenSlices or SliceThickness (1 mm if neither).

    Args:
        files: The series' files, in any order.
        spacing_tolerance: Largest deviation of a slice gap from the median gap, as a fraction of it.
        max_tilt_degrees: Largest angle between the slice-to-slice direction and the slice normal.

    Returns:
        ``(volume, affine)``: float32 ``(columns, rows, slices)`` with RescaleSlope/Intercept
        applied, slices sorted along the normal; the 4x4 RAS+ affine.

    Raises:
        DicomSeriesError: (a :class:`MedsynthError`) for anything refused; ``reason`` names the
            problem without header values.
    """
    paths = [str(f) for f in files]
    if not paths:
        raise DicomSeriesError("no files given for the series")
    planes, arrays = _read_planes(paths)
    order, _, step = _check_and_sort(planes, arrays, spacing_tolerance=spacing_tolerance, max_tilt_degrees=max_tilt_degrees)
    rows, columns = planes[0].shape
    volume = np.empty((len(order), columns, rows), dtype=np.float32)
    for k, i in enumerate(order):
        plane = planes[i]
        slab = volume[k]
        np.copyto(slab, arrays[i].T, casting="unsafe")
        if plane.slope != 1.0:
            slab *= np.float32(plane.slope)
        if plane.intercept != 0.0:
            slab += np.float32(plane.intercept)
    first = planes[order[0]]
    affine = series_affine(first.position, first.orientation, first.spacing, step)
    return np.moveaxis(volume, 0, -1), affine


def load_dicom_seg(
    file: str | os.PathLike[str], *, affine: np.ndarray, shape: Sequence[int]
) -> tuple[np.ndarray, dict[int, str]]:
    """Read a DICOM SEG object onto the voxel grid of the series it segments.

    Args:
        file: The SEG file.
        affine: The series' 4x4 RAS+ affine (from :func:`load_dicom_series`).
        shape: The series' volume shape ``(columns, rows, slices)``.

    Returns:
        ``(segments, names)``: ``uint16`` map holding the segment number of each voxel (0 = none;
        where segments overlap, the higher number wins) and each segment number's label.

    Raises:
        DicomSeriesError: If the SEG cannot be read or its frames do not lie on the series' grid.
    """
    file = str(file)
    try:
        ds = _read(file)
    except Exception as err:
        raise DicomSeriesError(f"cannot read the SEG object ({type(err).__name__})", file) from None
    names = {int(s.SegmentNumber): str(s.get("SegmentLabel", f"segment_{int(s.SegmentNumber)}")) for s in ds.get("SegmentSequence", [])}
    frames = _pixels(ds, file)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    frames = frames.reshape(count, *frames.shape[-2:])
    if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        frames = frames >= 0.5 * float(ds.get("MaximumFractionalValue", 255) or 255)
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence", []) or [])
    if len(per_frame) != count:
        raise DicomSeriesError("the SEG object lacks per-frame positions", file)
    inverse = np.linalg.inv(affine)
    out = np.zeros(tuple(int(s) for s in shape), dtype=np.uint16)
    ras = np.diag([-1.0, -1.0, 1.0])
    series_rows = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    for f, group in enumerate(per_frame):
        groups = [group, shared]
        number = _group_value(groups, "SegmentIdentificationSequence", "ReferencedSegmentNumber")
        position = _floats(_group_value(groups, "PlanePositionSequence", "ImagePositionPatient") or (), 3)
        orientation = _floats(_group_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient") or (), 6)
        if number is None or position is None or orientation is None:
            raise DicomSeriesError(f"SEG frame {f + 1} lacks its segment number or plane geometry", file)
        if np.abs(ras @ orientation[:3] - series_rows).max() > 1e-3:
            raise DicomSeriesError("the SEG frames are oriented differently from the series they reference", file)
        voxel = inverse @ np.append(ras @ position, 1.0)
        k = int(np.rint(voxel[2]))
        if np.abs(voxel[:2]).max() > 1e-2 or abs(voxel[2] - k) > 1e-2 or not 0 <= k < out.shape[2]:
            raise DicomSeriesError(f"SEG frame {f + 1} does not lie on a slice of the series it references", file)
        if frames.shape[1:] != (out.shape[1], out.shape[0]):
            raise DicomSeriesError("the SEG frames have another size than the series' slices", file)
        mask = np.asarray(frames[f]).T > 0
        out[..., k][mask] = np.maximum(out[..., k][mask], int(number))
    return out, names


def dicom_files(root: str | os.PathLike[str], *, exclude: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """Every regular file under ``root`` in a stable order (DICOM files have any name, so all are candidates).

    Args:
        root: The export folder.
        exclude: Folders to leave out (for example an output folder inside the export).

    Returns:
        Sorted file paths; hidden files (``.name``) are left out.
    """
    root = Path(root)
    skip = {Path(p).resolve() for p in exclude}
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in skip)
        found.extend(here / f for f in sorted(files) if not f.startswith("."))
    return found
