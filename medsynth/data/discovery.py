"""Finding the cases in an input without loading pixels: DICOM exports, nnU-Net raw datasets, folders of NIfTI, one NIfTI pair.

Every source ends in the same :class:`Discovery`: one :class:`CaseSpec` per volume to preprocess,
the label names, and a quarantine entry for everything skipped, so :mod:`medsynth.data.build`
treats all sources alike. The module is one piece because the discoverers share the case and
quarantine model and the de-identification rules: patients and series are named by keyed hashes
(:mod:`medsynth.data.deid`), paths in reports are relative to the input with suspicious
components pseudonymised, and attribute tables are refused when they repeat an identifier.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import functools
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from medsynth import ConfigError, MedsynthError
from medsynth.data.deid import Scrubber, pseudonym
from medsynth.data.parallel import process_pool, progress_bar
from medsynth.io.dicom import DICOMDIR, OTHER, SEG, DicomHeader, code_string, dicom_files, read_header
from medsynth.io.nifti import MAX_IMAGE_BYTES

log = logging.getLogger("medsynth")

LABEL_MODES = ("auto", "seg", "body")
ATTRIBUTE_MATCHES = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")
BODY_LABELS = ("background", "body")
_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)


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
        source: ``dicom``, ``nnunet``, ``folder``, ``nifti`` or ``mni152``.
        root: The input folder (paths in reports are relative to it); ``None`` when the user named
            the files themselves (a NIfTI pair), whose paths are then shown as given.
    """

    cases: list[CaseSpec]
    quarantine: list[dict[str, str | None]]
    label_names: list[str]
    scrubber: Scrubber
    source: str
    root: Path | None = None

    def show(self, path: str | os.PathLike[str]) -> str:
        """How a report names ``path``: relative to the input folder and pseudonymised, or as given."""
        return self.scrubber.path(path, self.root) if self.root is not None else str(path)


def quarantine_entry(file: str | None, series: str | None, reason: str) -> dict[str, str | None]:
    """One item of ``quarantine.json``: the (pseudonymised) file, the series pseudonym and why it was skipped."""
    return {"file": file, "series": series, "reason": reason}


# --- attributes CSV -----------------------------------------------------------------------


