"""Tests for medsynth.io.dicom_write: synthetic CT/MR series and DICOM SEG, validated by dciodvfy."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

import medsynth
from medsynth import ConfigError, MedsynthError
from medsynth.io.dicom_write import (
    MEDSYNTH_UID_ROOT,
    SYNTHETIC_NOTE,
    new_study,
    read_segmentation,
    write_image_series,
    write_segmentation,
)
from tests.dicom_validate import dciodvfy

LABEL_NAMES = ["background", "dark", "middle", "bright", "lesion"]  # "lesion" is absent from the map
HU_RANGE = (-1000.0, 1000.0)


def _anatomical_crop() -> np.ndarray:
    """A 24x20x6 crop of nibabel's anatomical.nii, scaled to [0, 1]."""
    path = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
    image = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)[5:29, 12:32, 9:15]
    return (image - image.min()) / (image.max() - image.min())


def _oblique_affine() -> np.ndarray:
    """Orthonormal but not axis-aligned directions, anisotropic spacing (0.9, 1.3, 2.5) mm."""
    a, b = np.deg2rad(25.0), np.deg2rad(-12.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.9, 1.3, 2.5])
    affine[:3, 3] = [12.5, -30.0, 41.0]
    return affine


def _labels(volume: np.ndarray) -> np.ndarray:
    """Three labels by intensity band (1, 2, 3); label 4 ("lesion") never occurs."""
    return np.digitize(volume, [0.15, 0.4, 0.7]).astype(np.int64)


@dataclass(frozen=True)
class Written:
    volume: np.ndarray
    affine: np.ndarray
    label: np.ndarray
    mr: list[Path]
    ct: list[Path]
    seg: Path


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Written:
    """One sample written as an MR series, a CT series of the same study and a SEG of the MR series."""
    out = tmp_path_factory.mktemp("dicom")
    volume, affine = _anatomical_crop(), _oblique_affine()
    label = _labels(volume)
    study = new_study("syn_00007")
    mr = write_image_series(
        volume, affine, out / "mr", sample_id="syn_00007", series_description="synthetic T1w",
        seed=7, study=study,
    )
    ct = write_image_series(
        volume, affine, out / "ct", sample_id="syn_00007", series_description="synthetic CT", modality="CT",
        intensity_range=HU_RANGE, study=study, series_number=2,
    )
    seg = write_segmentation(label, mr, out / "seg" / "syn_00007.dcm", label_names=LABEL_NAMES)
    return Written(volume, affine, label, mr, ct, seg)


def _assert_valid(path: Path) -> list[str]:
    verdict = dciodvfy(path)
    assert not verdict.errors, f"dciodvfy errors for {path.name}:\n" + "\n".join(verdict.errors)
    return verdict.warnings


def _affine_from_files(files: list[Path]) -> np.ndarray:
    """RAS+ affine of a slice stack in the given order, from Image Plane attributes alone."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files[:2]]
    first, second = headers[0], (headers[1] if len(headers) > 1 else None)
    iop = np.array(first.ImageOrientationPatient, dtype=np.float64)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    origin = np.array(first.ImagePositionPatient, dtype=np.float64)
    if second is not None:
        step = np.array(second.ImagePositionPatient, dtype=np.float64) - origin
    else:
        step = np.cross(iop[:3], iop[3:]) * float(first.SpacingBetweenSlices)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = iop[:3] * col_spacing, iop[3:] * row_spacing, step, origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _rescaled(files: list[Path]) -> tuple[np.ndarray, float]:
    """The series' stored values times slope plus intercept, as ``[i, j, k]``, and the slope."""
    slices = [pydicom.dcmread(f) for f in files]
    slope = float(slices[0].RescaleSlope)
    values = np.stack([ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices], axis=2)
    return values, slope


# --- validation ---------------------------------------------------------------------------


