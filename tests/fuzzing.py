"""Seeded mutators of DICOM, NIfTI and attributes-CSV files, and a harness that ingests each mutant.

The mutators start from the DICOM test corpus (:mod:`tests.dicom_corpus`), a small valid NIfTI
image and a small valid attributes table, and derive hostile files from them: bit flips,
truncations, corrupted length fields, huge declared dimensions, wrong VRs, deeply nested
sequences, damaged values; for NIfTI bad headers, zero or enormous dimensions, NaN/Inf voxels,
zero or non-finite scaling, damaged gzip streams; for CSVs wrong encodings, formula-injection
strings and damaged structure. The same seed gives the same files.

Each mutant is ingested on its own, in a worker process, by the library path ``medsynth
preprocess`` takes (:func:`~medsynth.data.discovery.discover_dicom` or
:func:`~medsynth.data.discovery.discover_folder`, then :func:`~medsynth.data.build.build_dataset`;
:func:`~medsynth.data.discovery.read_attributes` for a CSV), under a time limit per file and an
address-space limit on the worker. The outcome of every file is read back from ``manifest.json``
and ``quarantine.json``: in the dataset, quarantined with a reason, or a failure (crash, hang, a
file accounted for nowhere).

Used by ``tests/test_fuzz_ingest.py`` (a small sample) and ``benchmarks/fuzz_ingest.py`` (the full run).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import random
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FUZZ_MAX_IMAGE_BYTES = 256 * 1024**2
"""The image size limit the fuzz runs ingest with (``data.max_image_gb=0.25``), so that a deflate bomb
or a header just over the limit is cheap to build, and the worker's address-space limit can be tight."""
WORKER_MEMORY_BYTES = 1536 * 1024**2
"""Address space a worker may add to what it holds after its imports (RLIMIT_AS)."""
KINDS = ("dicom", "nifti", "csv")
DICOM_FAMILIES = ("bitflip", "truncate", "length", "huge_dims", "wrong_vr", "nested_sq", "values")
NIFTI_FAMILIES = ("header", "dims", "voxels", "scaling", "bitflip", "truncate", "gzip")
CSV_FAMILIES = ("encoding", "formula_header", "formula_values", "structure")
FAMILIES = {"dicom": DICOM_FAMILIES, "nifti": NIFTI_FAMILIES, "csv": CSV_FAMILIES}
FORMULAS = ("=1+2", "=HYPERLINK(\"http://x\",\"y\")", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A2)", "\t=1", "\r=1",
            "=cmd|'/c calc'!'A1'")


@dataclasses.dataclass(frozen=True)
class Job:
    """One mutant to ingest.

    Attributes:
        kind: ``dicom``, ``nifti`` or ``csv``.
        family: The mutation family.
        folder: The input folder (DICOM, NIfTI) or the folder holding the CSV.
        target: The mutated file, relative to ``folder``.
        note: What was done to it.
    """

    kind: str
    family: str
    folder: str
    target: str
    note: str = ""


@dataclasses.dataclass
class Outcome:
    """What ingesting one mutant did.

    Attributes:
        job: The mutant.
        outcome: ``dataset``, ``quarantine`` (CSV: ``accepted``, ``refused``), ``crash``, ``hang`` or
            ``unaccounted`` (a file in neither the dataset nor the quarantine).
        reason: The quarantine reason or refusal, or what went wrong.
        seconds: Wall time of the ingest.
        peak_rss: Peak resident memory of the worker during this file, in bytes (0 when unknown).
    """

    job: Job
    outcome: str
    reason: str = ""
    seconds: float = 0.0
    peak_rss: int = 0

    @property
    def failed(self) -> bool:
        """A crash, a hang, a file accounted for nowhere, or a reason that is not one clean line."""
        return self.outcome in ("crash", "hang", "unaccounted") or bad_reason(self.reason) is not None


def planted() -> tuple[str, ...]:
    """The identifiers the DICOM corpus plants (:func:`tests.dicom_corpus.planted_values`) that are long
    enough not to occur by chance."""
    from tests.dicom_corpus import UID_ROOT, planted_values

    return tuple(v for v in {*planted_values(), "QZX", UID_ROOT} if len(v) >= 3)


def bad_reason(reason: str) -> str | None:
    """Why a quarantine reason or refusal is not acceptable (empty, several lines, a traceback, an
    exception caught only by a catch-all, a planted identifier in it), or ``None``."""
    if not reason.strip():
        return "empty reason"
    if "\n" in reason or "Traceback" in reason:
        return "not one line"
    if "unexpected error" in reason:
        return "caught only by a catch-all"
    if any(value in reason for value in _PLANTED):
        return "holds a planted identifier"
    return None


_PLANTED = planted()


# --- DICOM mutators ---------------------------------------------------------------------------

_VRS = (b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT "
        b"UV").split()
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
_ELEMENT = re.compile(b"(?s)(?=(.{4})(" + b"|".join(_VRS) + b"))")
_PIXEL_TAG = b"\xe0\x7f\x10\x00"
_DEFLATED = "1.2.840.10008.1.2.1.99"


def _start(raw: bytes) -> int:
    return 132 if raw[128:132] == b"DICM" else 0


