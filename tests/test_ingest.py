"""Tests for DICOM reading, the ingest of DICOM exports and NIfTI datasets, and the quarantine."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medsynth import ConfigError, MedsynthError
from medsynth.data import read_manifest
from medsynth.data.build import build_dataset
from medsynth.data.case import VolumeSettings
from medsynth.data.discovery import discover_dicom, discover_folder, discover_nnunet, read_attributes
from medsynth.io import save_nifti
from medsynth.io.dicom import DicomSeriesError, load_dicom_seg, load_dicom_series, read_header
from tests.dicom_corpus import (
    DICOMDIR_TESTS,
    _with_geometry,
    anatomical,
    anatomical_mask,
    build_corpus,
    volume_to_series,
    write_seg,
)

SALT = b"test-salt"


def _series(tmp_path: Path, volume: np.ndarray | None = None, affine: np.ndarray | None = None, **kwargs) -> list[Path]:
    if volume is None:
        volume, affine = anatomical()
    return volume_to_series(volume, affine, tmp_path / "series", patient=1, series="t", names="index", **kwargs)


# --- load_dicom_series: geometry and values --------------------------------------------


def test_series_round_trips_nibabel_geometry(tmp_path: Path) -> None:
    """nibabel's anatomical.nii written as a DICOM series reads back with nibabel's array and affine, rescale applied."""
    volume, affine = anatomical()
    files = _series(tmp_path, 2 * volume - 100, affine, slope=2.0, intercept=-100.0)
    rng = np.random.default_rng(0)
    back, back_affine = load_dicom_series([files[i] for i in rng.permutation(len(files))])
    assert back.dtype == np.float32 and back.shape == volume.shape
    # Slices are sorted along the DICOM normal (row x column cosines), here opposite to the NIfTI's k:
    # reorient with nibabel into the NIfTI's axis order and the voxels and affine must match exactly.
    transform = nib.orientations.ornt_transform(nib.io_orientation(back_affine), nib.io_orientation(affine))
    aligned = nib.orientations.apply_orientation(back, transform)
    aligned_affine = back_affine @ nib.orientations.inv_ornt_aff(transform, back.shape)
    np.testing.assert_allclose(aligned_affine, affine, atol=1e-4)
    np.testing.assert_array_equal(aligned, 2 * volume - 100)
    assert back_affine[2, 2] < 0  # k runs along the normal, which points to patient inferior here


def test_series_matches_monai_pydicom_reader() -> None:
    """A real CT series: same voxels at the same world positions as MONAI's LoadImage(reader="PydicomReader")."""
    from monai.transforms import LoadImage

    folder = DICOMDIR_TESTS / "98892001" / "CT5N"
    ours, affine = load_dicom_series(sorted(folder.iterdir()))
    theirs = LoadImage(reader="PydicomReader", image_only=True)(str(folder))
    theirs_affine = np.asarray(theirs.affine, dtype=np.float64)
    theirs = np.asarray(theirs)
    # Map each of our voxels to world and back into MONAI's grid: the values must agree.
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in ours.shape], indexing="ij")).reshape(3, -1)
    world = affine @ np.vstack([ijk, np.ones(ijk.shape[1])])
    index = np.rint(np.linalg.inv(theirs_affine) @ world)[:3].astype(int)
    np.testing.assert_array_equal(ours.reshape(-1), theirs[tuple(index)])
    # And against nibabel's orientation logic: RAS codes of our affine follow the DICOM cosines.
    assert nib.aff2axcodes(affine) == ("L", "P", "S")


def test_multiframe_objects_in_four_transfer_syntaxes_read_alike(tmp_path: Path) -> None:
    """pydicom-data's enhanced MR, uncompressed, JPEG-LS, JPEG 2000 and RLE: the same volume and affine."""
    results = []
    for name in ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm", "emri_small_jpeg_2k_lossless.dcm", "emri_small_RLE.dcm"):
        path = tmp_path / name
        _with_geometry(pydicom.dcmread(get_testdata_file(name))).save_as(path)
        results.append(load_dicom_series([path]))
    raw = pydicom.dcmread(get_testdata_file("emri_small.dcm")).pixel_array
    for volume, affine in results:
        assert volume.shape == (64, 64, 10)
        np.testing.assert_array_equal(volume, results[0][0])
        np.testing.assert_allclose(affine, results[0][1])
    np.testing.assert_array_equal(results[0][0][:, :, 3], 2.0 * raw[3].T - 10.0)  # shared rescale applied
    np.testing.assert_allclose(np.diag(results[0][1]), [-0.9, -0.9, 1.2, 1.0])