def test_every_file_passes_dciodvfy(written: Written) -> None:
    """Every slice of both series and the SEG validate without errors (warnings are listed with -rA)."""
    warnings = set()
    for path in [*written.mr, *written.ct, written.seg]:
        warnings.update(_assert_valid(path))
    print("dciodvfy warnings:\n" + "\n".join(sorted(warnings)))


def test_single_slice_and_empty_label_map_pass_dciodvfy(tmp_path: Path) -> None:
    """A 2D image (channel first) is a one-slice series; an all-background label map still has every segment."""
    image = _anatomical_crop()[..., 2]
    affine = np.diag([-0.8, 0.8, 3.0, 1.0])
    files = write_image_series(image[None], affine, tmp_path / "img", sample_id="syn_2d", series_description="2D")
    assert len(files) == 1
    empty = np.zeros(image.shape, dtype=np.int64)
    seg = write_segmentation(empty, files, tmp_path / "seg.dcm", label_names=LABEL_NAMES)
    assert [s.SegmentLabel for s in pydicom.dcmread(seg).SegmentSequence] == LABEL_NAMES[1:]
    np.testing.assert_array_equal(read_segmentation(seg, files), empty[..., None])
    values, slope = _rescaled(files)
    np.testing.assert_allclose(values[..., 0], image, atol=slope / 2 + 1e-9)
    for path in (files[0], seg):
        _assert_valid(path)


@pytest.mark.parametrize("ci", ["", "1"])
def test_missing_validator_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected, match="dciodvfy"):
        dciodvfy("any.dcm")


# --- image series -------------------------------------------------------------------------


def test_mr_values_round_trip_within_quantisation(written: Written) -> None:
    """Stored values times Rescale Slope plus Intercept give the input back within half a slope."""
    values, slope = _rescaled(written.mr)
    assert values.shape == written.volume.shape
    assert slope < 2e-5  # 16-bit levels over [0, 1]
    np.testing.assert_allclose(values, written.volume, rtol=0, atol=slope / 2 + 1e-9)


def test_ct_values_are_hounsfield_units(written: Written) -> None:
    """For CT, intensities 0 and 1 become the given HU range."""
    values, slope = _rescaled(written.ct)
    low, high = HU_RANGE
    np.testing.assert_allclose(values, low + written.volume * (high - low), rtol=0, atol=slope / 2 + 1e-6)
    ds = pydicom.dcmread(written.ct[0], stop_before_pixels=True)
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]


@pytest.mark.parametrize("series", ["mr", "ct"])
def test_geometry_reconstructs_the_affine(written: Written, series: str) -> None:
    """Image Position/Orientation, Pixel Spacing and slice spacing give back the RAS+ affine."""
    files = getattr(written, series)
    np.testing.assert_allclose(_affine_from_files(files), written.affine, atol=1e-4)
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert int(ds.InstanceNumber) == k + 1
        expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ written.affine @ np.array([0, 0, k, 1.0])
        np.testing.assert_allclose(np.array(ds.ImagePositionPatient, dtype=float), expected[:3], atol=1e-4)
        assert float(ds.SliceThickness) == pytest.approx(2.5) and float(ds.SpacingBetweenSlices) == pytest.approx(2.5)
        assert (int(ds.Rows), int(ds.Columns)) == written.volume.shape[1::-1]


def test_series_is_marked_synthetic_with_new_uids(written: Written) -> None:
    """Synthetic patient, generation dates, DERIVED image type, medsynth equipment and UIDs."""
    slices = [pydicom.dcmread(f, stop_before_pixels=True) for f in [*written.mr, *written.ct]]
    mr = slices[0]
    assert str(mr.PatientName) == "SYNTHETIC^syn_00007" and mr.PatientID == "syn_00007"
    assert mr.PatientBirthDate == "" and mr.PatientSex == ""
    assert mr.StudyDate == mr.SeriesDate and len(mr.StudyDate) == 8
    assert list(mr.ImageType)[:2] == ["DERIVED", "SECONDARY"] and mr.BurnedInAnnotation == "NO"
    assert SYNTHETIC_NOTE in mr.ImageComments and "seed 7" in mr.ImageComments
    assert SYNTHETIC_NOTE in mr.DerivationDescription
    assert mr.Manufacturer == "medsynth" and mr.SoftwareVersions == medsynth.__version__
    assert mr.SeriesDescription == "synthetic T1w" and mr.Modality == "MR"
    uids = [ds.SOPInstanceUID for ds in slices]
    assert len(set(uids)) == len(uids)
    for ds in slices:
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID):
            assert uid.startswith(MEDSYNTH_UID_ROOT) and uid.is_valid
    assert len({ds.SeriesInstanceUID for ds in slices}) == 2  # MR and CT
    assert len({(ds.StudyInstanceUID, ds.FrameOfReferenceUID) for ds in slices}) == 1  # one study


