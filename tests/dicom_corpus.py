"""Test exports built from real scans that install with packages, with planted identifiers and broken items.

pydicom's CT/MR test files and its ``dicomdirtests`` tree (a real DICOMDIR export), pydicom-data's
multi-frame MR in four transfer syntaxes, nibabel's ``anatomical.nii`` written out as a DICOM MR
series with a SEG made by highdicom, and a JPEG-lossless and a JPEG 2000 image. Every written
file carries distinctive values in the attributes the DICOM Basic Application Level
Confidentiality Profile removes, so a test can search the pipeline's outputs for them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

UID_ROOT = "1.2.826.0.1.3680043.9.7777."
ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
DICOMDIR_TESTS = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
JPEG_XL = "1.2.840.10008.1.2.4.112"


def planted_identity(n: int) -> dict[str, str]:
    """Distinctive values for the profile's attributes of patient ``n`` (valid for each VR)."""
    return {
        "PatientName": f"QZXFAMILY{n}^QZXGIVEN{n}",
        "PatientID": f"QZXPID{n:04d}",
        "PatientBirthDate": f"1923091{n}",
        "PatientBirthTime": f"04150{n}",
        "OtherPatientIDs": f"QZXOTHERID{n}",
        "PatientAddress": f"QZX{n} Planted Street",
        "PatientTelephoneNumbers": f"QZXPHONE{n}",
        "StudyDate": f"1931050{n}",
        "SeriesDate": f"1931060{n}",
        "AcquisitionDate": f"1931070{n}",
        "ContentDate": f"1931080{n}",
        "StudyTime": f"03141{n}.926535",
        "SeriesTime": f"03151{n}.926535",
        "AcquisitionTime": f"03161{n}.926535",
        "ContentTime": f"03171{n}.926535",
        "InstitutionName": f"QZXINSTITUTION{n}",
        "InstitutionAddress": f"QZXINSTADDRESS{n}",
        "InstitutionalDepartmentName": f"QZXDEPARTMENT{n}",
        "StationName": f"QZXSTATION{n}",
        "ReferringPhysicianName": f"QZXREFERRER{n}^DOC",
        "PerformingPhysicianName": f"QZXPERFORMER{n}^DOC",
        "OperatorsName": f"QZXOPERATOR{n}^TECH",
        "NameOfPhysiciansReadingStudy": f"QZXREADER{n}^DOC",
        "AccessionNumber": f"QZXACC{n:04d}",
        "StudyID": f"QZXSTY{n}",
        "StudyDescription": f"QZXSTUDYDESC{n}",
        "SeriesDescription": f"QZXSERIESDESC{n}",
        "ImageComments": f"QZXCOMMENT{n}",
        "PatientComments": f"QZXPATCOMMENT{n}",
        "RequestedProcedureDescription": f"QZXPROCDESC{n}",
        "ProtocolName": f"QZXPROTOCOL{n}",
        "DeviceSerialNumber": f"QZXSERIAL{n}",
        "StudyInstanceUID": f"{UID_ROOT}1{n}.1",
        "FrameOfReferenceUID": f"{UID_ROOT}1{n}.2",
    }


PLANTED_PATIENTS = range(1, 8)


def planted_values() -> list[str]:
    """Every planted value (names split into parts too) plus the UIDs :func:`plant` makes."""
    values = []
    for n in PLANTED_PATIENTS:
        for key, value in planted_identity(n).items():
            values.append(value)
            if "^" in value:
                values.extend(value.split("^")[:1])
    return values


def uid(tag: str) -> str:
    """A distinctive UID under the planted root (searchable in outputs)."""
    return f"{UID_ROOT}{tag}"


def plant(ds: Dataset, patient: int, *, series: str, instance: int) -> Dataset:
    """Set every planted identifier of ``patient`` on ``ds``, with series and instance UIDs under the planted root."""
    for key, value in planted_identity(patient).items():
        setattr(ds, key, value)
    ds.SeriesInstanceUID = uid(f"2{patient}.{series}")
    ds.SOPInstanceUID = uid(f"3{patient}.{series}.{instance}")
    if hasattr(ds, "file_meta"):
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _meta(sop_class: str, sop_instance: str, syntax: str = ExplicitVRLittleEndian) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = uid("9.1")
    return meta