def test_single_slice_gets_its_thickness() -> None:
    """A single slice is a one-slice volume as thick as its SliceThickness."""
    volume, affine = load_dicom_series([get_testdata_file("CT_small.dcm")])
    assert volume.shape == (128, 128, 1)
    assert affine[2, 2] == pytest.approx(5.0)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    np.testing.assert_array_equal(volume[:, :, 0], ds.pixel_array.T * float(ds.RescaleSlope) + float(ds.RescaleIntercept))


def _edit(files: list[Path], index: int, **values) -> None:
    ds = pydicom.dcmread(files[index])
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(files[index])


def _small(tmp_path: Path, n: int = 6) -> list[Path]:
    volume = np.arange(8 * 9 * n, dtype=np.float32).reshape(8, 9, n)
    return _series(tmp_path, volume, np.diag([1.0, 1.0, 2.0, 1.0]))


def test_duplicate_copy_is_dropped(tmp_path: Path) -> None:
    """An identical copy of a slice (same position, same pixels) is dropped."""
    files = _small(tmp_path)
    copy = tmp_path / "series" / "copy"
    copy.write_bytes(files[2].read_bytes())
    volume, _ = load_dicom_series([*files, copy])
    assert volume.shape[2] == 6


@pytest.mark.parametrize(
    "change,reason",
    [
        ("duplicate", "share one position"),
        ("missing", "1 slice(s) missing"),
        ("uneven", "inconsistent slice spacing"),
        ("tilt", "gantry tilt"),
        ("non_orthogonal", "non-orthogonal"),
        ("mixed_orientation", "different orientations"),
        ("mixed_size", "different sizes"),
        ("no_geometry", "no patient geometry"),
        ("no_pixels", "no pixel data"),
    ],
)
def test_geometry_problems_are_refused_with_a_reason(tmp_path: Path, change: str, reason: str) -> None:
    """Each documented problem raises DicomSeriesError (a MedsynthError) whose reason names it."""
    files = _small(tmp_path)
    if change == "duplicate":
        ds = pydicom.dcmread(files[2])
        ds.PixelData = (np.frombuffer(ds.PixelData, np.int16) + 1).astype(np.int16).tobytes()
        ds.save_as(tmp_path / "series" / "other")
        files.append(tmp_path / "series" / "other")
    elif change == "missing":
        files.pop(3)
    elif change == "uneven":
        _edit(files, 5, ImagePositionPatient=["-0", "-0", "10.7"])
    elif change == "tilt":
        for k in range(len(files)):
            _edit(files, k, ImagePositionPatient=["0", f"{-0.5 * k:.3f}", f"{2.0 * k:.3f}"])
    elif change == "non_orthogonal":
        for k in range(len(files)):
            _edit(files, k, ImageOrientationPatient=["-1", "0", "0", "0.2", "-0.98", "0"])
    elif change == "mixed_orientation":
        _edit(files, 1, ImageOrientationPatient=["0", "1", "0", "0", "0", "-1"])
    elif change == "mixed_size":
        ds = pydicom.dcmread(files[1])
        ds.Rows = 3
        ds.PixelData = ds.PixelData[: 3 * 8 * 2]
        ds.save_as(files[1])
    elif change == "no_geometry":
        ds = pydicom.dcmread(files[0])
        del ds.ImagePositionPatient
        ds.save_as(files[0])
    elif change == "no_pixels":
        ds = pydicom.dcmread(files[0])
        del ds.PixelData
        ds.save_as(files[0])
    with pytest.raises(DicomSeriesError) as info:
        load_dicom_series(files)
    assert reason in info.value.reason
    assert isinstance(info.value, MedsynthError)
    assert "QZX" not in info.value.reason and "1.2.826" not in info.value.reason


def test_not_dicom_and_empty_are_refused(tmp_path: Path) -> None:
    """A text file and an empty file list raise MedsynthError."""
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(MedsynthError, match="not a DICOM file"):
        load_dicom_series([tmp_path / "a.txt"])
    with pytest.raises(MedsynthError):
        load_dicom_series([])