def test_writes_leave_no_temporary_files_and_refuse_stale_slices(written: Written, tmp_path: Path) -> None:
    """Only the slices remain; a shorter series over an older, longer one is refused."""
    assert sorted(p.name for p in written.mr[0].parent.iterdir()) == [p.name for p in written.mr]
    volume, affine = written.volume, written.affine
    write_image_series(volume, affine, tmp_path, sample_id="syn_1", series_description="a")
    write_image_series(volume, affine, tmp_path, sample_id="syn_1", series_description="a again")  # same files
    with pytest.raises(MedsynthError, match="already holds other slices"):
        write_image_series(volume[..., :3], affine, tmp_path, sample_id="syn_1", series_description="b")


def test_extra_attributes_are_set(tmp_path: Path) -> None:
    """``extra`` adds attributes by keyword and the result still validates."""
    files = write_image_series(
        np.zeros((8, 6)), np.eye(4), tmp_path, sample_id="x", series_description="flat",
        extra={"PatientPosition": "HFS", "InstitutionName": "Test Hospital"},
    )
    ds = pydicom.dcmread(files[0])
    assert ds.PatientPosition == "HFS" and ds.InstitutionName == "Test Hospital"
    assert not ds.pixel_array.any()
    _assert_valid(files[0])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"modality": "XA"}, ConfigError, "modality must be one of"),
        ({"modality": "CT"}, ConfigError, "intensity_range"),
        ({"sample_id": "a/b"}, ConfigError, "sample_id"),
        ({"series_description": "x" * 65}, ConfigError, "series_description"),
        ({"extra": {"NotAKeyword": 1}}, ConfigError, "not a DICOM keyword"),
        ({"extra": {"PixelSpacing": [1, 1]}}, ConfigError, "cannot be replaced"),
        ({"intensity_range": (1.0, 0.0)}, ConfigError, "low < high"),
        ({"affine": np.array([[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])}, MedsynthError, "sheared"),
        ({"affine": np.eye(3)}, MedsynthError, "4x4"),
        ({"volume": np.full((4, 4, 2), np.nan)}, MedsynthError, "NaN"),
        ({"volume": np.zeros((2, 2, 2, 2))}, MedsynthError, "2D"),
    ],
)
def test_image_series_options_are_checked(tmp_path: Path, kwargs: dict, error: type, match: str) -> None:
    args = {"volume": np.zeros((4, 4, 2)), "affine": np.eye(4), "sample_id": "s", "series_description": "d", **kwargs}
    with pytest.raises(error, match=match):
        write_image_series(args.pop("volume"), args.pop("affine"), tmp_path / "out", **args)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- segmentation -------------------------------------------------------------------------


def test_seg_round_trips_every_segment(written: Written) -> None:
    """The SEG gives the label map back, and each segment equals its label's mask."""
    np.testing.assert_array_equal(read_segmentation(written.seg, written.mr), written.label)
    seg = pydicom.dcmread(written.seg)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == LABEL_NAMES[1:]
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == [1, 2, 3, 4]
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    # per segment, straight from the frames: frame -> (segment, source instance)
    uid_to_k = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: k for k, f in enumerate(written.mr)}
    masks = np.zeros((len(LABEL_NAMES), *written.label.shape), dtype=bool)
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        masks[number, :, :, uid_to_k[source]] = frame.T.astype(bool)
    for number in range(1, len(LABEL_NAMES)):
        np.testing.assert_array_equal(masks[number], written.label == number, err_msg=LABEL_NAMES[number])
    assert not masks[4].any()  # the absent label is a segment without frames