def volume_to_series(
    volume: np.ndarray, affine: np.ndarray, folder: Path, *, patient: int, series: str,
    slope: float = 1.0, intercept: float = 0.0, names: str = "sop",
) -> list[Path]:
    """Write a ``(i, j, k)`` volume with a RAS+ affine as a single-frame MR series (stored value = (v - intercept) / slope).

    Args:
        volume: Integer-valued intensities.
        affine: Voxel-to-RAS affine.
        folder: Destination folder.
        patient: Planted identity number.
        series: Series tag (part of the planted series UID).
        slope: RescaleSlope written.
        intercept: RescaleIntercept written.
        names: ``sop`` names files by their SOPInstanceUID (as PACS exports do); ``index`` as ``IM0001``.

    Returns:
        The written files in slice order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    origin = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]
    col_step, row_step = lps[:, 0], lps[:, 1]
    orientation = [*(col_step / np.linalg.norm(col_step)), *(row_step / np.linalg.norm(row_step))]
    spacing = [float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step))]
    stored = np.rint((volume - intercept) / slope).astype(np.int16)
    files = []
    for k in range(volume.shape[2]):
        ds = Dataset()
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.Modality = "MR"
        ds.PatientSex = "O"
        ds.SeriesNumber = 7
        ds.InstanceNumber = k + 1
        ds.Manufacturer = "medsynth-tests"
        ds.ImagePositionPatient = [f"{v:.6f}" for v in origin + lps[:, 2] * k]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{v:.6f}" for v in spacing]
        ds.SliceThickness = f"{np.linalg.norm(lps[:, 2]):.6f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PositionReferenceIndicator = ""
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        plant(ds, patient, series=series, instance=k + 1)
        ds.file_meta = _meta(MR_IMAGE_STORAGE, ds.SOPInstanceUID)
        name = f"{ds.SOPInstanceUID}.dcm" if names == "sop" else f"IM{k + 1:04d}"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def anatomical() -> tuple[np.ndarray, np.ndarray]:
    """nibabel's ``anatomical.nii``: ``(volume, affine)``."""
    img = nib.load(str(ANATOMICAL))
    return np.asarray(img.dataobj).astype(np.float32), np.asarray(img.affine, dtype=np.float64)


def anatomical_mask(volume: np.ndarray) -> np.ndarray:
    """A thresholded brain mask of the anatomical volume (the SEG's segment)."""
    return (volume > np.percentile(volume, 60)).astype(np.uint8)


def write_seg(source_files: list[Path], mask: np.ndarray, path: Path, *, patient: int) -> Path:
    """A DICOM SEG (made by highdicom) of ``mask`` ``(i, j, k)`` referencing the series of ``source_files``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = sorted((pydicom.dcmread(f) for f in source_files), key=lambda d: int(d.InstanceNumber))
    frames = np.stack([mask[:, :, k].T for k in range(mask.shape[2])]).astype(bool)
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="brain", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Brain, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=uid(f"4{patient}.1"), series_number=99,
        sop_instance_uid=uid(f"4{patient}.1.1"), instance_number=1, manufacturer="medsynth-tests",
        manufacturer_model_name="corpus", software_versions="0", device_serial_number="QZXSEGSERIAL",
        omit_empty_frames=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def _with_geometry(ds: Dataset, *, spacing: float = 1.2, pixel: float = 0.9) -> Dataset:
    """Give pydicom-data's enhanced MR (which has no functional groups) an axial stack geometry."""
    frames = int(ds.NumberOfFrames)
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [f"{pixel}", f"{pixel}"]
    measures.SliceThickness = f"{spacing}"
    measures.SpacingBetweenSlices = f"{spacing}"
    orientation = Dataset()
    orientation.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = "2", "-10", "US"
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for f in range(frames):
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = ["-28.8", "-28.8", f"{f * spacing:.3f}"]
        item.PlanePositionSequence = DicomSequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    return ds


@dataclasses.dataclass
class Corpus:
    """A built export and what a correct ingest must make of it.

    Attributes:
        root: The export folder (``paths.input``).
        valid: Names of the series that must reach the dataset (with ``data.labels=body``).
        broken: Substrings of the quarantine reasons each broken item must produce.
        anatomical_files: The anatomical MR series' files (patient 1).
        seg: The SEG of that series.
    """

    root: Path
    valid: dict[str, str]
    broken: dict[str, str]
    anatomical_files: list[Path]
    seg: Path