def test_read_header_classifies() -> None:
    """Images, SEGs, SRs and DICOMDIRs are told apart without reading pixels; identifiers are collected."""
    ct = read_header(get_testdata_file("CT_small.dcm"))
    assert ct.kind == "image" and ct.has_pixels and ct.modality == "CT"
    assert ct.patient_id in ct.identifiers and ct.series_uid in ct.identifiers
    assert "1.2.840.10008.5.1.4.1.1.2" not in ct.identifiers  # the SOP class is not an identifier
    assert read_header(get_testdata_file("liver.dcm")).kind == "seg"
    assert read_header(get_testdata_file("test-SR.dcm")).kind == "other"
    assert read_header(DICOMDIR_TESTS / "DICOMDIR").kind == "dicomdir"
    assert read_header(DICOMDIR_TESTS / "README.txt").kind is None


def test_seg_reads_onto_its_series_grid(tmp_path: Path) -> None:
    """A highdicom SEG of the anatomical series reads back as the mask on the series' voxel grid."""
    volume, affine = anatomical()
    files = _series(tmp_path, volume, affine)
    mask = anatomical_mask(volume)
    seg = write_seg(files, mask, tmp_path / "seg.dcm", patient=1)
    series, series_affine = load_dicom_series(files)
    segments, names = load_dicom_seg(seg, affine=series_affine, shape=series.shape)
    assert names == {1: "brain"}
    np.testing.assert_array_equal(series, volume[:, :, ::-1])  # the series runs along its normal (see above)
    np.testing.assert_array_equal(segments, mask[:, :, ::-1])


# --- the corpus through discovery and build_dataset ------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    return build_corpus(tmp_path_factory.mktemp("corpus") / "export")


SETTINGS = VolumeSettings(spatial_dims=2, spacing=(0.5, 0.5, 2.0), size=(32, 32), min_foreground=0.01)


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path}|{stat.st_mtime_ns}|".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_seg_labels_the_series_it_references(corpus, tmp_path: Path) -> None:
    """data.labels=seg: the anatomical series gets its SEG as label map; series without a SEG are quarantined."""
    discovery = discover_dicom(corpus.root, salt=SALT, labels="seg")
    assert discovery.label_names == ["background", "brain"]
    assert len(discovery.cases) == 1 and discovery.cases[0].label is not None
    reasons = [q["reason"] for q in discovery.quarantine]
    assert any("no SEG object references this series" in r for r in reasons)
    assert any("SEG references a series that is not in the export" in r for r in reasons)
    settings = VolumeSettings(spatial_dims=3, spacing=(2.0, 2.0, 2.0), size=(40, 48, 32))
    manifest = build_dataset(discovery, out_dir=tmp_path / "data", settings=settings)
    (record,) = manifest.records
    with np.load(manifest.root / record.file) as npz:
        label = npz["label"][0]
    volume, _ = anatomical()
    assert label.sum() == pytest.approx(anatomical_mask(volume).sum(), rel=0.02)  # same grid spacing: nothing lost
    assert record.split == "train" and record.slice_index is None and record.shape == [40, 48, 32]


def test_labels_option_is_validated(corpus) -> None:
    with pytest.raises(ConfigError, match="data.labels"):
        discover_dicom(corpus.root, salt=SALT, labels="masks")


# --- NIfTI: nnU-Net layout and plain folders ------------------------------------------------


def _nnunet(root: Path, cases: int = 4) -> Path:
    volume, affine = anatomical()
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for c in range(cases):
        shifted = np.roll(volume, c, axis=0)
        save_nifti(root / "imagesTr" / f"BRAIN_{c:03d}_0000.nii.gz", shifted, affine)
        save_nifti(root / "imagesTr" / f"BRAIN_{c:03d}_0001.nii.gz", shifted.max() - shifted, affine)
        labels = anatomical_mask(shifted) + (shifted > np.percentile(shifted, 90))
        save_nifti(root / "labelsTr" / f"BRAIN_{c:03d}.nii.gz", labels, affine, dtype=np.uint8)
    (root / "imagesTr" / "BRAIN_099_0000.nii.gz").write_bytes((root / "imagesTr" / "BRAIN_000_0000.nii.gz").read_bytes())
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "inverted"}, "labels": {"background": 0, "brain": 1, "bright": 2},
        "numTraining": cases, "file_ending": ".nii.gz",
    }))
    return root