def test_seg_references_the_image_series(written: Written) -> None:
    """Same patient, study and frame of reference; the referenced series and instances are the MR slices."""
    seg = pydicom.dcmread(written.seg, stop_before_pixels=True)
    slices = [pydicom.dcmread(f, stop_before_pixels=True) for f in written.mr]
    first = slices[0]
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert seg[keyword].value == first[keyword].value, keyword
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID and seg.SeriesInstanceUID.startswith(MEDSYNTH_UID_ROOT)
    (ref,) = seg.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == first.SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in ref.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in slices
    }
    assert seg.Manufacturer == "medsynth" and SYNTHETIC_NOTE in seg.ContentDescription


@pytest.mark.parametrize(
    ("label", "names", "error", "match"),
    [
        ("ok", ["background"], ConfigError, "at least one label"),
        ("ok", ["background", "x" * 65], ConfigError, "label_names"),
        ("big", LABEL_NAMES, MedsynthError, "outside 0..4"),
        ("shape", LABEL_NAMES, MedsynthError, "does not fit the source series"),
    ],
)
def test_segmentation_options_are_checked(
    written: Written, tmp_path: Path, label: str, names: list[str], error: type, match: str
) -> None:
    values = {"ok": written.label, "big": written.label + 5, "shape": written.label[:, :, :3]}[label]
    with pytest.raises(error, match=match):
        write_segmentation(values, written.mr, tmp_path / "seg.dcm", label_names=names)
    assert not (tmp_path / "seg.dcm").exists()


# --- medsynth's own DICOM reader ----------------------------------------------------------


def _canonical(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(volume, dtype=np.float32), affine))
    return np.asarray(image.dataobj), image.affine


GEOMETRIES = {
    "oblique": _oblique_affine(),
    "left-handed": np.array([[-2.0, 0, 0, 32], [0, 2, 0, -40], [0, 0, 2, -16], [0, 0, 0, 1]]),  # anatomical.nii: LAS
}


@pytest.mark.parametrize(("geometry", "slices"), [("oblique", 6), ("left-handed", 6), ("left-handed", 1)])
def test_medsynth_reader_gives_back_image_labels_and_geometry(
    written: Written, tmp_path: Path, geometry: str, slices: int
) -> None:
    """medsynth.io.dicom reads the series and its SEG back as the same image and labels on the same world grid."""
    dicom = pytest.importorskip("medsynth.io.dicom")
    if not hasattr(dicom, "load_dicom_series"):
        pytest.skip("medsynth.io.dicom.load_dicom_series is not written yet")
    affine, volume, label = GEOMETRIES[geometry], written.volume[..., :slices], written.label[..., :slices]
    files = write_image_series(volume, affine, tmp_path, sample_id="rt", series_description="round trip")
    seg = write_segmentation(label, files, tmp_path / "seg.dcm", label_names=LABEL_NAMES)
    read, read_affine = dicom.load_dicom_series(list(reversed(files)))  # order must not matter
    assert np.asarray(read).dtype == np.float32
    got, got_affine = _canonical(read, read_affine)
    want, want_affine = _canonical(volume, affine)
    np.testing.assert_allclose(got_affine, want_affine, atol=1e-4)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    if not hasattr(dicom, "load_dicom_seg"):
        pytest.skip("medsynth.io.dicom.load_dicom_seg is not written yet")
    segments, names = dicom.load_dicom_seg(seg, affine=read_affine, shape=np.shape(read))
    assert names == dict(enumerate(LABEL_NAMES[1:], start=1))
    np.testing.assert_array_equal(_canonical(segments, read_affine)[0], _canonical(label, affine)[0])
