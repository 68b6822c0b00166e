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
import io
import logging
import os
import re
import warnings
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID

from medsynth import MedsynthError
from medsynth.io.nifti import MAX_IMAGE_BYTES, image_size_problem

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
IDENTIFYING_KEYWORDS = frozenset(
    {
        "PatientName",
        "PatientID",
        "OtherPatientIDs",
        "OtherPatientNames",
        "OtherPatientIDsSequence",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientComments",
        "AdditionalPatientHistory",
        "MedicalRecordLocator",
        "IssuerOfPatientID",
        "MilitaryRank",
        "BranchOfService",
        "Occupation",
        "CountryOfResidence",
        "RegionOfResidence",
        "EthnicGroup",
        "PatientReligiousPreference",
        "PatientInsurancePlanCodeSequence",
        "AccessionNumber",
        "StudyID",
        "StudyDescription",
        "SeriesDescription",
        "ImageComments",
        "StudyComments",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "StationName",
        "DeviceSerialNumber",
        "ReferringPhysicianName",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "PerformingPhysicianName",
        "NameOfPhysiciansReadingStudy",
        "PhysiciansOfRecord",
        "OperatorsName",
        "RequestingPhysician",
        "ScheduledPerformingPhysicianName",
        "RequestedProcedureDescription",
        "PerformedProcedureStepDescription",
        "PerformedProcedureStepID",
        "ScheduledProcedureStepDescription",
        "AdmittingDiagnosesDescription",
        "DerivationDescription",
        "ProtocolName",
        "AcquisitionComments",
        "ContentCreatorName",
        "RequestAttributesSequence",
        "ReasonForStudy",
        "RequestedProcedureID",
        "AdmissionID",
        "PerformedLocation",
        "ScheduledStudyLocation",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "SegmentAlgorithmName",
        "SegmentDescription",
        "ClinicalTrialSubjectID",
        "ClinicalTrialSubjectReadingID",
        "ClinicalTrialSiteName",
        "ClinicalTrialSponsorName",
        "TextValue",
        "ContentSequence",
        "FrameComments",
        "LabelText",
    }
)
_IDENTIFYING_VRS = frozenset({"PN", "DA", "DT", "TM"})
_CONVERTED_VRS = frozenset({"PN", "DA", "DT", "TM", "UI", "SQ"})
_PIXEL_GROUP = 0x7FE00000
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_BITS_ALLOCATED = (1, 8, 16, 32, 64)
_DEFLATED = "1.2.840.10008.1.2.1.99"
_META_SCAN = 1 << 16  # bytes searched for the file meta group
_TOO_DEEP = "cannot read the DICOM header: sequences nested too deeply (damaged or hostile file)"
_MAX_DEPTH = 64  # sequence nesting visited for identifiers (pydicom itself stops far deeper files)


def transfer_syntax_name(uid: str) -> str:
    """A person-readable name of a transfer syntax UID (the UID itself when unknown; a value that is not a UID,
    from a damaged header, is not shown)."""
    if not UID(uid).is_valid:
        return "unknown transfer syntax (not a valid UID)"
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


def _deflate_problem(path: str, max_bytes: int) -> str | None:
    """Why a deflated data set must not be read: it inflates beyond ``max_bytes`` (a zip bomb), or it
    cannot be checked. pydicom inflates such a file whole, so the size is measured first, in pieces."""
    with open(path, "rb") as fh:
        head = fh.read(_META_SCAN)
        if _DEFLATED.encode() not in head:
            return None
        start = 132 if head[128:132] == b"DICM" else 0
        if head[start : start + 6] != b"\x02\x00\x00\x00UL":
            return "a deflated data set without a file meta group length cannot be checked against the size limit"
        fh.seek(start + 12 + int.from_bytes(head[start + 8 : start + 12], "little"))
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        try:
            while chunk := fh.read(1 << 20):
                while chunk:
                    total += len(inflater.decompress(chunk, 1 << 24))
                    if total > max_bytes:
                        return (
                            f"the deflated data set inflates to more than {max_bytes / 1e9:.3g} GB, the limit on one "
                            "image (data.max_image_gb)"
                        )
                    chunk = inflater.unconsumed_tail
        except zlib.error:
            return None  # not a deflate stream after all: pydicom reports what it finds
    return None


