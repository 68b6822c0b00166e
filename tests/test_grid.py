"""The separable preprocessing path gives what the MONAI chain gives, on any geometry it accepts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage
from scipy.spatial.transform import Rotation

from medsynth.data.case import _fill_holes, body_mask, kept_slices, preprocess_volume
from medsynth.transforms import intensity_scaling, volume_preprocessing
from medsynth.transforms.grid import centre_window, preprocess_separable, spacing_grid

WINDOW = (-50.0, 80.0)


def _chain(image, label, affine, *, spacing, size, margin, intensity):
    """The reference: MONAI's chain, as preprocessing ran it before the separable path."""
    chain = volume_preprocessing(spacing=spacing, spatial_size=size, margin=margin, intensity=intensity, window=WINDOW)
    out = chain({
        "image": MetaTensor(torch.from_numpy(np.array(image, dtype=np.float32)[None]), affine=torch.from_numpy(affine)),
        "label": MetaTensor(torch.from_numpy(np.array(label, dtype=np.float32)[None]), affine=torch.from_numpy(affine)),
    })
    return out["image"].numpy(), np.rint(out["label"].numpy()).astype(np.uint8), np.asarray(out["image"].affine)


def _fast(image, label, affine, *, spacing, size, margin, intensity):
    return preprocess_separable(image, label, affine, spacing=spacing, size=size, margin=margin,
                                scaling=intensity_scaling(intensity, window=WINDOW), pointwise=intensity == "window")