def test_nnunet_dataset_patient_splits(tmp_path: Path) -> None:
    """An nnU-Net v2 raw dataset: label names from dataset.json, a chosen channel, whole cases per split."""
    root = _nnunet(tmp_path / "Dataset001_Brain")
    assert [q["reason"] for q in discover_nnunet(root, salt=SALT).quarantine] == [
        "no label map labelsTr/<case>.nii.gz for this image"]
    discovery = discover_nnunet(root, salt=SALT, channel="inverted")
    assert discovery.label_names == ["background", "brain", "bright"]
    assert all(c.files[0].endswith("_0001.nii.gz") for c in discovery.cases)
    manifest = build_dataset(discovery, out_dir=tmp_path / "data", settings=SETTINGS)
    splits: dict[str, set[str]] = {}
    for r in manifest.records:
        splits.setdefault(r.case, set()).add(r.split)
        assert "BRAIN" not in json.dumps(r.source) and r.case.startswith("p")
    assert all(len(s) == 1 for s in splits.values())
    assert {s for (s,) in splits.values()} == {"train", "validation", "holdout"}
    with pytest.raises(ConfigError, match="data.channel"):
        discover_nnunet(root, salt=SALT, channel=5)


def test_nnunet_refuses_a_foreign_layout(tmp_path: Path) -> None:
    with pytest.raises(MedsynthError, match="dataset.json"):
        discover_nnunet(tmp_path, salt=SALT)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "whole": [1, 2]}}))
    with pytest.raises(MedsynthError, match="region-based"):
        discover_nnunet(tmp_path, salt=SALT)


def test_folder_of_4d_images_needs_a_channel(tmp_path: Path) -> None:
    """A plain folder: 4D images are refused without data.channel (quarantined), read with it; body masks label them."""
    volume, affine = anatomical()
    folder = tmp_path / "scans"
    for c in range(3):
        save_nifti(folder / f"scan{c}.nii.gz", np.stack([np.roll(volume, c, 0), volume * 0.5], axis=-1), affine)
    (folder / "notes.txt").write_text("x")
    with pytest.raises(MedsynthError, match="no case made it"):
        build_dataset(discover_folder(folder, salt=SALT), out_dir=tmp_path / "d0", settings=SETTINGS)
    quarantine = json.loads((tmp_path / "d0" / "quarantine.json").read_text())["items"]
    assert sum("choose one with data.channel" in q["reason"] for q in quarantine) == 3
    assert any("not a NIfTI file" in q["reason"] for q in quarantine)
    manifest = build_dataset(discover_folder(folder, salt=SALT, channel=1), out_dir=tmp_path / "d1", settings=SETTINGS)
    assert manifest.label_names == ["background", "body"] and manifest.counts()["train"] > 0


def test_rerun_reuses_unchanged_cases(tmp_path: Path, caplog) -> None:
    """A rerun reuses cached cases; touching one input reprocesses that case alone; records stay identical."""
    root = _nnunet(tmp_path / "Dataset001_Brain", cases=3)
    first = build_dataset(discover_nnunet(root, salt=SALT), out_dir=tmp_path / "data", settings=SETTINGS)
    caplog.set_level("INFO", logger="medsynth")
    second = build_dataset(discover_nnunet(root, salt=SALT), out_dir=tmp_path / "data", settings=SETTINGS)
    assert "0 preprocessed, 3 reused" in caplog.text
    assert second.records == first.records
    image = root / "imagesTr" / "BRAIN_001_0000.nii.gz"
    image.write_bytes(image.read_bytes())  # new mtime
    caplog.clear()
    build_dataset(discover_nnunet(root, salt=SALT), out_dir=tmp_path / "data", settings=SETTINGS)
    assert "1 preprocessed, 2 reused" in caplog.text


def test_workers_give_the_same_dataset(tmp_path: Path) -> None:
    """Two worker processes write the same records as in-process preprocessing."""
    root = _nnunet(tmp_path / "Dataset001_Brain", cases=3)
    serial = build_dataset(discover_nnunet(root, salt=SALT), out_dir=tmp_path / "a", settings=SETTINGS)
    parallel = build_dataset(discover_nnunet(root, salt=SALT), out_dir=tmp_path / "b", settings=SETTINGS, workers=2)
    assert [(r.id, r.sha256, r.split) for r in serial.records] == [(r.id, r.sha256, r.split) for r in parallel.records]


def test_attributes_csv(tmp_path: Path) -> None:
    """Attributes come from a CSV keyed by a named column; a column holding identifiers is refused."""
    root = _nnunet(tmp_path / "Dataset001_Brain", cases=3)
    csv = tmp_path / "attributes.csv"
    csv.write_text("case,class,sex\nBRAIN_000,healthy,F\nBRAIN_001,lesion,M\n")
    table = read_attributes(csv, key="case")
    assert table["BRAIN_001"] == {"class": "lesion", "sex": "M"}
    manifest = build_dataset(discover_nnunet(root, salt=SALT, attributes=table), out_dir=tmp_path / "data", settings=SETTINGS)
    assert manifest.attribute_values() == {"class": ["healthy", "lesion"], "sex": ["F", "M"]}
    with pytest.raises(ConfigError, match="data.attributes.key"):
        read_attributes(csv, key="PatientID")
    with pytest.raises(ConfigError, match="columns"):
        read_attributes(csv, key="case", columns=["age"])