class _BoundedReader(io.BufferedReader):
    """A file opened for reading whose ``read(n)`` never asks for more than what is left in the file.

    Python allocates the ``n`` bytes a read asks for before reading, so without the bound a damaged
    length field (4 GiB) read by pydicom would allocate 4 GiB for a file of a few kilobytes.
    """

    def __init__(self, path: str) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self._size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(0, self._size - self.tell()))
        return super().read(size)


def _read(path: str | os.PathLike[str], *, max_bytes: int = MAX_IMAGE_BYTES, header_only: bool = False) -> Dataset:
    """``dcmread`` without warnings; falls back to ``force`` only for files that are clearly DICOM.

    A full read parses the file from memory and a header read goes through :class:`_BoundedReader`
    (deferring values over 1 KiB), so a damaged length field can never make pydicom allocate more
    than the file holds.

    Raises:
        DicomSeriesError: If the file is over the size limit or is a deflate bomb.
        InvalidDicomError: If the file is not DICOM; other pydicom errors for damaged files.
    """
    path = str(path)
    if not header_only and os.path.getsize(path) > max_bytes:
        raise DicomSeriesError(
            f"the file is larger than {max_bytes / 1e9:.3g} GB, the limit on one image (data.max_image_gb)", path
        )
    problem = _deflate_problem(path, max_bytes)
    if problem is not None:
        raise DicomSeriesError(problem, path)
    data = None if header_only else Path(path).read_bytes()

    def read(**kwargs: Any) -> Dataset:
        if data is not None:
            return pydicom.dcmread(io.BytesIO(data), **kwargs)
        with _BoundedReader(path) as fh:
            return pydicom.dcmread(fh, defer_size=1024, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return read()
        except InvalidDicomError:
            ds = read(force=True)
            if "SOPClassUID" not in ds or "SeriesInstanceUID" not in ds:
                raise
            return ds


def _read_object(path: str, *, max_bytes: int, what: str = "the file") -> Dataset:
    """:func:`_read` for loading pixels: every failure becomes a :class:`DicomSeriesError`."""
    try:
        return _read(path, max_bytes=max_bytes)
    except DicomSeriesError:
        raise
    except InvalidDicomError:
        raise DicomSeriesError("not a DICOM file", path) from None
    except RecursionError:
        raise DicomSeriesError(_TOO_DEEP, path) from None
    except MemoryError:
        raise
    except Exception as err:  # pydicom raises many types for damaged files
        raise DicomSeriesError(f"cannot read {what} (damaged or truncated): {type(err).__name__}", path) from None


# --- reading values that may be missing, malformed or damaged ----------------------------------


def _get(ds: Dataset | None, keyword: str) -> Any:
    """The value of ``keyword``, or ``None`` when it is absent, empty or cannot be decoded (damaged)."""
    if ds is None:
        return None
    try:
        value = ds.get(keyword)
    except Exception:  # pydicom decodes a value on first access; a damaged one raises any type
        return None
    if value is None or (isinstance(value, (str, bytes)) and not value):
        return None
    return value


def _text(ds: Dataset | None, keyword: str) -> str:
    """A value as stripped text (``""`` when absent or undecodable)."""
    value = _get(ds, keyword)
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("ascii", "replace").strip("\x00 ")
    return str(value).strip()


def _integer(
    ds: Dataset | None, keyword: str, file: str | None, *, default: int | None = None, low: int = 0, high: int = 2**31 - 1
) -> int:
    """An integer attribute within ``[low, high]``; ``default`` when absent (required when ``None``)."""
    value = _get(ds, keyword)
    if value is None:
        if default is None:
            raise DicomSeriesError(f"{keyword} is missing or unreadable", file)
        return default
    return _whole(value, keyword, file, low=low, high=high)


def _whole(value: Any, name: str, file: str | None, *, low: int, high: int) -> int:
    try:
        number = int(float(value)) if isinstance(value, str) else int(value)
    except (TypeError, ValueError, OverflowError):
        raise DicomSeriesError(f"{name} is not an integer", file) from None
    if not low <= number <= high:
        raise DicomSeriesError(f"{name} is {number}; expected {low} to {high}", file)
    return number


def _real(value: Any, name: str, file: str | None, *, default: float) -> float:
    """A finite number (``default`` when absent); anything else is refused."""
    if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise DicomSeriesError(f"{name} is not a number", file) from None
    if not np.isfinite(number):
        raise DicomSeriesError(f"{name} is not a finite number", file)
    return number


def _items(ds: Dataset | None, keyword: str, file: str | None) -> list[Dataset]:
    """The items of a sequence (empty when absent); a value that is not a sequence of items is refused."""
    if ds is None or keyword not in ds:
        return []
    try:
        value = ds[keyword].value
    except Exception:
        raise DicomSeriesError(f"{keyword} is damaged", file) from None
    if not value:
        return []
    if not isinstance(value, DicomSequence) or not all(isinstance(item, Dataset) for item in value):
        raise DicomSeriesError(f"{keyword} is not a sequence of items (wrong VR?)", file)
    return list(value)


def identifying_values(ds: Dataset) -> set[str]:
    """Every value of ``ds`` (sequences included) that could identify a patient or a study.

    Values of the confidentiality profile's attributes, of every person name, date, date-time
    and time, and of every UID that is not a registry UID (SOP classes, transfer syntaxes). An
    element that cannot be decoded (a damaged file) is skipped; the others still count.
    """
    found: set[str] = set()

    def visit(dataset: Dataset, depth: int) -> None:
        if depth > _MAX_DEPTH:
            return
        for tag in list(dataset.keys()):
            if tag >= _PIXEL_GROUP or tag.is_private:
                continue  # pixel data (deferred: touching it would read it) and private tags are never written out
            try:
                collect(dataset, tag, depth)
            except Exception:  # a damaged element: its value is unreadable, so it cannot be written out either
                continue

    def collect(dataset: Dataset, tag: Any, depth: int) -> None:
        vr = getattr(dataset.get_item(tag), "VR", None)
        if vr is None:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = "UN"
        if vr not in _CONVERTED_VRS and keyword_for_tag(tag) not in IDENTIFYING_KEYWORDS:
            return  # converting every element is the slow part of a header scan
        element = dataset[tag]
        if element.VR == "SQ":
            for item in element.value or ():
                if isinstance(item, Dataset):
                    visit(item, depth + 1)
            return
        identifying = element.keyword in IDENTIFYING_KEYWORDS or element.VR in _IDENTIFYING_VRS or element.VR == "UI"
        if not identifying or element.value is None:
            return
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

    visit(ds, 0)
    if hasattr(ds, "file_meta"):
        visit(ds.file_meta, 0)
    return found


def read_header(path: str | os.PathLike[str], *, max_bytes: int = MAX_IMAGE_BYTES) -> DicomHeader:
    """Read one file's header (pixel data is not loaded) and classify it; never raises for a bad file.

    Args:
        path: Any file; files that are not DICOM or are damaged come back with ``kind=None`` and an
            ``error``.
        max_bytes: Largest size a deflated data set may inflate to.

    Returns:
        The header summary.
    """
    path = str(path)
    try:
        ds = _read(path, max_bytes=max_bytes, header_only=True)
    except DicomSeriesError as err:
        return DicomHeader(path, None, err.reason)
    except InvalidDicomError:
        return DicomHeader(path, None, "not a DICOM file")
    except RecursionError:
        return DicomHeader(path, None, _TOO_DEEP)
    except MemoryError:
        raise
    except Exception as err:  # pydicom raises many types for damaged files
        return DicomHeader(path, None, f"cannot read the DICOM header (damaged or truncated file): {type(err).__name__}")
    try:
        return _summary(path, ds)
    except DicomSeriesError as err:
        return DicomHeader(path, None, f"damaged header: {err.reason}")
    except MemoryError:
        raise
    except Exception as err:  # one file must not stop the scan of the others; the reason says it is unexpected
        return DicomHeader(path, None, f"unexpected error while reading the header ({type(err).__name__})")


def _summary(path: str, ds: Dataset) -> DicomHeader:
    """Classify a read header and collect what grouping and de-identification need."""
    meta = getattr(ds, "file_meta", None)
    sop = _text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID")
    syntax = _text(meta, "TransferSyntaxUID")
    has_pixels = any(k in ds for k in _PIXEL_KEYWORDS)
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
        referenced = tuple(_text(item, "SeriesInstanceUID") for item in _items(ds, "ReferencedSeriesSequence", path))
        segments = sorted(
            ((_integer(s, "SegmentNumber", path, low=1, high=65535), s) for s in _items(ds, "SegmentSequence", path)),
            key=lambda pair: pair[0],
        )
        numbers = tuple(number for number, _ in segments)
        labels = tuple(_text(s, "SegmentLabel") or f"segment_{number}" for number, s in segments)
    identifiers = identifying_values(ds)
    ids = {keyword: _text(ds, keyword) for keyword in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")}
    identifiers.update(value for value in ids.values() if value)
    return DicomHeader(
        path=path,
        kind=kind,
        sop_class=_sop_class_name(sop),
        modality=_text(ds, "Modality"),
        transfer_syntax=syntax,
        patient_id=ids["PatientID"],
        study_uid=ids["StudyInstanceUID"],
        series_uid=ids["SeriesInstanceUID"],
        has_pixels=has_pixels,
        referenced_series=referenced,
        segment_numbers=numbers,
        segment_labels=labels,
        identifiers=tuple(sorted(identifiers)),
    )


def code_string(value: str) -> str:
    """``value`` when it looks like a DICOM code string (``CT``, ``MONOCHROME2``: at most 16 upper-case letters,
    digits, ``_`` and spaces), else ``""``; a damaged header may put anything there, so only a code is shown."""
    return value if re.fullmatch(r"[A-Z0-9_ ]{1,16}", value) else ""


def _sop_class_name(uid: str) -> str:
    """The registry name of a SOP class UID; ``""`` for a UID the standard does not name, which is shown
    nowhere (a damaged or private value may hold anything, identifiers included)."""
    if not uid or not UID(uid).is_valid:
        return ""
    name = UID(uid).name
    return "" if name == uid else name


# --- one series as a volume -------------------------------------------------------------


@dataclasses.dataclass
class _Plane:
    """One 2D frame of a series with its geometry."""

    index: int  # position in the input (file index, or frame index of a multi-frame object)
    file: str
    position: np.ndarray  # ImagePositionPatient (LPS mm)
    orientation: np.ndarray  # ImageOrientationPatient (6 cosines)
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns)
    slope: float
    intercept: float
    shape: tuple[int, int]  # (rows, columns)
    thickness: float | None


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The pixel matrix a header declares, checked before any pixel is decoded."""

    rows: int
    columns: int
    frames: int


def _pixel_layout(ds: Dataset, file: str, *, max_bytes: int) -> _Layout:
    """Rows, Columns, NumberOfFrames and the sample format, validated and held to the size limit.

    Raises:
        DicomSeriesError: If there is no pixel data, the image is in colour, a value is missing or
            outside what DICOM allows, or the declared size is over ``max_bytes``.
    """
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise DicomSeriesError("the image holds no pixel data", file)
    if _integer(ds, "SamplesPerPixel", file, default=1, low=1, high=4) != 1:
        raise DicomSeriesError(
            f"colour images ({code_string(_text(ds, 'PhotometricInterpretation')) or '?'}) are not supported; expected greyscale",
            file,
        )
    rows = _integer(ds, "Rows", file, low=1, high=65535)
    columns = _integer(ds, "Columns", file, low=1, high=65535)
    frames = _integer(ds, "NumberOfFrames", file, default=1, low=1)
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        bits = 32 if "FloatPixelData" in ds else 64
    else:
        bits = _integer(ds, "BitsAllocated", file, low=1, high=64)
        if bits not in _BITS_ALLOCATED:
            raise DicomSeriesError(f"BitsAllocated is {bits}; expected one of {', '.join(map(str, _BITS_ALLOCATED))}", file)
        _integer(ds, "BitsStored", file, default=bits, low=1, high=bits)
        _integer(ds, "PixelRepresentation", file, default=0, low=0, high=1)
    problem = image_size_problem((frames, rows, columns), max_bytes=max_bytes, itemsize=max(1, bits // 8))
    if problem is not None:
        raise DicomSeriesError(problem, file)
    return _Layout(rows, columns, frames)


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return None
    return array if array.shape == (n,) and np.all(np.isfinite(array)) else None


def _first(ds: Dataset | None, sequence: str, file: str) -> Dataset | None:
    items = _items(ds, sequence, file)
    return items[0] if items else None


def _group_value(groups: Sequence[Dataset | None], sequence: str, keyword: str, file: str) -> Any:
    """A value from the first functional group (per-frame first, then shared) that has it."""
    for group in groups:
        value = _get(_first(group, sequence, file), keyword)
        if value is not None:
            return value
    return None


def _planes_of_multiframe(ds: Dataset, file: str, layout: _Layout) -> list[_Plane]:
    frames = layout.frames
    shared = _first(ds, "SharedFunctionalGroupsSequence", file)
    per_frame = _items(ds, "PerFrameFunctionalGroupsSequence", file)
    if len(per_frame) not in (0, frames):
        raise DicomSeriesError(f"the multi-frame object has {frames} frames but {len(per_frame)} per-frame descriptions", file)
    planes = []
    for f in range(frames):
        groups = [per_frame[f] if per_frame else None, shared]
        position = _group_value(groups, "PlanePositionSequence", "ImagePositionPatient", file)
        orientation = _group_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient", file)
        spacing = _group_value(groups, "PixelMeasuresSequence", "PixelSpacing", file)
        thickness = _group_value(groups, "PixelMeasuresSequence", "SpacingBetweenSlices", file) or _group_value(
            groups, "PixelMeasuresSequence", "SliceThickness", file
        )
        slope = _group_value(groups, "PixelValueTransformationSequence", "RescaleSlope", file)
        intercept = _group_value(groups, "PixelValueTransformationSequence", "RescaleIntercept", file)
        if position is None and frames == 1:
            position = _get(ds, "ImagePositionPatient")
        if orientation is None:
            orientation = _get(ds, "ImageOrientationPatient")
        if spacing is None:
            spacing = _get(ds, "PixelSpacing")
        planes.append(_plane(f, file, ds, layout, position, orientation, spacing, slope, intercept, thickness))
    return planes


def _plane(
    index: int,
    file: str,
    ds: Dataset,
    layout: _Layout,
    position: Any,
    orientation: Any,
    spacing: Any,
    slope: Any = None,
    intercept: Any = None,
    thickness: Any = None,
) -> _Plane:
    pos, ori, pix = (
        _floats(value if value is not None else (), n) for value, n in ((position, 3), (orientation, 6), (spacing, 2))
    )
    missing = [
        name for name, v in (("ImagePositionPatient", pos), ("ImageOrientationPatient", ori), ("PixelSpacing", pix)) if v is None
    ]
    if missing or pos is None or ori is None or pix is None:
        raise DicomSeriesError(
            f"no patient geometry ({', '.join(missing)} missing or malformed): a projection image or a "
            "secondary capture cannot be placed in a volume",
            file,
        )
    if np.any(pix <= 0):
        raise DicomSeriesError("PixelSpacing must be positive", file)
    slope = _get(ds, "RescaleSlope") if slope is None else slope
    intercept = _get(ds, "RescaleIntercept") if intercept is None else intercept
    if thickness is None:
        thickness = _get(ds, "SpacingBetweenSlices") or _get(ds, "SliceThickness")
    try:
        thick = float(thickness) if thickness is not None else None
    except (TypeError, ValueError, OverflowError):
        thick = None
    return _Plane(
        index=index,
        file=file,
        position=pos,
        orientation=ori,
        spacing=(float(pix[0]), float(pix[1])),
        slope=_real(slope, "RescaleSlope", file, default=1.0),
        intercept=_real(intercept, "RescaleIntercept", file, default=0.0),
        shape=(layout.rows, layout.columns),
        thickness=thick if thick and np.isfinite(thick) and thick > 0 else None,
    )


def _pixels(ds: Dataset, file: str, layout: _Layout) -> np.ndarray:
    """Decoded stored values as ``(frames, rows, columns)``; a refusal names the transfer syntax when
    decoding is the problem."""
    syntax = _text(getattr(ds, "file_meta", None), "TransferSyntaxUID")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = np.asarray(ds.pixel_array)
    except MemoryError:
        raise
    except Exception as err:  # pydicom's decoders raise many types for damaged data
        known = UID(syntax).is_transfer_syntax if syntax else True
        if syntax and (not known or UID(syntax).is_compressed) and _is_decoder_problem(err):
            raise DicomSeriesError(
                f"pixel data in transfer syntax {transfer_syntax_name(syntax)} cannot be decoded with the installed "
                "plugins (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pyjpegls); convert the files, for "
                "example with dcmtk's dcmdjpeg, or install a decoder",
                file,
            ) from None
        raise DicomSeriesError(f"the pixel data is damaged or truncated ({type(err).__name__})", file) from None
    shape = (layout.frames, layout.rows, layout.columns)
    if array.size != layout.frames * layout.rows * layout.columns or array.dtype.kind not in "biuf":
        raise DicomSeriesError("the decoded pixel data does not match Rows, Columns and NumberOfFrames", file)
    return array.reshape(shape)


def _is_decoder_problem(err: Exception) -> bool:
    text = str(err).lower()
    return isinstance(err, NotImplementedError) or any(
        word in text for word in ("decod", "plugin", "transfer syntax", "not supported", "no pixel data handler", "unable to")
    )


def _read_planes(files: Sequence[str], *, max_bytes: int) -> tuple[list[_Plane], list[np.ndarray]]:
    """Read every file, returning its planes and their stored values (rows, columns).

    Each header's declared size is checked before its pixels are decoded, and so is the series'
    running total, so no file and no series can make the reader allocate past ``max_bytes``.
    """
    planes: list[_Plane] = []
    arrays: list[np.ndarray] = []
    voxels = 0
    for i, file in enumerate(files):
        ds = _read_object(file, max_bytes=max_bytes)
        layout = _pixel_layout(ds, file, max_bytes=max_bytes)
        voxels += layout.frames * layout.rows * layout.columns
        problem = image_size_problem((voxels,), max_bytes=max_bytes, what="declared size of the series")
        if problem is not None:
            raise DicomSeriesError(problem)
        enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
        if layout.frames > 1 or enhanced:
            if len(files) > 1:
                raise DicomSeriesError(
                    f"the series mixes {len(files)} files with a multi-frame object; expected one multi-frame object "
                    "or single-frame files only",
                    file,
                )
            new = _planes_of_multiframe(ds, file, layout)
            data = _pixels(ds, file, layout)
            planes.extend(new)
            arrays.extend(data[f] for f in range(len(new)))
        else:
            plane = _plane(
                i,
                file,
                ds,
                layout,
                _get(ds, "ImagePositionPatient"),
                _get(ds, "ImageOrientationPatient"),
                _get(ds, "PixelSpacing"),
            )
            planes.append(plane)
            arrays.append(_pixels(ds, file, layout)[0])
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
            f"non-orthogonal ImageOrientationPatient (row/column cosines at {np.degrees(np.arccos(np.clip(row @ col, -1, 1))):.2f} degrees)"
        )
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
                "acquisitions in one series?)"
            )
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
                f"{missing} slice(s) missing: gaps of up to {gaps.max():.3g} mm in a series spaced {smallest:.3g} mm"
            )
        raise DicomSeriesError(f"inconsistent slice spacing: gaps from {gaps.min():.3g} to {gaps.max():.3g} mm")
    step = (planes[order[-1]].position - planes[order[0]].position) / (len(order) - 1)
    cos = abs(float(step @ normal)) / max(float(np.linalg.norm(step)), 1e-12)
    tilt = float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))
    if tilt > max_tilt_degrees:
        raise DicomSeriesError(
            f"the slices are sheared by {tilt:.2f} degrees against their normal (gantry tilt); resample the series "
            "to an orthogonal grid first"
        )
    deviation = np.array(
        [np.linalg.norm(planes[i].position - (planes[order[0]].position + n * step)) for n, i in enumerate(order)]
    )
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
    max_bytes: int = MAX_IMAGE_BYTES,
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
        max_bytes: Largest volume accepted, in bytes of float32 voxels; headers declaring more
            (each file, and the series in total) are refused before any pixel is decoded.

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
    planes, arrays = _read_planes(paths, max_bytes=max_bytes)
    order, _, step = _check_and_sort(planes, arrays, spacing_tolerance=spacing_tolerance, max_tilt_degrees=max_tilt_degrees)
    rows, columns = planes[0].shape
    volume = np.empty((len(order), columns, rows), dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 become inf and are refused below
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
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DicomSeriesError(
            "the slice geometry (positions, PixelSpacing, thickness) gives no finite, invertible voxel-to-world transform"
        )
    return np.moveaxis(volume, 0, -1), affine


def load_dicom_seg(
    file: str | os.PathLike[str], *, affine: np.ndarray, shape: Sequence[int], max_bytes: int = MAX_IMAGE_BYTES
) -> tuple[np.ndarray, dict[int, str]]:
    """Read a DICOM SEG object onto the voxel grid of the series it segments.

    Args:
        file: The SEG file.
        affine: The series' 4x4 RAS+ affine (from :func:`load_dicom_series`).
        shape: The series' volume shape ``(columns, rows, slices)``.
        max_bytes: Largest SEG accepted, in bytes of float32 voxels (checked before decoding).

    Returns:
        ``(segments, names)``: ``uint16`` map holding the segment number of each voxel (0 = none;
        where segments overlap, the higher number wins) and each segment number's label.

    Raises:
        DicomSeriesError: If the SEG cannot be read or its frames do not lie on the series' grid.
    """
    file = str(file)
    ds = _read_object(file, max_bytes=max_bytes, what="the SEG object")
    names = {}
    for segment in _items(ds, "SegmentSequence", file):
        number = _integer(segment, "SegmentNumber", file, low=1, high=65535)
        names[number] = _text(segment, "SegmentLabel") or f"segment_{number}"
    layout = _pixel_layout(ds, file, max_bytes=max_bytes)
    frames = _pixels(ds, file, layout)
    if _text(ds, "SegmentationType").upper() == "FRACTIONAL":
        frames = frames >= 0.5 * _real(_get(ds, "MaximumFractionalValue"), "MaximumFractionalValue", file, default=255.0)
    shared = _first(ds, "SharedFunctionalGroupsSequence", file)
    per_frame = _items(ds, "PerFrameFunctionalGroupsSequence", file)
    if len(per_frame) != layout.frames:
        raise DicomSeriesError("the SEG object lacks per-frame positions", file)
    out = np.zeros(tuple(int(s) for s in shape), dtype=np.uint16)
    if frames.shape[1:] != (out.shape[1], out.shape[0]):
        raise DicomSeriesError("the SEG frames have another size than the series' slices", file)
    inverse = np.linalg.inv(affine)
    ras = np.diag([-1.0, -1.0, 1.0])
    series_rows = affine[:3, 0] / np.linalg.norm(affine[:3, 0])
    for f, group in enumerate(per_frame):
        groups = [group, shared]
        number = _group_value(groups, "SegmentIdentificationSequence", "ReferencedSegmentNumber", file)
        position = _floats(_group_value(groups, "PlanePositionSequence", "ImagePositionPatient", file) or (), 3)
        orientation = _floats(_group_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient", file) or (), 6)
        if number is None or position is None or orientation is None:
            raise DicomSeriesError(f"SEG frame {f + 1} lacks its segment number or plane geometry", file)
        number = _whole(number, "ReferencedSegmentNumber", file, low=1, high=65535)
        if np.abs(ras @ orientation[:3] - series_rows).max() > 1e-3:
            raise DicomSeriesError("the SEG frames are oriented differently from the series they reference", file)
        voxel = inverse @ np.append(ras @ position, 1.0)
        if not np.all(np.isfinite(voxel)) or np.abs(voxel[:2]).max() > 1e-2 or abs(voxel[2] - np.rint(voxel[2])) > 1e-2:
            raise DicomSeriesError(f"SEG frame {f + 1} does not lie on a slice of the series it references", file)
        k = int(np.rint(voxel[2]))
        if not 0 <= k < out.shape[2]:
            raise DicomSeriesError(f"SEG frame {f + 1} does not lie on a slice of the series it references", file)
        mask = np.asarray(frames[f]).T > 0
        out[..., k][mask] = np.maximum(out[..., k][mask], number)
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