def read_attributes(path: str | os.PathLike[str], *, key: str, columns: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
    """Per-case attributes from a CSV with a header row.

    The file must be UTF-8 (a byte-order mark is allowed, and UTF-16 with one is read too). A table
    that cannot be used as a whole is refused with one line naming the file, the line and what was
    expected: another encoding, NUL bytes, a cell over 128 KiB, a row with more non-empty cells than
    the header, a repeated column or key. A row with fewer cells leaves the missing ones empty. A kept
    column whose name a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``, tab, carriage
    return first) is refused, because column names start the ``attributes`` cells of
    ``synthetic/manifest.csv``; values may hold anything, as they never start a cell there.

    Args:
        path: The CSV file.
        key: The column that identifies the case (its values are matched against PatientID,
            a UID or a case name; they are never written out).
        columns: Columns to keep as attributes; ``None`` keeps every column but ``key``.

    Returns:
        Attributes per key value (empty cells are left out).

    Raises:
        ConfigError: If the file, the key column or a named column is missing, or the table is
            refused for one of the reasons above.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.attributes.csv: file not found: {path}")
    rows = _csv_rows(path)
    header = [name.strip() for name in next(rows, [])]
    if not any(header):
        raise ConfigError(f"data.attributes.csv: {path} has no header row (expected column names on line 1)")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise ConfigError(f"data.attributes.csv: {path} names column(s) {repeated} more than once")
    if key not in header:
        raise ConfigError(f"data.attributes.key: column {key!r} is not in {path} (columns: {_shown(header)})")
    keep = [c for c in header if c != key and c] if columns is None else list(columns)
    unknown = [c for c in keep if c not in header]
    if unknown:
        raise ConfigError(f"data.attributes.columns: {unknown} not in {path} (columns: {_shown(header)})")
    unsafe = [c for c in keep if not c or c.startswith(_FORMULA_START) or any(ch in c for ch in "\r\n\t")]
    if unsafe:
        raise ConfigError(
            f"data.attributes.csv: column name(s) {_shown(unsafe)} in {path} are empty, start like a spreadsheet formula "
            "or hold a line break or tab; rename them, or leave them out with data.attributes.columns"
        )
    where = {name: i for i, name in enumerate(header)}
    table: dict[str, dict[str, str]] = {}
    for n, row in rows:
        if len(row) > len(header) and any(cell.strip() for cell in row[len(header) :]):
            raise ConfigError(
                f"data.attributes.csv: {path} line {n} has {len(row)} cells but the header has "
                f"{len(header)} (a separator inside an unquoted value?)"
            )
        cells = row + [""] * (len(header) - len(row))
        value = cells[where[key]].strip()
        if not value:
            continue
        if value in table:
            raise ConfigError(f"data.attributes.csv: {path} line {n} repeats a value of column {key!r}")
        table[value] = {c: cells[where[c]].strip() for c in keep if cells[where[c]].strip()}
    return table


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")
"""What makes a spreadsheet run a cell as a formula (CSV injection)."""
_MAX_CSV_BYTES = 256 * 1024**2


def _csv_rows(path: Path) -> Iterator[Any]:
    """The CSV's header row, then ``(line number, row)`` pairs; refuses what cannot be read as a table."""
    if path.stat().st_size > _MAX_CSV_BYTES:
        raise ConfigError(
            f"data.attributes.csv: {path} is larger than {_MAX_CSV_BYTES // 1024**2} MiB; expected a table of per-case attributes"
        )
    text = _decode(path, path.read_bytes())
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise ConfigError(
            f"data.attributes.csv: {path} holds NUL bytes (line {line}): a binary file, or UTF-16 "
            "without a byte-order mark? Save it as UTF-8 CSV"
        )
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        yield next(reader, [])
        for row in reader:
            if row:
                yield reader.line_num, row
    except csv.Error as err:
        raise ConfigError(
            f"data.attributes.csv: {path} line {reader.line_num} cannot be read as CSV ({err}); an unbalanced quote?"
        ) from None


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text (UTF-16 and UTF-8 with a byte-order mark too), or one line saying why not."""
    encoding = "utf-16" if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"data.attributes.csv: {path} is not {encoding.upper().replace('-SIG', '')} text (byte 0x{data[err.start]:02x} "
            f"on line {line}); save it as UTF-8 CSV (for example 'CSV UTF-8' in a spreadsheet)"
        ) from None


def _shown(names: Sequence[str], *, limit: int = 20, width: int = 40) -> str:
    """Column names for a one-line message: each cut to ``width`` characters, at most ``limit`` of them."""
    shown = [name if len(name) <= width else name[:width] + "..." for name in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{shown}{more}"


def _check_attribute_values(table: Mapping[str, Mapping[str, str]], scrubber: Scrubber) -> None:
    """Refuse attribute values that hold an identifier seen in the input (a name, an id, a date)."""
    for attributes in table.values():
        for column, value in attributes.items():
            if scrubber.text(value) != value:
                raise ConfigError(
                    f"data.attributes: column {column!r} holds values that also appear in identifying DICOM "
                    "attributes (names, ids, dates, UIDs); leave it out with data.attributes.columns"
                )


# --- DICOM discovery --------------------------------------------------------------------


def scan_headers(
    files: Sequence[Path], *, workers: int = 0, progress: bool = False, max_bytes: int = MAX_IMAGE_BYTES
) -> list[DicomHeader]:
    """Read every file's header (no pixel data), in worker processes when ``workers > 1``.

    Args:
        files: The files.
        workers: Processes to use.
        progress: Show a progress bar.
        max_bytes: Largest size a deflated data set may inflate to.

    Returns:
        One header per file, in order; a file that cannot be read has ``kind=None`` and an ``error``.
    """
    paths = [str(f) for f in files]
    read = functools.partial(read_header, max_bytes=max_bytes)
    bar = progress_bar(len(paths), "scan", enabled=progress)
    try:
        if workers > 1 and len(paths) > 64:
            with process_pool(workers) as pool:
                headers = []
                for header in pool.map(read, paths, chunksize=64):
                    headers.append(header)
                    bar.update(1)
                return headers
        headers = []
        for path in paths:
            headers.append(read(path))
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
    max_bytes: int = MAX_IMAGE_BYTES,
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
        max_bytes: Largest size a deflated header may inflate to (see :func:`read_header`).

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
    headers = scan_headers(dicom_files(root, exclude=exclude), workers=workers, progress=progress, max_bytes=max_bytes)
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
            quarantine.append(quarantine_entry(show(h.path), None, h.error or "not a DICOM file"))
        elif h.kind == DICOMDIR:
            quarantine.append(
                quarantine_entry(
                    show(h.path),
                    None,
                    "DICOMDIR (media directory), not an image: the files it lists are found by the folder scan",
                )
            )
        elif h.kind == OTHER:
            quarantine.append(
                quarantine_entry(
                    show(h.path),
                    series_key(h.series_uid) if h.series_uid else None,
                    f"not an image ({h.sop_class or 'unknown SOP class'}): skipped",
                )
            )
        elif not h.series_uid:
            quarantine.append(
                quarantine_entry(show(h.path), None, "no SeriesInstanceUID: cannot tell which series the file belongs to")
            )
        elif h.kind == SEG:
            for uid in h.referenced_series or ("",):
                segs.setdefault(uid, []).append(h)
        elif not h.has_pixels:
            quarantine.append(
                quarantine_entry(
                    show(h.path),
                    series_key(h.series_uid),
                    f"image without pixel data ({h.sop_class or 'unknown SOP class'}): skipped",
                )
            )
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
                quarantine.append(
                    quarantine_entry(
                        show(h.path),
                        series_key(h.series_uid),
                        "SEG references a series that is not in the export (or was skipped)",
                    )
                )
            continue
        if mode == "body":
            for h in found:
                quarantine.append(
                    quarantine_entry(show(h.path), series_key(h.series_uid), "SEG ignored: data.labels=body makes body masks")
                )
            continue
        chosen_seg[uid] = found[0]
        for h in found[1:]:
            quarantine.append(
                quarantine_entry(
                    show(h.path), series_key(h.series_uid), "another SEG of the same series was used (the first by path)"
                )
            )
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
            quarantine.append(
                quarantine_entry(
                    display, key, f"modality {code_string(series_modality) or 'unknown'} is not data.modality={modality}"
                )
            )
            continue
        label_file = None
        segment_names: dict[int, int] = {}
        if mode == "seg":
            seg = chosen_seg.get(uid)
            if seg is None:
                quarantine.append(
                    quarantine_entry(
                        display,
                        key,
                        "no SEG object references this series (data.labels=seg; use data.labels=body to keep unlabelled series)",
                    )
                )
                continue
            unknown = [n for n in seg.segment_labels if n not in names]
            if unknown:
                quarantine.append(
                    quarantine_entry(show(seg.path), key, f"SEG segment label(s) {unknown} are not in data.label_names {names}")
                )
                continue
            label_file = seg.path
            segment_names = {number: names.index(name) for number, name in zip(seg.segment_numbers, seg.segment_labels)}
        first = members[0]
        patient_value = first.patient_id or first.study_uid or uid
        patient = pseudonym(patient_value, salt, prefix="p", length=12)
        match = {"PatientID": first.patient_id, "StudyInstanceUID": first.study_uid, "SeriesInstanceUID": uid}[attribute_match]
        case_attributes = dict((attributes or {}).get(match, {})) if match else {}
        cases.append(
            CaseSpec(
                key=f"{patient}_{key}",
                patient=patient,
                kind="dicom",
                files=tuple(h.path for h in members),
                label=label_file,
                modality=series_modality,
                source={"format": "dicom", "series": key, "files": str(len(members)), **({"seg": "yes"} if label_file else {})},
                display=display,
                attributes=case_attributes,
                segment_names=segment_names,
            )
        )
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
                quarantine.append(
                    quarantine_entry(f"imagesTr/{scrubber.component(image.name)}", None, f"not a {ending} file: skipped")
                )
            continue
        if not image.name.endswith(suffix):
            continue
        name = image.name[: -len(suffix)]
        label = labels_dir / f"{name}{ending}"
        patient = pseudonym(name, salt, prefix="p", length=12)
        display = f"imagesTr/{scrubber.component(image.name)}"
        if not label.is_file():
            quarantine.append(quarantine_entry(display, None, f"no label map labelsTr/<case>{ending} for this image"))
            continue
        cases.append(
            CaseSpec(
                key=patient,
                patient=patient,
                kind="nifti",
                files=(str(image),),
                label=str(label),
                modality=series_modality,
                source={"format": "nnunet", "case": patient, "channel": str(index)},
                display=display,
                attributes=dict((attributes or {}).get(name, {})),
            )
        )
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
            quarantine.append(quarantine_entry(display, None, "not a NIfTI file (.nii or .nii.gz): skipped"))
            continue
        name = _case_name(path)
        patient = pseudonym(name, salt, prefix="p", length=12)
        cases.append(
            CaseSpec(
                key=patient,
                patient=patient,
                kind="nifti",
                files=(str(path),),
                label=None,
                modality=modality or "",
                channel=channel,
                source={"format": "nifti", "case": patient},
                display=display,
                attributes=dict((attributes or {}).get(name, {})),
            )
        )
    if not cases:
        raise MedsynthError(f"no NIfTI image (.nii, .nii.gz) under paths.input={root}")
    return Discovery(cases, quarantine, names, scrubber, "folder", root)


def nifti_pair_case(
    image: str | os.PathLike[str],
    label: str | os.PathLike[str],
    *,
    case_id: str,
    label_names: Sequence[str],
    modality: str = "MR",
    attributes: Mapping[str, str] | None = None,
    source: str = "nifti",
) -> Discovery:
    """One NIfTI image with its label map as a single-case discovery (``data=nifti`` and the demo).

    The files are the user's own choice, named in the config: reports show their paths as given.

    Args:
        image: The image file (3D).
        label: Its label map, on the same voxel grid.
        case_id: Id of the case and prefix of its record ids.
        label_names: Name per label value, background first.
        modality: ``CT`` selects the HU window under ``data.intensity.mode=auto``.
        attributes: Case attributes given to every record.
        source: The manifest's ``source`` (``nifti``, or ``mni152`` for the demo).

    Returns:
        The discovery.

    Raises:
        MedsynthError: If a file does not exist (naming it).
    """
    for path in (image, label):
        if not Path(path).is_file():
            raise MedsynthError(f"input file not found: {path}")
    case = CaseSpec(
        key=case_id,
        patient=case_id,
        kind="nifti",
        files=(str(image),),
        label=str(label),
        modality=modality,
        source={"image": str(image), "label": str(label)},
        display=str(image),
        attributes=dict(attributes or {}),
    )
    return Discovery([case], [], list(label_names), Scrubber(b""), source)