def test_dicom_attributes_refuse_identifying_columns(corpus, tmp_path: Path) -> None:
    csv = tmp_path / "attributes.csv"
    csv.write_text("mrn,class,name\nQZXPID0001,lesion,QZXFAMILY1\n")
    with pytest.raises(ConfigError, match="'name'"):
        discover_dicom(corpus.root, salt=SALT, attributes=read_attributes(csv, key="mrn"))
    found = discover_dicom(corpus.root, salt=SALT, attributes=read_attributes(csv, key="mrn", columns=["class"]))
    assert sum(c.attributes == {"class": "lesion"} for c in found.cases) == 1


def test_read_manifest_of_a_dicom_dataset(corpus, tmp_path: Path) -> None:
    """The dataset of a DICOM export reads back with read_manifest."""
    manifest = build_dataset(discover_dicom(corpus.root, salt=SALT, labels="body"), out_dir=tmp_path / "data", settings=SETTINGS)
    assert read_manifest(tmp_path / "data").records == manifest.records


# --- through the preprocess stage -----------------------------------------------------------


def test_stage_3d_volume_of_one_nifti_pair(tiny_config, phantom) -> None:
    """data=nifti with spatial_dims=3: one volume record of data.size; the single case goes to train."""
    from tests.conftest import phantom_overrides, run_stage

    settings = tiny_config(*phantom_overrides(*phantom), "data.spatial_dims=3", "data.size=[16,16,16]",
                           "model.network.spatial_dims=3")
    manifest = run_stage("preprocess", settings)
    (record,) = manifest.records
    assert manifest.spatial_dims == 3 and record.split == "train" and record.slice_index is None
    assert record.shape == [16, 16, 16]
    with np.load(manifest.root / record.file) as npz:
        assert npz["image"].shape == (1, 16, 16, 16) and npz["label"].max() == 2
    assert json.loads((manifest.root / "quarantine.json").read_text())["count"] == 0


def test_stage_nnunet_and_bad_sizes(tiny_config, tmp_path: Path) -> None:
    """data=nnunet paths.input=DIR writes manifest.json and quarantine.json; a 2-value size in 3D is a ConfigError."""
    from tests.conftest import run_stage

    root = _nnunet(tmp_path / "Dataset002_Brain", cases=3)
    manifest = run_stage("preprocess", tiny_config("data=nnunet", f"paths.input={root}", "data.spacing=[1.0,1.0,2.0]"))
    assert manifest.label_names == ["background", "brain", "bright"]
    assert (manifest.root / "quarantine.json").is_file()
    assert {r.source["format"] for r in manifest.records} == {"nnunet"}
    with pytest.raises(ConfigError, match="data.size"):
        run_stage("preprocess", tiny_config("data=nnunet", f"paths.input={root}", "data.spatial_dims=3"))
    with pytest.raises(ConfigError, match="paths.input"):
        run_stage("preprocess", tiny_config("data=dicom"))


def test_stage_2d_slices_of_one_nifti_pair(tiny_config, phantom) -> None:
    """data=nifti in 2D takes the same builder: block splits with gaps, `level` bands, one quarantine writer."""
    from tests.conftest import phantom_overrides, run_stage

    settings = tiny_config(*phantom_overrides(*phantom))
    manifest = run_stage("preprocess", settings)
    assert set(manifest.counts()) == {"train", "validation", "holdout"}
    assert all(r.slice_index is not None and r.shape == [16, 16] for r in manifest.records)
    assert {r.attributes["level"] for r in manifest.records} == {"1", "2", "3"}
    assert manifest.settings["source"] == "nifti" and manifest.label_names == ["background", "outer", "inner"]
    assert json.loads((manifest.root / "quarantine.json").read_text()) == {"count": 0, "items": []}
    # records/ holds exactly the listed records (gap slices are not left behind), on every run
    for _ in range(2):
        files = sorted(p.name for p in (manifest.root / "records").iterdir())
        assert files == sorted(Path(r.file).name for r in manifest.records)
        assert run_stage("preprocess", settings).records == manifest.records