def _case(seed: int):
    """A random image, a blocky label map with speckle, an affine (axis-permuted and flipped, or oblique),
    a target spacing, a pad/crop size, a margin and an intensity mode."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(5, 28, 3))
    image = (rng.normal(size=shape) * 100).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    centre = [int(rng.integers(0, n)) for n in shape]
    radius = [int(rng.integers(1, max(2, n // 2))) for n in shape]
    label[tuple(slice(max(c - r, 0), c + r) for c, r in zip(centre, radius))] = rng.integers(1, 4)
    label[rng.random(shape) < 0.01] = 2
    affine = np.eye(4)
    if seed % 3 == 0:
        rotation = Rotation.random(random_state=seed).as_matrix()
    else:
        rotation = np.eye(3)[:, rng.permutation(3)] * rng.choice([-1.0, 1.0], 3)
    affine[:3, :3] = rotation @ np.diag(rng.uniform(0.4, 2.5, 3))
    affine[:3, 3] = rng.normal(size=3) * 20
    kept_spacing = float(np.linalg.norm(affine[:3, 0]))  # an axis whose spacing is already the target
    spacing = tuple(float(s) for s in rng.choice([0.5, 0.7, 1.0, 1.3, 2.0, kept_spacing], 3))
    size = [int(s) for s in rng.choice([-1, 4, 9, 16, 31], 3)]
    return image, label, affine, dict(spacing=spacing, size=size, margin=int(rng.integers(0, 4)),
                                      intensity="window" if seed % 2 else "percentile")


def _assert_same(fast, reference) -> None:
    volume, labels, affine = fast
    ref_volume, ref_labels, ref_affine = reference
    assert volume.shape == ref_volume.shape and labels.shape == ref_labels.shape
    assert volume.dtype == np.float32 and labels.dtype == np.uint8
    np.testing.assert_allclose(affine, ref_affine, atol=1e-5)
    np.testing.assert_allclose(volume, ref_volume, atol=1e-4)
    np.testing.assert_array_equal(labels, ref_labels)


@pytest.mark.parametrize("seed", range(40))
def test_separable_path_equals_the_monai_chain(seed: int) -> None:
    image, label, affine, settings = _case(seed)
    fast = _fast(image, label, affine, **settings)
    assert fast is not None
    _assert_same(fast, _chain(image, label, affine, **settings))


def test_the_dicom_memory_layout_and_flipped_views_change_nothing() -> None:
    """A DICOM series is loaded slice-major (the last axis is the slowest in memory), and RAS reorientation
    of an LPS affine flips axes into negative strides: the result is that of a C-ordered copy."""
    image, label, affine, settings = _case(4)
    slice_major = np.moveaxis(np.ascontiguousarray(np.moveaxis(image, -1, 0)), 0, -1)
    assert not slice_major.flags.c_contiguous
    flipped_image, flipped_label = slice_major[::-1, ::-1], label[::-1, ::-1]
    reverse = np.diag([-1.0, -1.0, 1.0, 1.0])
    reverse[:2, 3] = [image.shape[0] - 1, image.shape[1] - 1]
    moved = affine @ reverse  # the same voxels at the same world positions, indexed from the other ends
    _assert_same(_fast(flipped_image, flipped_label, moved, **settings), _fast(image, label, affine, **settings))
    _assert_same(_fast(flipped_image, flipped_label, moved, **settings), _chain(image, label, affine, **settings))


@pytest.mark.parametrize("voxel", [2.0, 1.0])
def test_nearest_neighbour_ties_fall_as_in_the_chain(voxel: float) -> None:
    """2 mm voxels to 3 mm (the demo cohort's axial axis) put every other output voxel halfway between two
    input voxels; a label map that changes at every voxel shows on which side each tie falls."""
    rng = np.random.default_rng(11)
    shape = (23, 18, 31)
    image = rng.normal(size=shape).astype(np.float32)
    label = rng.integers(1, 4, size=shape).astype(np.uint8)
    affine = np.diag([voxel, -voxel, voxel, 1.0])
    affine[:3, 3] = [-20.3, 15.1, 7.7]
    settings = dict(spacing=(1.5 * voxel, 1.5 * voxel, 1.5 * voxel), size=[12, -1, 16], margin=1, intensity="percentile")
    _assert_same(_fast(image, label, affine, **settings), _chain(image, label, affine, **settings))


def test_labels_at_the_borders_a_single_slice_and_kept_axes() -> None:
    rng = np.random.default_rng(7)
    image = rng.normal(size=(9, 7, 1)).astype(np.float32)
    label = np.ones((9, 7, 1), np.uint8)  # touches every border
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    for size in ([16, 4, -1], [-1, -1, -1], [3, 20, 1]):
        settings = dict(spacing=(0.5, 1.1, 3.0), size=size, margin=2, intensity="percentile")
        _assert_same(_fast(image, label, affine, **settings), _chain(image, label, affine, **settings))


def test_without_labels_on_the_output_grid_the_chain_decides() -> None:
    """A label smaller than the output voxels can vanish in nearest-neighbour resampling: the separable path
    steps aside and preprocess_volume gives the chain's result."""
    image = np.random.default_rng(1).normal(size=(12, 12, 12)).astype(np.float32)
    label = np.zeros((12, 12, 12), np.uint8)
    label[1, 1, 1] = 1
    affine = np.eye(4)
    settings = dict(spacing=(4.0, 4.0, 4.0), size=[4, 4, 4], margin=0, intensity="window")
    assert _fast(image, label, affine, **settings) is None
    reference = _chain(image, label, affine, **settings)
    got = preprocess_volume(image, label, affine, spacing=settings["spacing"], size=settings["size"], margin=0,
                            intensity="window", window=WINDOW)
    _assert_same(got, reference)


def test_the_grid_is_monai_spacings_grid() -> None:
    affine = np.diag([0.5, 0.5, 1.25, 1.0])
    shape, out_affine, positions = spacing_grid((512, 512, 240), affine, (1.0, 1.0, 1.25))
    assert shape == (256, 256, 240)
    np.testing.assert_allclose(positions[0], 2.0 * np.arange(256), atol=1e-4)
    np.testing.assert_allclose(positions[2], np.arange(240), atol=1e-4)
    np.testing.assert_allclose(np.diag(out_affine), [1.0, 1.0, 1.25, 1.0])
    # a spacing within MONAI's tolerance of the target is left alone, affine included
    same = spacing_grid((10, 10, 10), np.diag([1.0004, 1.0, 1.0, 1.0]), (1.0, 1.0, 1.0))
    assert same[0] == (10, 10, 10) and same[1][0, 0] == 1.0004


@pytest.mark.parametrize(("box", "size", "window"), [
    ([(2, 9)], [4], [(3, 7)]),      # crop 7 to 4: start at 7 // 2 - 4 // 2
    ([(2, 9)], [10], [(1, 11)]),    # pad 7 to 10: (10 - 7) // 2 before
    ([(2, 9)], [-1], [(2, 9)]),     # an axis kept as it is
])
def test_centre_window(box, size, window) -> None:
    assert centre_window(box, size) == window


# --- body mask and kept slices ---------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["c", "slice_major", "flipped"])
def test_body_mask_fills_holes_as_scipy_does(layout: str) -> None:
    """Holes (enclosed air), a cavity open to the border (not a hole) and empty margins: the result equals
    scipy's binary_fill_holes on the whole volume, whatever the memory layout."""
    rng = np.random.default_rng(3)
    volume = np.full((40, 36, 30), -1000.0, np.float32)
    volume[5:35, 6:30, 4:26] = 40.0                      # the body, away from the borders
    volume[10:14, 10:14, 10:14] = -900.0                 # a closed hole
    volume[20:24, 12:16, 8:22] = -900.0                  # a tube closed at both ends
    volume[25:28, 20:23, 15:30] = -900.0                 # a tube open to the border: stays background
    volume[rng.random(volume.shape) < 0.02] = -900.0     # speckle: small holes inside, noise outside
    expected = ndimage.binary_fill_holes(volume > -500).astype(np.uint8)
    assert expected[12, 12, 12] == 1 and expected[21, 13, 20] == 1 and expected[26, 21, 28] == 0
    if layout == "slice_major":
        volume = np.moveaxis(np.ascontiguousarray(np.moveaxis(volume, -1, 0)), 0, -1)
    elif layout == "flipped":
        volume, expected = volume[::-1, :, ::-1], expected[::-1, :, ::-1]
    mask = body_mask(volume, modality="CT")
    np.testing.assert_array_equal(mask, expected)


def test_body_mask_of_an_empty_volume_is_empty() -> None:
    assert not body_mask(np.full((6, 6, 6), -1000.0, np.float32), modality="CT").any()


def test_kept_slices_counts_the_labelled_fraction_of_each_slice() -> None:
    labels = np.zeros((1, 10, 10, 5), np.uint8)
    labels[0, :5, :, 1] = 1          # 50%
    labels[0, :1, :4, 2] = 3         # 4%
    labels[0, :, :, 4] = 2           # 100%
    assert kept_slices(labels, slice_axis=2, min_foreground=0.05) == [1, 4]
    assert kept_slices(labels, slice_axis=2, min_foreground=0.0) == [0, 1, 2, 3, 4]
    assert kept_slices(labels, slice_axis=0, min_foreground=0.3) == [0, 1, 2, 3, 4]  # 24/50, then 20/50; 10/50


@pytest.mark.parametrize("seed", range(6))
def test_hole_filling_equals_scipy_on_random_masks(seed: int) -> None:
    """Random masks hold many holes of many shapes (a flat volume has none: all of it is border)."""
    rng = np.random.default_rng(seed)
    shape = [(20, 17, 15), (1, 30, 25), (12, 12, 12)][seed % 3]
    mask = rng.random(shape) < [0.7, 0.8, 0.9][seed % 3]
    expected = ndimage.binary_fill_holes(mask)
    if min(shape) > 1:
        assert expected.sum() > mask.sum()
    got = mask.copy()
    _fill_holes(got)
    np.testing.assert_array_equal(got, expected)


def test_hole_filling_with_more_background_pieces_than_uint16_counts() -> None:
    """Over 65535 pieces of background: the labelling falls back from 2 to 4 bytes a voxel, same result."""
    mask = np.ones((3, 600, 600), dtype=bool)
    mask[1, 1:-1:2, 1:-1:2] = False  # 89401 one-voxel holes
    expected = ndimage.binary_fill_holes(mask)
    got = mask.copy()
    _fill_holes(got)
    np.testing.assert_array_equal(got, expected)
    assert got.all()
