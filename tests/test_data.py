"""Tests for medsynth.data: splits, cached records, the manifest, batches and slice preprocessing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medsynth import ConfigError, MedsynthError
from medsynth.data import (
    SPLITS,
    LabelledArrays,
    Manifest,
    Record,
    block_splits,
    infinite_batches,
    load_split,
    read_manifest,
    write_record,
)
from medsynth.data.manifest import read_record
from medsynth.data.build import build_dataset
from medsynth.data.case import VolumeSettings, load_pair
from medsynth.data.discovery import nifti_pair_case
from medsynth.io import load_nifti, save_nifti
from medsynth.transforms import volume_preprocessing

FRACTIONS = {"train": 0.7, "validation": 0.1, "holdout": 0.2}


# --- block_splits -----------------------------------------------------------------------


@pytest.mark.parametrize("n,block,gap", [(100, 4, 1), (60, 3, 2), (37, 2, 1), (200, 8, 2)])
def test_block_splits_structure(n: int, block: int, gap: int) -> None:
    """Every split appears, gaps are None, blocks are contiguous and no train slice touches another split."""
    out = block_splits(n, block=block, gap=gap, fractions=FRACTIONS)
    assert len(out) == n
    assert set(out) - {None} == set(SPLITS)
    for start in range(0, n, block + gap):
        blk = out[start : start + block]
        assert len(set(blk)) == 1 and blk[0] is not None
        assert all(v is None for v in out[start + block : start + block + gap])
    for i, name in enumerate(out):
        if name != "train":
            continue
        for j in (i - 1, i + 1):
            if 0 <= j < n:
                assert out[j] in ("train", None), f"train slice {i} next to {out[j]} slice {j}"


def test_block_splits_fractions_roughly_respected() -> None:
    """With many blocks the share of blocks per split is close to the target."""
    n, block, gap = 1000, 4, 1
    out = block_splits(n, block=block, gap=gap, fractions=FRACTIONS)
    starts = range(0, n, block + gap)
    shares = {s: sum(out[i] == s for i in starts) / len(starts) for s in SPLITS}
    for name, target in FRACTIONS.items():
        assert abs(shares[name] - target) < 0.03, shares


def test_block_splits_spread_over_the_scan() -> None:
    """Every split samples both halves of the scan, not one contiguous end."""
    out = block_splits(200, block=4, gap=1, fractions=FRACTIONS)
    for name in SPLITS:
        assert name in out[:100] and name in out[100:], name


def test_block_splits_two_splits_and_zero_gap() -> None:
    """A zero-share split is left out; gap 0 leaves no None."""
    out = block_splits(20, block=2, gap=0, fractions={"train": 0.5, "validation": 0.0, "holdout": 0.5})
    assert None not in out
    assert set(out) == {"train", "holdout"}


def test_block_splits_minimum_blocks() -> None:
    """Exactly one block per split is enough; every split still gets one."""
    out = block_splits(3 * 2 + 2 * 1, block=2, gap=1, fractions=FRACTIONS)
    assert set(out) - {None} == set(SPLITS)


@pytest.mark.parametrize(
    "n,block,gap,fractions",
    [
        (5, 4, 1, FRACTIONS),  # one block only
        (0, 1, 0, FRACTIONS),  # nothing at all
        (100, 4, 1, {"train": 0.7, "validation": 0.1, "holdout": 0.1}),  # sums to 0.9
        (100, 4, 1, {"train": 1.2, "validation": -0.1, "holdout": -0.1}),  # negative shares
        (100, 0, 1, FRACTIONS),  # block < 1
        (100, 4, -1, FRACTIONS),  # gap < 0
    ],
)
def test_block_splits_errors(n: int, block: int, gap: int, fractions: dict[str, float]) -> None:
    """Bad sizes and fractions raise ValueError."""
    with pytest.raises(ValueError):
        block_splits(n, block=block, gap=gap, fractions=fractions)


# --- records and manifest ---------------------------------------------------------------


def _record(data_dir: Path, record_id: str, image: np.ndarray, label: np.ndarray, split: str = "train") -> Record:
    file, digest = write_record(data_dir, record_id, image, label)
    return Record(
        id=record_id, case="c1", split=split, file=file, shape=list(image.shape[1:]),
        spacing=[1.0, 1.0, 2.0], affine=np.eye(4).tolist(), sha256=digest, slice_index=3,
        source={"image": "img.nii.gz", "label": "lab.nii.gz"},
    )


def test_write_read_record_round_trip(tmp_path: Path) -> None:
    """write_record stores float32 image and uint8 label that read_record returns unchanged."""
    rng = np.random.default_rng(0)
    image = rng.random((1, 6, 5))
    label = rng.integers(0, 3, (1, 6, 5))
    record = _record(tmp_path, "r0", image, label)
    assert record.file == "records/r0.npz"
    assert (tmp_path / record.file).is_file()
    assert len(record.sha256) == 64
    back_image, back_label = read_record(tmp_path, record)
    assert back_image.dtype == np.float32 and back_label.dtype == np.uint8
    np.testing.assert_array_equal(back_image, image.astype(np.float32))
    np.testing.assert_array_equal(back_label, label.astype(np.uint8))
    assert [p.name for p in (tmp_path / "records").iterdir()] == ["r0.npz"]


def test_record_hash_mismatch(tmp_path: Path) -> None:
    """Altering a cached npz makes read_record raise MedsynthError naming the file."""
    image = np.zeros((1, 4, 4), np.float32)
    label = np.zeros((1, 4, 4), np.uint8)
    record = _record(tmp_path, "r0", image, label)
    path = tmp_path / record.file
    altered = image.copy()
    altered[0, 1, 1] = 0.5
    with open(path, "wb") as fh:
        np.savez(fh, image=altered, label=label)
    with pytest.raises(MedsynthError) as info:
        read_record(tmp_path, record)
    assert str(path) in str(info.value)


def test_record_hash_depends_on_label(tmp_path: Path) -> None:
    """Changing only the label also changes the hash."""
    image = np.zeros((1, 4, 4), np.float32)
    a = _record(tmp_path, "a", image, np.zeros((1, 4, 4), np.uint8))
    b = _record(tmp_path, "b", image, np.ones((1, 4, 4), np.uint8))
    assert a.sha256 != b.sha256


def test_record_missing_file(tmp_path: Path) -> None:
    """A deleted cache file raises MedsynthError."""
    record = _record(tmp_path, "r0", np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))
    (tmp_path / record.file).unlink()
    with pytest.raises(MedsynthError, match="r0.npz"):
        read_record(tmp_path, record)


def test_manifest_round_trip(tmp_path: Path) -> None:
    """Manifest.write then read_manifest returns equal records, names, dims and settings."""
    rng = np.random.default_rng(0)
    records = [
        _record(tmp_path, f"r{i}", rng.random((1, 4, 4)), rng.integers(0, 2, (1, 4, 4)), split=s)
        for i, s in enumerate(["train", "train", "validation", "holdout"])
    ]
    settings = {"spacing": [1.0, 1.0, 2.0], "splits": {"block": 2, "gap": 1}}
    manifest = Manifest(root=tmp_path, spatial_dims=2, label_names=["bg", "fg"], records=records, settings=settings)
    path = manifest.write()
    assert path == tmp_path / "manifest.json"

    back = read_manifest(tmp_path)
    assert back.root == tmp_path
    assert back.spatial_dims == 2
    assert back.label_names == ["bg", "fg"]
    assert back.num_classes == 2
    assert back.settings == settings
    assert back.records == records
    assert back.counts() == {"train": 2, "validation": 1, "holdout": 1}
    assert [r.id for r in back.split("train")] == ["r0", "r1"]


def test_read_manifest_missing(tmp_path: Path) -> None:
    """A folder without a manifest raises MedsynthError telling the user to run preprocess."""
    with pytest.raises(MedsynthError, match="preprocess"):
        read_manifest(tmp_path / "does_not_exist")


def test_read_manifest_malformed(tmp_path: Path) -> None:
    """A manifest without records raises MedsynthError naming the file."""
    (tmp_path / "manifest.json").write_text('{"spatial_dims": 2}')
    with pytest.raises(MedsynthError, match="manifest.json"):
        read_manifest(tmp_path)


def test_load_split(tmp_path: Path) -> None:
    """load_split stacks a split's records in order and rejects an empty split."""
    records = [
        _record(tmp_path, f"r{i}", np.full((1, 3, 3), i / 10), np.full((1, 3, 3), i % 2), split=s)
        for i, s in enumerate(["train", "holdout", "train"])
    ]
    manifest = Manifest(root=tmp_path, spatial_dims=2, label_names=["bg", "fg"], records=records)
    data = load_split(manifest, "train")
    assert data.ids == ["r0", "r2"]
    assert data.images.shape == (2, 1, 3, 3) and data.labels.dtype == torch.int64
    assert torch.allclose(data.images[:, 0, 0, 0], torch.tensor([0.0, 0.2]))
    with pytest.raises(MedsynthError, match="validation"):
        load_split(manifest, "validation")