def build_corpus(root: Path) -> Corpus:
    """Write the test export under ``root`` (see the module docstring)."""
    root.mkdir(parents=True, exist_ok=True)
    volume, affine = anatomical()
    valid: dict[str, str] = {}
    broken: dict[str, str] = {}

    # A real DICOMDIR export: the dicomdirtests tree (patients, studies, CR, CT, MR; only CT5N is a clean stack).
    export = root / "PACS"
    shutil.copytree(DICOMDIR_TESTS, export, ignore=shutil.ignore_patterns("TINY_ALPHA", "DICOMDIR-*", "README*"))
    valid["dicomdir CT5N"] = "5 slices"
    broken["dicomdir CT2 (slices 1.25 mm apart, 161 missing)"] = "missing"
    broken["dicomdir CR (projection radiographs)"] = "no patient geometry"
    broken["dicomdir MR2/MR700 (localizers)"] = "different orientations"
    broken["DICOMDIR"] = "DICOMDIR"

    # nibabel's anatomical scan as an MR series, in folders and files named by identifiers.
    patient_folder = root / "QZXPID0001_QZXFAMILY1" / uid("21.a")
    anat_files = volume_to_series(2 * volume - 100, affine, patient_folder, patient=1, series="a", slope=2.0, intercept=-100.0)
    seg = write_seg(anat_files, anatomical_mask(volume), root / "QZXPID0001_QZXFAMILY1" / "seg" / "SEG0001.dcm", patient=1)
    valid["anatomical MR (patient 1, with SEG)"] = "25 slices"

    # The same scan split across two folders, one slice stored twice under another name.
    split = volume_to_series(volume[::-1], affine, root / "QZXPID0002" / "part1", patient=2, series="b", names="index")
    second = root / "QZXPID0002" / "part2"
    second.mkdir(parents=True)
    for path in split[12:]:
        shutil.move(path, second / path.name)
    shutil.copy(second / split[-1].name, second / "copy_of_last_slice")
    valid["anatomical MR split across folders (patient 2)"] = "25 slices"

    # A slice missing from a series.
    gappy = volume_to_series(volume, affine, root / "QZXPID0003" / "gappy", patient=3, series="c", names="index")
    gappy[10].unlink()
    broken["series with a missing slice"] = "1 slice(s) missing"

    # pydicom's single-slice CT and MR, planted.
    for n, (name, folder) in enumerate([("CT_small.dcm", "ct"), ("MR_small.dcm", "mr")], start=4):
        ds = plant(pydicom.dcmread(get_testdata_file(name)), n, series=folder, instance=1)
        (root / "QZXPID000{}".format(n)).mkdir(exist_ok=True)
        ds.save_as(root / f"QZXPID000{n}" / f"{folder}.dcm")
        valid[name] = "1 slice"

    # pydicom-data's multi-frame MR in four transfer syntaxes (given a geometry), one series each.
    for tag, name in [("e1", "emri_small.dcm"), ("e2", "emri_small_jpeg_ls_lossless.dcm"),
                      ("e3", "emri_small_jpeg_2k_lossless.dcm"), ("e4", "emri_small_RLE.dcm")]:
        ds = plant(_with_geometry(pydicom.dcmread(get_testdata_file(name))), 6, series=tag, instance=1)
        ds.save_as(_mkdir(root / "multiframe") / f"{tag}.dcm")
        valid[name] = "10 frames"
    # JPEG lossless and JPEG 2000 single images with a geometry.
    for tag, name in [("j1", "JPEG-LL.dcm"), ("j2", "693_J2KR.dcm")]:
        ds = plant(pydicom.dcmread(get_testdata_file(name)), 7, series=tag, instance=1)
        ds.ImagePositionPatient = ["0", "0", "0"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = ds.get("PixelSpacing") or ["1", "1"]
        ds.save_as(_mkdir(root / "compressed") / f"{tag}.dcm")
        valid[name] = "1 slice"

    # Broken items.
    junk = _mkdir(root / "junk")
    truncated = plant(pydicom.dcmread(get_testdata_file("CT_small.dcm")), 5, series="trunc", instance=1)
    truncated.save_as(junk / "truncated.dcm")
    data = (junk / "truncated.dcm").read_bytes()
    (junk / "truncated.dcm").write_bytes(data[: len(data) // 2])
    broken["truncated file"] = "truncated"
    (junk / "notes.txt").write_text("not a DICOM file\n")
    (junk / "thumbs.db").write_bytes(os.urandom(300))
    broken["not DICOM"] = "not a DICOM file"
    nopixels = plant(pydicom.dcmread(get_testdata_file("MR_small.dcm")), 5, series="nopix", instance=1)
    del nopixels.PixelData
    nopixels.save_as(junk / "nopixels.dcm")
    broken["image without pixel data"] = "without pixel data"
    undecodable = plant(_with_geometry(pydicom.dcmread(get_testdata_file("emri_small_RLE.dcm"))), 5, series="jxl", instance=1)
    save_with_syntax(undecodable, junk / "jpegxl.dcm", JPEG_XL)
    broken["undecodable transfer syntax"] = "JPEG XL"
    sr = plant(pydicom.dcmread(get_testdata_file("test-SR.dcm")), 5, series="sr", instance=1)
    sr.save_as(junk / "report.dcm")
    broken["structured report"] = "not an image"
    liver = plant(pydicom.dcmread(get_testdata_file("liver.dcm")), 5, series="liverseg", instance=1)
    liver.save_as(junk / "liver_seg.dcm")
    broken["SEG of an absent series"] = "SEG references a series that is not in the export"
    return Corpus(root, valid, broken, anat_files, seg)


def save_with_syntax(ds: Dataset, path: Path, syntax: str) -> Path:
    """Save ``ds`` (encapsulated, explicit VR little endian) and label it with transfer syntax ``syntax``.

    pydicom refuses to write a syntax it does not know, so the file meta is written separately.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    ds.save_as(path)
    raw = path.read_bytes()
    body = raw[144 + int.from_bytes(raw[140:144], "little"):]
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, ds.file_meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + buffer.getvalue() + body)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