def element_offsets(raw: bytes) -> list[tuple[int, bytes]]:
    """Offsets and VRs of what look like explicit-VR little-endian element headers before the pixel data."""
    end = raw.find(_PIXEL_TAG, _start(raw))
    end = len(raw) if end < 0 else end + 8
    found = []
    for match in _ELEMENT.finditer(raw, _start(raw), end):
        group = int.from_bytes(match.group(1)[:2], "little")
        if 0x0002 <= group <= 0x7FE0 or group == 0xFFFE:
            found.append((match.start(), match.group(2)))
    return found


def _bitflip(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    data = bytearray(raw)
    start = _start(raw)
    end = raw.find(_PIXEL_TAG, start)
    header_only = end > start and rng.random() < 0.7  # flips in the header are what parsers trip on
    limit = end + 12 if header_only else len(data)
    flips = rng.choice((1, 2, 4, 8, 32))
    for _ in range(flips):
        pos = rng.randrange(start, max(start + 1, limit))
        data[pos] ^= 1 << rng.randrange(8)
    return bytes(data), f"{flips} bit(s) flipped{' in the header' if header_only else ''}"


def _truncate(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    cut = rng.choice((rng.randrange(0, 140), rng.randrange(0, len(raw)), len(raw) - rng.randrange(1, 64)))
    return raw[:max(0, cut)], f"cut at byte {cut} of {len(raw)}"


def _length(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    data = bytearray(raw)
    elements = element_offsets(raw)
    if not elements:
        pos = rng.randrange(_start(raw), len(raw) - 4)
        data[pos:pos + 4] = rng.choice((0xFFFFFFFF, 0x7FFFFFFF, len(raw) * 3)).to_bytes(4, "little")
        return bytes(data), "4 bytes overwritten with a large length"
    pos, vr = rng.choice(elements)
    if vr in _LONG_VRS:
        value = rng.choice((0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0, 1, 3, len(raw) * 2, rng.randrange(1 << 32)))
        data[pos + 8:pos + 12] = value.to_bytes(4, "little")
    else:
        value = rng.choice((0xFFFF, 0, 1, 3, rng.randrange(1 << 16)))
        data[pos + 6:pos + 8] = value.to_bytes(2, "little")
    return bytes(data), f"length of a {vr.decode()} element set to {value}"


def _wrong_vr(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    data = bytearray(raw)
    elements = element_offsets(raw)
    if not elements:
        return _bitflip(raw, rng)
    changed = []
    for _ in range(rng.choice((1, 1, 2, 4))):
        pos, vr = rng.choice(elements)
        new = rng.choice(_VRS + [b"XX", b"\0\0"])
        data[pos + 4:pos + 6] = new
        changed.append(f"{vr.decode()}->{new.decode('latin-1')!r}")
    return bytes(data), "VR " + ", ".join(changed)


def _dataset(raw: bytes) -> Any:
    import pydicom

    return pydicom.dcmread(io.BytesIO(raw), force=True)


def _encode(ds: Any) -> bytes:
    import pydicom

    buffer = io.BytesIO()
    with pydicom.config.disable_value_validation():
        ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


_BINARY = {"US": "<H", "SS": "<h", "UL": "<I", "SL": "<i", "FL": "<f", "FD": "<d"}


def set_raw(ds: Any, keyword: str, value: Any) -> None:
    """Put ``value`` into ``ds`` as the bytes a file would hold, without pydicom checking or converting it."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    tag = Tag(tag_for_keyword(keyword))
    vr = ds[tag].VR if tag in ds else dictionary_VR(tag)
    vr = vr.split(" or ")[0]
    if isinstance(value, bytes):
        data = value
    elif vr in _BINARY:
        values = value if isinstance(value, list) else [value]
        code = _BINARY[vr]
        whole = code[-1] in "HhIi"
        data = b"".join(struct.pack(code, int(v) % (1 << (8 * struct.calcsize(code)))) if whole and code[-1].isupper()
                        else struct.pack(code, int(v) if whole else float(v)) for v in values)
    else:
        text = "\\".join(str(v) for v in value) if isinstance(value, list) else str(value)
        data = text.encode("utf-8", "surrogateescape")
    if len(data) % 2:
        data += b"\0" if vr in ("UI", "OB", "OW", "UN") else b" "
    ds._dict[tag] = RawDataElement(tag, vr, len(data), data, 0, False, True)


def _huge_dims(raw: bytes, rng: random.Random, bomb: Callable[[], bytes]) -> tuple[bytes, str]:
    choice = rng.randrange(8)
    if choice == 0:
        return bomb(), "deflated data set that inflates past the size limit"
    ds = _dataset(raw)
    edits: dict[str, Any] = rng.choice([
        {"Rows": 65535, "Columns": 65535},
        {"Rows": 65535, "Columns": 65535, "NumberOfFrames": "2147483647"},
        {"NumberOfFrames": str(rng.choice((100000, 2**31 - 1, 2**40, 10**30)))},
        {"NumberOfFrames": rng.choice(("-1", "0", "1e9", "nan", "x"))},
        {"Rows": 0}, {"Columns": 0},
        {"Rows": 16384, "Columns": 16384, "BitsAllocated": 64},
        {"Rows": 8000, "Columns": 8000},
        {"BitsAllocated": rng.choice((0, 7, 12, 128, 65535))},
        {"SamplesPerPixel": rng.choice((0, 3, 65535))},
    ])
    for keyword, value in edits.items():
        set_raw(ds, keyword, value)
    return _encode(ds), "declared " + ", ".join(f"{k}={v}" for k, v in edits.items())


def deflate_bomb(inflated_bytes: int) -> bytes:
    """A tiny DICOM file in the deflated transfer syntax whose data set inflates to ``inflated_bytes``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.9.7777.99.1"
    ds.Modality = "MR"
    ds.Rows, ds.Columns = 16, 16
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.9.7777.99.2"
    meta.TransferSyntaxUID = _DEFLATED
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_file_meta_info(head, meta, enforce_standard=True)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    size = inflated_bytes + (inflated_bytes & 1)
    parts = [compressor.compress(body.getvalue()),
             compressor.compress(b"\xe0\x7f\x10\x00OB\0\0" + size.to_bytes(4, "little"))]
    zeros = bytes(1 << 22)
    left = size
    while left > 0:
        parts.append(compressor.compress(zeros[:min(left, len(zeros))]))
        left -= len(zeros)
    parts.append(compressor.flush())
    return b"\0" * 128 + b"DICM" + head.getvalue() + b"".join(parts)


def nested_sequences(depth: int, *, delimited: bool, defined_length: bool) -> bytes:
    """Explicit-VR little-endian bytes of ``depth`` sequences each holding one item with the next one."""
    tag = b"\x08\x00\x40\x11"  # (0008,1140) ReferencedImageSequence
    if defined_length:
        inner = b""
        for _ in range(depth):
            item = b"\xfe\xff\x00\xe0" + len(inner).to_bytes(4, "little") + inner
            inner = tag + b"SQ\0\0" + len(item).to_bytes(4, "little") + item
        return inner
    opening = tag + b"SQ\0\0\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    closing = b"\xfe\xff\x0d\xe0\0\0\0\0" + b"\xfe\xff\xdd\xe0\0\0\0\0"
    return opening * depth + (closing * depth if delimited else b"")


def _nested(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    depth = rng.choice((50, 300, 1000, 5000, 20000))
    delimited = rng.random() < 0.6
    defined = rng.random() < 0.3 and depth <= 5000
    blob = nested_sequences(depth, delimited=delimited, defined_length=defined)
    start = _start(raw)
    if start:  # after the file meta group
        meta_end = start + 12 + int.from_bytes(raw[start + 8:start + 12], "little")
    else:
        meta_end = 0
    pixels = raw.find(_PIXEL_TAG, start)
    where = meta_end if rng.random() < 0.5 else (pixels if pixels > 0 else len(raw))
    how = "undefined-length, " + ("delimited" if delimited else "never closed") if not defined else "defined-length"
    return raw[:where] + blob + raw[where:], f"{depth} nested sequences ({how})"


_BAD_NUMBERS = ("nan", "inf", "-inf", "1e309", "-1e309", "0", "-0", "-1", "1e-320", "abc", "", "1\\2", "1e38")


def _values(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    ds = _dataset(raw)
    number = lambda: rng.choice(_BAD_NUMBERS)  # noqa: E731
    edits: dict[str, Any] = rng.choice([
        {"PixelSpacing": [number(), number()]},
        {"PixelSpacing": [number()]},
        {"ImageOrientationPatient": [number() for _ in range(6)]},
        {"ImageOrientationPatient": ["1", "0", "0", "1", "0", "0"]},
        {"ImageOrientationPatient": ["0", "0", "0", "0", "0", "0"]},
        {"ImageOrientationPatient": ["1", "0", "0", "0", "1"]},
        {"ImagePositionPatient": [number(), number(), number()]},
        {"RescaleSlope": number()},
        {"RescaleIntercept": number()},
        {"RescaleSlope": "1e38", "RescaleIntercept": "1e38"},
        {"SliceThickness": number(), "SpacingBetweenSlices": number()},
        {"SeriesInstanceUID": rng.choice(("", "1" * 200, "1.2\0.3", "../../../etc", "\u00e9\u00e8"))},
        {"PatientID": rng.choice(("", "=cmd|' /C calc'!A0", "../" * 20, "x" * 5000, "\0"))},
        {"Modality": rng.choice(("", "CT\0", "=1+2", "SEG"))},
        {"SOPClassUID": rng.choice(("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.1.3.10", "", "1.2.3"))},
        {"BitsStored": 40},
        {"PixelRepresentation": 7},
        {"PhotometricInterpretation": "RGB", "SamplesPerPixel": 3},
        {"PixelData": b""},
        {"PixelData": b"\0" * rng.choice((1, 3, 101))},
        {"SegmentSequence": None},
        {"PerFrameFunctionalGroupsSequence": None},
        {"SharedFunctionalGroupsSequence": None},
        {"ReferencedSeriesSequence": None},
        {"NumberOfFrames": "3"},
    ])
    applied = []
    for keyword, value in edits.items():
        if value is None:
            if keyword in ds:
                if rng.random() < 0.5:
                    del ds[keyword]
                    applied.append(f"{keyword} removed")
                else:
                    items = ds[keyword].value
                    if len(items):
                        item = items[0]
                        for tag in list(item.keys())[: rng.randrange(1, max(2, len(item.keys()) + 1))]:
                            del item[tag]
                    applied.append(f"{keyword} items emptied")
            continue
        set_raw(ds, keyword, value)
        applied.append(f"{keyword}={value!r}"[:80])
    try:
        return _encode(ds), "; ".join(applied) or "unchanged"
    except Exception:  # a value pydicom cannot write: flip bits instead
        return _bitflip(raw, rng)


@dataclasses.dataclass(frozen=True)
class _DicomBase:
    name: str
    file: Path
    context: tuple[Path, ...] = ()  # unmutated files ingested with it (its series, or the series of a SEG)


def dicom_bases(corpus_root: Path) -> list[_DicomBase]:
    """The corpus files mutants are made from (built with :func:`tests.dicom_corpus.build_corpus`)."""
    from tests.dicom_corpus import build_corpus

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the corpus plants UIDs pydicom finds unusual
        corpus = build_corpus(corpus_root)
    root = corpus.root
    anat = sorted(corpus.anatomical_files)
    bases = [
        _DicomBase("anatomical slice", anat[12]),
        _DicomBase("anatomical slice in its series", anat[12], tuple(f for f in anat if f != anat[12])),
        _DicomBase("SEG with its series", corpus.seg, tuple(anat)),
        _DicomBase("CT_small", root / "QZXPID0004" / "ct.dcm"),
        _DicomBase("MR_small", root / "QZXPID0005" / "mr.dcm"),
        *(_DicomBase(f"multiframe {tag}", root / "multiframe" / f"{tag}.dcm") for tag in ("e1", "e2", "e3", "e4")),
        _DicomBase("JPEG lossless", root / "compressed" / "j1.dcm"),
        _DicomBase("JPEG 2000", root / "compressed" / "j2.dcm"),
        _DicomBase("structured report", root / "junk" / "report.dcm"),
        _DicomBase("SEG alone", root / "junk" / "liver_seg.dcm"),
    ]
    pacs = sorted(p for p in (root / "PACS").rglob("*") if p.is_file() and p.name != "DICOMDIR")
    bases.extend(_DicomBase(f"PACS {p.parent.name}/{p.name}", p) for p in pacs[:: max(1, len(pacs) // 4)][:4])
    return bases


def make_dicom(root: Path, count: int, *, seed: int, corpus_root: Path) -> list[Job]:
    """``count`` DICOM mutants, one input folder each, spread evenly over :data:`DICOM_FAMILIES`."""
    rng = random.Random(seed)
    bases = dicom_bases(corpus_root)
    cache: dict[Path, bytes] = {}
    bombs: list[bytes] = []

    def bomb() -> bytes:
        if not bombs:
            bombs.append(deflate_bomb(FUZZ_MAX_IMAGE_BYTES + (1 << 22)))
        return bombs[0]

    mutate: dict[str, Callable[[bytes, random.Random], tuple[bytes, str]]] = {
        "bitflip": _bitflip, "truncate": _truncate, "length": _length, "wrong_vr": _wrong_vr,
        "nested_sq": _nested, "values": _values, "huge_dims": lambda raw, r: _huge_dims(raw, r, bomb),
    }
    jobs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in range(count):
            jobs.append(_dicom_job(root, n, rng, bases, cache, mutate))
    return jobs


def _dicom_job(root: Path, n: int, rng: random.Random, bases: Sequence[_DicomBase], cache: dict[Path, bytes],
               mutate: dict[str, Callable[[bytes, random.Random], tuple[bytes, str]]]) -> Job:
    family = DICOM_FAMILIES[n % len(DICOM_FAMILIES)]
    base = rng.choice(bases)
    raw = cache.setdefault(base.file, base.file.read_bytes())
    data, note = mutate[family](raw, rng)
    folder = root / "dicom" / f"{n:05d}"
    target = Path("series") / base.file.name if base.context else Path(base.file.name)
    (folder / target).parent.mkdir(parents=True, exist_ok=True)
    for i, other in enumerate(base.context):
        if other != base.file:
            shutil.copyfile(other, folder / "series" / f"ctx{i:03d}.dcm")
    (folder / target).write_bytes(data)
    return Job("dicom", family, str(folder), str(target), f"{base.name}: {note}")


# --- NIfTI mutators ---------------------------------------------------------------------------


def nifti_bases() -> list[tuple[str, bytes, bool]]:
    """Small valid NIfTI images (an ellipsoid with texture on a 2 mm grid): ``(name, bytes, gzip it)``."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in (24, 28, 20)), indexing="ij"))
    inside = (grid ** 2).sum(0) < 0.7
    volume = inside * (500 + 100 * rng.standard_normal(inside.shape)) + 20 * rng.standard_normal(inside.shape)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -20
    bases = []
    for name, dtype in (("float32", np.float32), ("int16", np.int16)):
        img = nib.Nifti1Image(volume.astype(dtype), affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        raw = img.to_bytes()
        bases.append((name, raw, False))
        bases.append((name + ".gz", raw, True))
    return bases


def _header(raw: bytes) -> np.ndarray:
    import nibabel as nib

    return np.frombuffer(raw[:348], dtype=nib.nifti1.header_dtype).copy()


def _with_header(raw: bytes, header: np.ndarray) -> bytes:
    return header.tobytes() + raw[348:]


def _nifti_header(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    h = _header(raw)
    field, value = rng.choice([
        ("sizeof_hdr", rng.choice((0, -1, 540, 10**6))),
        ("magic", rng.choice((b"n+2\0", b"\0\0\0\0", b"ni1\0", b"XXXX"))),
        ("datatype", rng.choice((0, 1, 32, 128, 1792, 2304, 1536, 255, -5))),
        ("bitpix", rng.choice((0, 1, 7, 64, 255))),
        ("vox_offset", rng.choice((0.0, -352.0, 1e12, float("nan"), float("inf"), 349.5, 2.0**40))),
        ("pixdim", [rng.choice((1.0, 0.0, -2.0, float("nan"), float("inf"), 1e30, 1e-30)) for _ in range(8)]),
        ("qform_code", rng.choice((-1, 7, 32767))), ("sform_code", rng.choice((-1, 7, 32767))),
        ("quatern_b", rng.choice((float("nan"), 2.0, -5.0))), ("qoffset_x", float("inf")),
        ("srow_x", [rng.choice((float("nan"), float("inf"), 0.0, 1e30)) for _ in range(4)]),
        ("srow_z", [0.0, 0.0, 0.0, 0.0]),
        ("dim_info", 255), ("intent_code", rng.choice((1007, 2003, -1))), ("xyzt_units", 255),
    ])
    h[field] = value
    if field in ("srow_x", "srow_z"):
        h["sform_code"] = 1
        h["qform_code"] = 0
    return _with_header(raw, h), f"{field} set to {value!r}"


def _nifti_dims(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    h = _header(raw)
    dim = [int(v) for v in h["dim"][0]]
    dims = rng.choice([
        [3, 32767, 32767, 32767, 1, 1, 1, 1],
        [7, 32767, 32767, 32767, 32767, 32767, 32767, 32767],
        [3, dim[1], dim[2], 0, 1, 1, 1, 1],
        [3, 0, 0, 0, 1, 1, 1, 1],
        [3, -dim[1], dim[2], dim[3], 1, 1, 1, 1],
        [rng.choice((0, -1, 8, 100)), *dim[1:]],
        [4, dim[1], dim[2], dim[3], 32767, 1, 1, 1],
        [4, dim[1], dim[2], dim[3], 2, 1, 1, 1],
        [2, dim[1] * dim[2], dim[3], 1, 1, 1, 1, 1],
        [1, dim[1] * dim[2] * dim[3], 1, 1, 1, 1, 1, 1],
        [5, dim[1], dim[2], dim[3], 1, 3, 1, 1],
        [3, 2 * dim[1], dim[2], dim[3], 1, 1, 1, 1],
    ])
    h["dim"] = dims
    return _with_header(raw, h), f"dim set to {dims}"


def _nifti_voxels(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    h = _header(raw)
    offset = int(h["vox_offset"][0])
    dtype = np.float32 if int(h["datatype"][0]) == 16 else np.int16
    data = np.frombuffer(raw[offset:], dtype=dtype).copy()
    if dtype is np.int16:  # integers cannot be NaN: the scaling makes them so
        h["scl_slope"], h["scl_inter"] = rng.choice(((float("nan"), 0.0), (float("inf"), 0.0), (1.0, float("-inf")),
                                                     (1e38, 1e38)))
        return _with_header(raw, h), f"int16 with scl_slope {h['scl_slope'][0]}, scl_inter {h['scl_inter'][0]}"
    special = rng.choice((np.nan, np.inf, -np.inf, np.float32(3e38)))
    share = rng.choice((1e-4, 0.01, 0.5, 1.0))
    chosen = np.asarray([rng.random() < share for _ in range(data.size)]) if share < 1 else np.ones(data.size, bool)
    if not chosen.any():
        chosen[rng.randrange(data.size)] = True
    data[chosen] = special
    return raw[:offset] + data.tobytes(), f"{int(chosen.sum())} voxel(s) set to {special}"


def _nifti_scaling(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    h = _header(raw)
    slope, inter = rng.choice(((0.0, 0.0), (0.0, 5.0), (float("nan"), 0.0), (float("inf"), 0.0), (-0.0, 1.0),
                               (1e-45, 0.0), (3e38, 0.0), (1.0, float("nan")), (1.0, 3e38), (-1.0, 0.0)))
    h["scl_slope"], h["scl_inter"] = slope, inter
    return _with_header(raw, h), f"scl_slope={slope}, scl_inter={inter}"


def _nifti_bitflip(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    data = bytearray(raw)
    header_only = rng.random() < 0.7
    flips = rng.choice((1, 2, 4, 16))
    for _ in range(flips):
        pos = rng.randrange(0, 352 if header_only else len(data))
        data[pos] ^= 1 << rng.randrange(8)
    return bytes(data), f"{flips} bit(s) flipped{' in the header' if header_only else ''}"


def _nifti_truncate(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    cut = rng.choice((rng.randrange(0, 348), rng.randrange(348, len(raw)), len(raw) - rng.randrange(1, 64)))
    return raw[:cut], f"cut at byte {cut} of {len(raw)}"


def make_nifti(root: Path, count: int, *, seed: int) -> list[Job]:
    """``count`` NIfTI mutants, one input folder each, spread evenly over :data:`NIFTI_FAMILIES`."""
    rng = random.Random(seed + 1)
    bases = nifti_bases()
    mutate = {"header": _nifti_header, "dims": _nifti_dims, "voxels": _nifti_voxels, "scaling": _nifti_scaling,
              "bitflip": _nifti_bitflip, "truncate": _nifti_truncate}
    jobs = []
    for n in range(count):
        family = NIFTI_FAMILIES[n % len(NIFTI_FAMILIES)]
        name, raw, gz = rng.choice(bases)
        if family == "gzip":  # damage the compressed stream itself
            packed = gzip.compress(raw, mtime=0)
            how = rng.randrange(4)
            if how == 0:
                data, note = packed[: rng.randrange(10, len(packed))], "gzip stream truncated"
            elif how == 1:
                flipped = bytearray(packed)
                for _ in range(rng.choice((1, 4))):
                    flipped[rng.randrange(10, len(flipped))] ^= 1 << rng.randrange(8)
                data, note = bytes(flipped), "bits flipped in the gzip stream"
            elif how == 2:
                data, note = packed + os.urandom(rng.randrange(1, 200)), "garbage after the gzip stream"
            else:
                data, note = gzip.compress(raw[:348], mtime=0), "gzip of the header alone"
            gz, suffix = True, ".nii.gz"
        else:
            data, note = mutate[family](raw, rng)
            suffix = ".nii.gz" if gz else ".nii"
            if gz:
                data = gzip.compress(data, mtime=0)
        folder = root / "nifti" / f"{n:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        target = f"case{n:05d}{suffix}"
        (folder / target).write_bytes(data)
        jobs.append(Job("nifti", family, str(folder), target, f"{name}: {note}"))
    return jobs


# --- attributes CSV mutators ------------------------------------------------------------------


def _table(rng: random.Random, *, header: Sequence[str] | None = None, value: Callable[[], str] | None = None) -> str:
    names = list(header or ("case", "class", "age_band"))
    rows = [",".join(names)]
    for i in range(rng.randrange(1, 6)):
        cells = [f"c{i}"] + [(value() if value else rng.choice(("a", "b", "40-49", "\u00e9l\u00e8ve")))
                             for _ in names[1:]]
        rows.append(",".join(_quote(c) for c in cells))
    return "\n".join(rows) + "\n"


def _quote(cell: str) -> str:
    return '"' + cell.replace('"', '""') + '"' if any(ch in cell for ch in ',"\r\n') else cell


def _csv(rng: random.Random, family: str) -> tuple[bytes, str]:
    if family == "encoding":
        text = _table(rng, value=lambda: rng.choice(("caf\u00e9", "\u00fcber", "na\u00efve", "\u65e5\u672c")))
        how = rng.choice(("latin-1", "cp1252", "utf-16-le", "utf-16-be", "utf-16", "utf-32", "random", "nul",
                          "utf-8-sig", "shift_jis", "mixed"))
        if how == "random":
            return os.urandom(rng.randrange(1, 400)), "random bytes"
        if how == "nul":
            return text.encode() + b"\0\0" + text.encode(), "NUL bytes inside"
        if how == "mixed":
            return text.encode() + "caf\u00e9,x,y\n".encode("latin-1"), "UTF-8 then a latin-1 line"
        return text.encode(how, errors="replace"), f"encoded as {how}"
    if family == "formula_header":
        bad = rng.choice(FORMULAS + ("a\nb", " =1", "", "  "))
        header = ["case", "class", bad] if rng.random() < 0.7 else ["case", bad]
        return _table(rng, header=header).encode(), f"column named {bad!r}"
    if family == "formula_values":
        return _table(rng, value=lambda: rng.choice(FORMULAS + ("ok",))).encode(), "formula strings as values"
    how = rng.randrange(10)
    if how == 0:
        return b"", "empty file"
    if how == 1:
        return b"case,class\n", "header only"
    if how == 2:
        return b'case,class\nc1,"unbalanced\nc2,b\n', "unbalanced quote"
    if how == 3:
        return b"case,class\nc1,a,b,c\n", "more cells than the header"
    if how == 4:
        return b"case,class,class\nc1,a,b\n", "repeated column"
    if how == 5:
        return b"case,class\nc1,a\nc1,b\n", "repeated key"
    if how == 6:
        return b"case,class\nc1," + b"x" * (200 * 1024) + b"\n", "a 200 KiB cell"
    if how == 7:
        return b"case,class\rc1,a\rc2,b\r", "carriage returns only"
    if how == 8:
        wide = "case," + ",".join(f"col{i}" for i in range(5000)) + "\nc1," + ",".join("v" for _ in range(5000))
        return wide.encode(), "5000 columns"
    return b"klass,case\n,\n,,\n", "empty cells"


def make_csv(root: Path, count: int, *, seed: int) -> list[Job]:
    """``count`` attributes CSVs, spread evenly over :data:`CSV_FAMILIES`."""
    rng = random.Random(seed + 2)
    folder = root / "csv"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = []
    for n in range(count):
        family = CSV_FAMILIES[n % len(CSV_FAMILIES)]
        data, note = _csv(rng, family)
        target = f"attributes{n:05d}.csv"
        (folder / target).write_bytes(data)
        jobs.append(Job("csv", family, str(folder), target, note))
    return jobs


def make_clean(root: Path, *, corpus_root: Path) -> list[Job]:
    """The unmutated starting files (every DICOM and NIfTI base, one valid CSV): the baseline of a run."""
    jobs = []
    for n, base in enumerate(dicom_bases(corpus_root)):
        folder = root / "clean" / f"dicom{n:03d}"
        target = Path("series") / base.file.name if base.context else Path(base.file.name)
        (folder / target).parent.mkdir(parents=True, exist_ok=True)
        for i, other in enumerate(base.context):
            shutil.copyfile(other, folder / "series" / f"ctx{i:03d}.dcm")
        shutil.copyfile(base.file, folder / target)
        jobs.append(Job("dicom", "clean", str(folder), str(target), base.name))
    for n, (name, raw, gz) in enumerate(nifti_bases()):
        folder = root / "clean" / f"nifti{n:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        target = f"case{n:03d}.nii" + (".gz" if gz else "")
        (folder / target).write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
        jobs.append(Job("nifti", "clean", str(folder), target, name))
    folder = root / "clean" / "csv"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "attributes.csv").write_text(_table(random.Random(0)), encoding="utf-8")
    jobs.append(Job("csv", "clean", str(folder), "attributes.csv", "valid table"))
    return jobs


def make_jobs(root: Path, *, dicom: int, nifti: int, csv: int, seed: int) -> list[Job]:
    """Every mutant of a run under ``root``, DICOM first (the corpus is built under ``root/_corpus``)."""
    return [*make_dicom(root, dicom, seed=seed, corpus_root=root / "_corpus"), *make_nifti(root, nifti, seed=seed),
            *make_csv(root, csv, seed=seed)]


# --- the worker: one ingest per job -----------------------------------------------------------


def _settings() -> Any:
    from medsynth.data.case import VolumeSettings

    return VolumeSettings(spatial_dims=2, spacing=(1.0, 1.0, 1.0), size=(32, 32), max_image_bytes=FUZZ_MAX_IMAGE_BYTES)


_SALT = b"fuzz"


def ingest(job: Job, out: Path) -> tuple[str, str]:
    """Ingest one mutant as ``medsynth preprocess`` does and say what became of its target file.

    Returns:
        ``(outcome, reason)``; ``outcome`` is ``dataset``/``quarantine`` (CSV: ``accepted``/``refused``),
        or ``unaccounted`` when some file of the input is in neither the manifest nor the quarantine.
    """
    from medsynth import ConfigError, MedsynthError
    from medsynth.data.build import build_dataset
    from medsynth.data.deid import pseudonym
    from medsynth.data.discovery import discover_dicom, discover_folder, read_attributes
    from medsynth.io.dicom import read_header

    folder = Path(job.folder)
    if job.kind == "csv":
        path = folder / job.target
        try:
            table = read_attributes(path, key="case")
        except ConfigError as err:
            message = str(err)
            if str(path) not in message:
                return "unaccounted", f"refusal does not name the file: {message}"
            return "refused", message
        cells = [" ".join(f"{k}={v}" for k, v in sorted(values.items())) for values in table.values()]
        unsafe = [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r", "\n")]
        if unsafe:
            return "unaccounted", f"an attributes cell would start like a formula: {unsafe[0][:40]!r}"
        return "accepted", f"{len(table)} row(s)"
    if job.kind == "dicom":
        discovery = discover_dicom(folder, salt=_SALT, labels="auto", max_bytes=FUZZ_MAX_IMAGE_BYTES)
    else:
        try:
            discovery = discover_folder(folder, salt=_SALT)
        except MedsynthError as err:
            return "quarantine", str(err)
    try:
        build_dataset(discovery, out_dir=out, settings=_settings(), fractions={"train": 1.0})
    except MedsynthError:
        pass  # no case made it: quarantine.json says why
    items = json.loads((out / "quarantine.json").read_text(encoding="utf-8"))["items"]
    manifest = out / "manifest.json"
    records = json.loads(manifest.read_text(encoding="utf-8"))["records"] if manifest.is_file() else []
    record_ids = [r["id"] for r in records]
    outcomes: dict[str, tuple[str, str]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        shown = discovery.show(path)
        reasons = [i["reason"] for i in items if i["file"] == shown]
        if job.kind == "dicom":  # a series refused as a whole is listed once, under its folder and series pseudonym
            uid = read_header(path, max_bytes=FUZZ_MAX_IMAGE_BYTES).series_uid
            series = pseudonym(uid, _SALT, prefix="s", length=8) if uid else None
            reasons += [i["reason"] for i in items if series and i["series"] == series]
        for spec in discovery.cases:
            if str(path) in (*spec.files, spec.label):
                series = spec.source.get("series") or spec.key
                reasons += [i["reason"] for i in items if i["series"] == series]
                if any(r.startswith(spec.key) for r in record_ids):
                    outcomes[str(path)] = ("dataset", f"{len(record_ids)} record(s)")
        if str(path) not in outcomes:
            outcomes[str(path)] = ("quarantine", reasons[0]) if reasons else ("unaccounted", f"{path.name} is nowhere")
    lost = [reason for outcome, reason in outcomes.values() if outcome == "unaccounted"]
    if lost:
        return "unaccounted", lost[0]
    return outcomes[str(folder / job.target)]


def _peak_rss() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        pass


def worker_main(memory_bytes: int) -> None:
    """Serve jobs: one JSON :class:`Job` per line on stdin, one JSON result per line on the original stdout.

    Anything the library prints goes to stderr, so the protocol stays clean. The address space is
    limited to what the imports took plus ``memory_bytes``.
    """
    import resource

    import medsynth.data.build  # noqa: F401  (imports first, so the limit is on the ingest alone)
    import medsynth.data.discovery  # noqa: F401

    protocol = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    with open("/proc/self/status", encoding="ascii") as fh:
        size = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (size + memory_bytes, resource.RLIM_INFINITY))
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        job = Job(**json.loads(line))
        out = Path(job.folder + ".out")
        _reset_peak()
        start = time.perf_counter()
        try:
            outcome, reason = ingest(job, out)
        except BaseException as err:  # the point of the harness: anything escaping the library is a crash
            frames = traceback.extract_tb(err.__traceback__)
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
            outcome, reason = "crash", f"{type(err).__name__} at {where}: {str(err)[:200]}"
        finally:
            shutil.rmtree(out, ignore_errors=True)
        protocol.write(json.dumps({"outcome": outcome, "reason": reason, "seconds": time.perf_counter() - start,
                                   "peak_rss": _peak_rss()}) + "\n")


class Harness:
    """Runs jobs in a worker process, restarting it after a hang or a crash that kills it.

    Args:
        timeout: Seconds one file may take (a hang beyond it kills the worker).
        memory_bytes: Address space the worker may add to what its imports took.
        log: Where the workers' stderr goes.
    """

    def __init__(self, *, timeout: float = 30.0, memory_bytes: int = WORKER_MEMORY_BYTES,
                 log: Path | None = None) -> None:
        self.timeout = timeout
        self.memory_bytes = memory_bytes
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def _start(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
        stderr = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-c", f"from tests.fuzzing import worker_main; worker_main({self.memory_bytes})"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, cwd=REPO, env=env, start_new_session=True)
        if stderr is not subprocess.DEVNULL:
            stderr.close()
        line = self._read(proc, 120.0)
        if line is None or not json.loads(line).get("ready"):
            self._kill(proc)
            raise RuntimeError("the fuzz worker did not start (see its log)")
        return proc

    @staticmethod
    def _read(proc: subprocess.Popen[bytes], timeout: float) -> bytes | None:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout):
                return None
        return proc.stdout.readline() or None

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def run(self, job: Job) -> Outcome:
        """Ingest one job in the worker; a hang or a dead worker is an outcome, not an exception."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        assert self.proc.stdin is not None
        start = time.perf_counter()
        try:
            self.proc.stdin.write((json.dumps(dataclasses.asdict(job)) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:  # the worker died before it read the job
            line = None
        else:
            line = self._read(self.proc, self.timeout)
        if line is None:
            try:
                dead = self.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                dead = None
            self._kill(self.proc)
            self.proc = None
            self.restarts += 1
            shutil.rmtree(job.folder + ".out", ignore_errors=True)
            if dead is None:
                return Outcome(job, "hang", f"no answer within {self.timeout:g} s", time.perf_counter() - start)
            return Outcome(job, "crash", f"the worker died (exit status {dead})", time.perf_counter() - start)
        body = json.loads(line)
        return Outcome(job, body["outcome"], body["reason"], body["seconds"], body["peak_rss"])

    def close(self) -> None:
        """Stop the worker."""
        if self.proc is not None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill(self.proc)
            self.proc = None

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_jobs(jobs: Iterable[Job], *, timeout: float = 30.0, memory_bytes: int = WORKER_MEMORY_BYTES,
             log: Path | None = None) -> list[Outcome]:
    """Ingest every job in one worker (restarted after a hang or a death) and return the outcomes in order."""
    with Harness(timeout=timeout, memory_bytes=memory_bytes, log=log) as harness:
        return [harness.run(job) for job in jobs]


def summarise(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    """One row per kind and mutation family: files, in dataset, quarantined, crashes, hangs, other failures,
    peak RSS (MB) and seconds per file."""
    rows = []
    groups: dict[tuple[str, str], list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault((o.job.kind, o.job.family), []).append(o)
    for (kind, family), group in groups.items():
        rows.append({
            "kind": kind, "family": family, "files": len(group),
            "in dataset": sum(o.outcome in ("dataset", "accepted") for o in group),
            "quarantined": sum(o.outcome in ("quarantine", "refused") for o in group),
            "crashes": sum(o.outcome == "crash" for o in group),
            "hangs": sum(o.outcome == "hang" for o in group),
            "other failures": sum(o.failed and o.outcome not in ("crash", "hang") for o in group),
            "peak RSS MB": round(max(o.peak_rss for o in group) / 2**20),
            "s/file": round(sum(o.seconds for o in group) / len(group), 3),
        })
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """``rows`` as a markdown table."""
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


__all__ = [
    "CSV_FAMILIES", "DICOM_FAMILIES", "FORMULAS", "FUZZ_MAX_IMAGE_BYTES", "NIFTI_FAMILIES", "Harness", "Job", "Outcome",
    "bad_reason", "deflate_bomb", "element_offsets", "ingest", "make_clean", "make_csv", "make_dicom", "make_jobs",
    "make_nifti", "markdown", "nested_sequences", "planted", "run_jobs", "set_raw", "summarise", "worker_main",
]