# --- infinite_batches ---------------------------------------------------------------------


def _arrays(n: int = 6, size: int = 5) -> LabelledArrays:
    images = torch.arange(n * size * size, dtype=torch.float32).reshape(n, 1, size, size)
    labels = (images.long() % 3)
    return LabelledArrays(images, labels, [f"r{i}" for i in range(n)], [np.eye(4)] * n)


def _take(it, k: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [next(it) for _ in range(k)]


def test_infinite_batches_shapes_and_cap() -> None:
    """Batches have the requested size; the size is capped at the split size; epochs cover all examples."""
    data = _arrays(n=6)
    batches = _take(infinite_batches(data, batch_size=3, seed=0), 4)
    for images, labels, codes in batches:
        assert images.shape == (3, 1, 5, 5) and labels.shape == (3, 1, 5, 5) and codes.shape == (3, 0)
    first_epoch = torch.cat([b[0] for b in batches[:2]])
    assert sorted(first_epoch[:, 0, 0, 0].tolist()) == sorted(data.images[:, 0, 0, 0].tolist())
    images, _, _ = next(infinite_batches(data, batch_size=100, seed=0))
    assert images.shape[0] == 6


def test_infinite_batches_reproducible() -> None:
    """The same seed gives the same batches; another seed gives a different order."""
    data = _arrays(n=8)

    def run(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return _take(infinite_batches(data, batch_size=3, seed=seed, flip_dims=(0, 1)), 5)

    a, b, c = run(7), run(7), run(8)
    for (ia, la, _), (ib, lb, _) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(la, lb)
    assert not all(torch.equal(ia, ic) for (ia, _, _), (ic, _, _) in zip(a, c))


def test_infinite_batches_resume_where_they_stopped() -> None:
    """Starting at step k yields exactly the batches an uninterrupted stream yields from step k."""
    data = _arrays(n=7)
    straight = _take(infinite_batches(data, batch_size=3, seed=5, flip_dims=(0,)), 9)
    resumed = _take(infinite_batches(data, batch_size=3, seed=5, flip_dims=(0,), start_step=4), 5)
    for (a, la, _), (b, lb, _) in zip(straight[4:], resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_infinite_batches_flips_image_and_label_together() -> None:
    """Flips act on image and label alike, and some examples are flipped."""
    n, size = 16, 5
    images = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n * size * size).reshape(n, 1, size, size)
    data = LabelledArrays(images, labels, [str(i) for i in range(n)], [np.eye(4)] * n)
    lookup = {int(labels[i, 0, 0, 0]): i for i in range(n)}  # identity of each example
    variants = {
        "none": lambda t: t,
        "x": lambda t: t.flip(-2),
        "y": lambda t: t.flip(-1),
        "xy": lambda t: t.flip(-2).flip(-1),
    }
    seen = set()
    for bimg, blab, _ in _take(infinite_batches(data, batch_size=4, seed=3, flip_dims=(0, 1)), 8):
        for img, lab in zip(bimg, blab):
            # The original example is found from any corner value of its (flipped) label map.
            corners = {int(lab[0, a, b]) for a in (0, -1) for b in (0, -1)}
            idx = next(lookup[c] for c in corners if c in lookup)
            match = [k for k, f in variants.items() if torch.equal(lab, f(labels[idx]))]
            assert len(match) == 1
            assert torch.equal(img, variants[match[0]](images[idx])), "image flipped differently from label"
            seen.add(match[0])
    assert "none" in seen and len(seen) >= 3


def test_infinite_batches_no_flip_without_flip_dims() -> None:
    """Without flip_dims every batch row is an unchanged example."""
    data = _arrays(n=4)
    originals = {tuple(x.flatten().tolist()) for x in data.images}
    for images, labels, _ in _take(infinite_batches(data, batch_size=2, seed=1), 4):
        for img, lab in zip(images, labels):
            assert tuple(img.flatten().tolist()) in originals
            assert torch.equal(lab, img.long() % 3)


# --- one NIfTI pair as a 2D slice dataset ---------------------------------------------------


SHAPE = (40, 40, 60)


def slice_dataset(
    image_path: Path, label_path: Path, *, out_dir: Path, label_names: list[str], case_id: str, spacing: list[float],
    size: list[int], block: int, gap: int, slice_axis: int = 2,
) -> Manifest:
    """One image/label pair through the dataset builder every source uses, cut into 2D slices."""
    settings = VolumeSettings(spatial_dims=2, spacing=tuple(spacing), size=tuple(size), slice_axis=slice_axis)
    return build_dataset(nifti_pair_case(image_path, label_path, case_id=case_id, label_names=label_names),
                         out_dir=out_dir, settings=settings, block=block, gap=gap)


def _sphere_volume(folder: Path, affine: np.ndarray) -> tuple[Path, Path]:
    """A 3-class sphere label map (0 outside, 1 shell, 2 core) and a noisy image on ``affine``."""
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij"))
    r = np.sqrt((grid**2).sum(0))
    label = np.zeros(SHAPE, np.uint8)
    label[r < 18] = 1
    label[r < 10] = 2
    rng = np.random.default_rng(0)
    image = (100.0 * label + 5.0 * rng.standard_normal(SHAPE)).astype(np.float32)
    return (
        save_nifti(folder / "img.nii.gz", image, affine),
        save_nifti(folder / "lab.nii.gz", label, affine, dtype=np.uint8),
    )


def _lps_affine() -> np.ndarray:
    affine = np.diag([-1.5, -1.5, 2.0, 1.0])
    affine[:3, 3] = [30.0, 25.0, -60.0]
    return affine


@pytest.fixture(scope="module")
def sphere_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, Path, Path, dict]:
    """One preprocessed sphere volume shared by the slice_dataset tests (built once)."""
    folder = tmp_path_factory.mktemp("sphere")
    image_path, label_path = _sphere_volume(folder, _lps_affine())
    kwargs = dict(
        label_names=["background", "shell", "core"], case_id="c1", spacing=[3.0, 3.0, 3.0],
        size=[16, 16], block=3, gap=1,
    )
    manifest = slice_dataset(image_path, label_path, out_dir=folder / "data", **kwargs)
    return manifest, image_path, label_path, kwargs


def test_slice_dataset_manifest(sphere_dataset) -> None:
    """The manifest on disk matches the returned one; every split has records; counts add up."""
    manifest, image_path, label_path, _ = sphere_dataset
    on_disk = read_manifest(manifest.root)
    assert on_disk.records == manifest.records
    counts = on_disk.counts()
    assert set(counts) == set(SPLITS)
    assert sum(counts.values()) == len(on_disk.records) > 0
    assert counts["train"] > counts["validation"] and counts["train"] > counts["holdout"]
    assert on_disk.spatial_dims == 2 and on_disk.label_names == ["background", "shell", "core"]
    files = sorted(p.name for p in (manifest.root / "records").iterdir())
    assert files == sorted(f"{r.id}.npz" for r in on_disk.records)
    assert all(r.case == "c1" and r.source == {"image": str(image_path), "label": str(label_path)} for r in on_disk.records)
    # Records of different splits never sit on adjacent slices.
    split_of = {r.slice_index: r.split for r in on_disk.records}
    for k, split in split_of.items():
        if (k + 1) in split_of:
            assert split_of[k + 1] == split


def test_slice_dataset_records(sphere_dataset) -> None:
    """Each record has the requested in-plane size, [0, 1] intensities, known labels and a valid hash."""
    manifest, *_ = sphere_dataset
    for record in manifest.records:
        assert record.shape == [16, 16]
        np.testing.assert_allclose(record.spacing, [3.0, 3.0, 3.0], atol=1e-4)
        image, label = read_record(manifest.root, record)
        assert image.shape == (1, 16, 16) and label.shape == (1, 16, 16)
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert set(np.unique(label)) <= {0, 1, 2}
        assert (label > 0).mean() >= 0.05


def test_slice_dataset_slice_affines(sphere_dataset) -> None:
    """Slice k's affine is the preprocessed volume's affine with the origin moved k steps along the slice axis."""
    manifest, image_path, label_path, kwargs = sphere_dataset
    image, label, affine = load_pair(image_path, label_path)
    chain = volume_preprocessing(spacing=kwargs["spacing"], spatial_size=[16, 16, -1])
    out = chain({
        "image": MetaTensor(torch.from_numpy(image[None].astype(np.float32)), affine=torch.from_numpy(affine)),
        "label": MetaTensor(torch.from_numpy(label[None].astype(np.float32)), affine=torch.from_numpy(affine)),
    })
    vol_affine = np.asarray(out["image"].affine, dtype=np.float64)
    assert np.all(np.diag(vol_affine)[:3] > 0)  # RAS after preprocessing
    for record in manifest.records:
        k = record.slice_index
        rec_affine = np.asarray(record.affine)
        np.testing.assert_allclose(rec_affine[:3, :3], vol_affine[:3, :3], atol=1e-6)
        np.testing.assert_allclose(rec_affine[:3, 3], vol_affine[:3, 3] + k * vol_affine[:3, 2], atol=1e-4)
        _, rec_label = read_record(manifest.root, record)
        np.testing.assert_array_equal(rec_label[0], np.rint(out["label"][0, :, :, k].numpy()))


@pytest.mark.parametrize("slice_axis", [2, 0, 1])
def test_slice_dataset_world_geometry(sphere_dataset, tmp_path: Path, slice_axis: int) -> None:
    """Each record's affine maps its pixels back onto the same labels in the source volume, for every slice axis."""
    _, image_path, label_path, kwargs = sphere_dataset
    manifest = slice_dataset(image_path, label_path, out_dir=tmp_path / "d", **{**kwargs, "slice_axis": slice_axis})
    source, source_affine = load_nifti(label_path)
    inverse = np.linalg.inv(source_affine)
    ii, jj = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    pixels = np.stack([ii.ravel(), jj.ravel(), np.zeros(256), np.ones(256)])
    for record in manifest.records[::3]:
        _, label = read_record(manifest.root, record)
        voxels = np.rint(inverse @ np.asarray(record.affine) @ pixels)[:3].astype(int)
        inside = np.all((voxels >= 0) & (voxels < np.array(SHAPE)[:, None]), axis=0)
        expected = np.zeros(256)
        expected[inside] = source[tuple(voxels[:, inside])]
        assert (expected == label[0].ravel()).mean() > 0.95, record.id


def test_slice_dataset_rerun_removes_stale_records(sphere_dataset, tmp_path: Path) -> None:
    """A second run into the same folder replaces records that are no longer listed."""
    _, image_path, label_path, kwargs = sphere_dataset
    out_dir = tmp_path / "data"
    stale = out_dir / "records" / "old_s999.npz"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    manifest = slice_dataset(image_path, label_path, out_dir=out_dir, **{**kwargs, "size": [12, 12]})
    assert not stale.exists()
    assert all(r.shape == [12, 12] for r in manifest.records)


def test_slice_dataset_rejects_unknown_label(sphere_dataset, tmp_path: Path) -> None:
    """A label value without a name raises MedsynthError naming the label map; no record or manifest is written,
    and the quarantine says why."""
    _, image_path, label_path, kwargs = sphere_dataset
    with pytest.raises(MedsynthError, match="label_names") as info:
        slice_dataset(image_path, label_path, out_dir=tmp_path / "d", **{**kwargs, "label_names": ["bg", "a"]})
    assert str(label_path) in str(info.value)
    assert not (tmp_path / "d" / "manifest.json").exists() and not (tmp_path / "d" / "records").exists()
    (item,) = json.loads((tmp_path / "d" / "quarantine.json").read_text())["items"]
    assert item["file"] == str(label_path) and "label_names" in item["reason"]


def test_slice_dataset_bad_options(sphere_dataset, tmp_path: Path) -> None:
    """A bad slice axis or size raises ConfigError."""
    _, image_path, label_path, kwargs = sphere_dataset
    with pytest.raises(ConfigError, match="slice_axis"):
        slice_dataset(image_path, label_path, out_dir=tmp_path / "d", **{**kwargs, "slice_axis": 3})
    with pytest.raises(ConfigError, match="size"):
        slice_dataset(image_path, label_path, out_dir=tmp_path / "d", **{**kwargs, "size": [16]})


def test_load_pair_shape_mismatch(tmp_path: Path) -> None:
    """A label map of another shape raises MedsynthError naming the label file."""
    affine = np.eye(4)
    image = save_nifti(tmp_path / "img.nii.gz", np.zeros((4, 5, 6), np.float32), affine)
    label = save_nifti(tmp_path / "lab.nii.gz", np.zeros((4, 5, 7), np.uint8), affine)
    with pytest.raises(MedsynthError) as info:
        load_pair(image, label)
    assert str(label) in str(info.value)


def test_load_pair_affine_mismatch(tmp_path: Path) -> None:
    """A label map on another grid raises MedsynthError naming the label file."""
    shifted = np.eye(4)
    shifted[:3, 3] = [0.0, 0.0, 1.0]
    image = save_nifti(tmp_path / "img.nii.gz", np.zeros((4, 5, 6), np.float32), np.eye(4))
    label = save_nifti(tmp_path / "lab.nii.gz", np.zeros((4, 5, 6), np.uint8), shifted)
    with pytest.raises(MedsynthError) as info:
        load_pair(image, label)
    assert str(label) in str(info.value)


def test_load_pair_ok_and_non_integer_labels(tmp_path: Path) -> None:
    """Matching files load as (image, int64 label, affine); fractional labels are rejected."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = save_nifti(tmp_path / "img.nii.gz", np.ones((3, 3, 3), np.float32), affine)
    label = save_nifti(tmp_path / "lab.nii.gz", np.full((3, 3, 3), 2, np.uint8), affine)
    img, lab, aff = load_pair(image, label)
    assert lab.dtype == np.int64 and np.all(lab == 2)
    np.testing.assert_allclose(aff, affine)
    bad = save_nifti(tmp_path / "frac.nii.gz", np.full((3, 3, 3), 0.5, np.float32), affine)
    with pytest.raises(MedsynthError, match="frac.nii.gz"):
        load_pair(image, bad)


def test_record_is_frozen() -> None:
    """Records are immutable."""
    record = Record(id="a", case="c", split="train", file="records/a.npz", shape=[1], spacing=[1.0],
                    affine=np.eye(4).tolist(), sha256="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.split = "holdout"  # type: ignore[misc]


# --- the demo cohort ------------------------------------------------------------------------------


def test_demo_cohort_subjects_differ_and_are_reproducible(tmp_path: Path) -> None:
    """Each virtual subject is MNI152 under its own deformation: same label values, other voxels;
    the same seed writes the same cohort, and an existing one is reused untouched."""
    from medsynth.data.demo import write_mni152_cohort

    root = write_mni152_cohort(tmp_path / "a", subjects=3, voxel_mm=6.0)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "other_brain": 1, "grey_matter": 2, "white_matter": 3}
    images = [load_nifti(root / "imagesTr" / f"sub{i:03d}_0000.nii.gz")[0] for i in range(3)]
    labels = [load_nifti(root / "labelsTr" / f"sub{i:03d}.nii.gz")[0] for i in range(3)]
    assert all(set(np.unique(lab)) == {0, 1, 2, 3} for lab in labels)
    assert all(0.0 <= im.min() and im.max() <= 1.0 for im in images)
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        corr = np.corrcoef(images[i].ravel(), images[j].ravel())[0, 1]
        assert 0.5 < corr < 0.99, f"subjects {i} and {j} correlate at {corr:.3f}"
        assert (labels[i] != labels[j]).mean() > 0.02
    again = write_mni152_cohort(tmp_path / "b", subjects=3, voxel_mm=6.0)
    np.testing.assert_array_equal(load_nifti(again / "imagesTr" / "sub001_0000.nii.gz")[0], images[1])
    stamp = (root / "imagesTr" / "sub000_0000.nii.gz").stat().st_mtime_ns
    assert write_mni152_cohort(tmp_path / "a", subjects=3, voxel_mm=6.0) == root
    assert (root / "imagesTr" / "sub000_0000.nii.gz").stat().st_mtime_ns == stamp


def test_demo_preprocess_splits_whole_subjects(tiny_config) -> None:
    """data=demo_cohort preprocesses its cohort like an nnU-Net dataset: every subject in exactly one split."""
    from medsynth.data import read_manifest
    from tests.conftest import run_stage

    cfg = tiny_config("data=demo_cohort", "data.subjects=5", "data.spacing=[8.0,8.0,8.0]")
    run_stage("preprocess", cfg)
    manifest = read_manifest(cfg.paths.data)
    splits_of = {}
    for record in manifest.records:
        splits_of.setdefault(record.case, set()).add(record.split)
    assert len(splits_of) == 5 and all(len(s) == 1 for s in splits_of.values())
    assert {s for found in splits_of.values() for s in found} == {"train", "validation", "holdout"}
