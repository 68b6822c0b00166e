"""Tests for medsynth.transforms: volume preprocessing, foreground scaling and label augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medsynth.transforms import ForegroundPercentileScaled, label_augmentation, volume_preprocessing

SHAPE = (12, 10, 8)


def _lps_affine() -> torch.Tensor:
    """An LPS-like affine: the first two axes point towards -x and -y in RAS world space."""
    affine = torch.diag(torch.tensor([-1.0, -1.0, 2.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([5.0, 6.0, -7.0], dtype=torch.float64)
    return affine


def _volume() -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros(SHAPE, np.float32)
    label[2:6, 3:8, 2:6] = 1
    label[3:5, 4:6, 3:5] = 3
    image = np.random.default_rng(0).random(SHAPE).astype(np.float32) * 50 + label * 20
    return image, label


def _sample() -> dict[str, MetaTensor]:
    image, label = _volume()
    return {
        "image": MetaTensor(torch.from_numpy(image[None]), affine=_lps_affine()),
        "label": MetaTensor(torch.from_numpy(label[None]), affine=_lps_affine()),
    }


def _world_centroid(label: torch.Tensor, affine: torch.Tensor, value: float) -> np.ndarray:
    voxels = np.argwhere(np.asarray(label)[0] == value).mean(axis=0)
    return (np.asarray(affine, dtype=np.float64) @ np.append(voxels, 1.0))[:3]


# --- volume_preprocessing ------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 2.0), (0.5, 1.0, 1.0)])
def test_volume_preprocessing_geometry(spacing: tuple[float, float, float]) -> None:
    """Output is RAS with the requested spacing, and anatomy stays at the same world position."""
    sample = _sample()
    before = _world_centroid(sample["label"], sample["label"].affine, 3.0)
    out = volume_preprocessing(spacing=spacing, margin=1)(sample)
    for key in ("image", "label"):
        affine = np.asarray(out[key].affine, dtype=np.float64)
        assert np.all(np.diag(affine)[:3] > 0), affine
        np.testing.assert_allclose(affine[:3, :3], np.diag(spacing), atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), spacing, atol=1e-6)
    assert out["image"].shape == out["label"].shape
    after = _world_centroid(out["label"], out["label"].affine, 3.0)
    np.testing.assert_allclose(after, before, atol=1.0)


def test_volume_preprocessing_intensity_and_labels() -> None:
    """Image intensities land in [0, 1] and label values are kept exactly (nearest interpolation)."""
    out = volume_preprocessing(spacing=(0.7, 0.7, 1.3), margin=1)(_sample())
    image, label = out["image"], out["label"]
    assert isinstance(image, MetaTensor) and isinstance(label, MetaTensor)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    assert set(torch.unique(label).tolist()) == {0.0, 1.0, 3.0}


def test_volume_preprocessing_crops_to_label() -> None:
    """Without spatial_size the volume is cropped to the label's bounding box plus the margin."""
    out = volume_preprocessing(spacing=(1.0, 1.0, 2.0), margin=1)(_sample())
    # Label box is 4 x 5 x 4 voxels at the input spacing; one voxel of margin on each side.
    assert tuple(out["label"].shape[1:]) == (6, 7, 6)
    label = np.asarray(out["label"])[0]
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = label.max(axis=other)
        assert profile[0] == 0 and profile[-1] == 0 and profile[1] > 0 and profile[-2] > 0


@pytest.mark.parametrize("spatial_size", [[16, 4, -1], [-1, 20, 3], [5, 5, 5]])
def test_volume_preprocessing_spatial_size(spatial_size: list[int]) -> None:
    """Centre pad/crop gives the requested size; -1 keeps that axis as cropped."""
    free = volume_preprocessing(spacing=(1.0, 1.0, 2.0), margin=1)(_sample())
    out = volume_preprocessing(spacing=(1.0, 1.0, 2.0), margin=1, spatial_size=spatial_size)(_sample())
    expected = tuple(f if s == -1 else s for s, f in zip(spatial_size, free["image"].shape[1:]))
    assert tuple(out["image"].shape[1:]) == expected
    assert tuple(out["label"].shape[1:]) == expected
    # Padding adds zeros, so intensities and labels stay in range.
    assert float(out["image"].min()) >= 0.0 and float(out["image"].max()) <= 1.0
    assert set(torch.unique(out["label"]).tolist()) <= {0.0, 1.0, 3.0}
    np.testing.assert_allclose(np.diag(np.asarray(out["image"].affine))[:3], (1.0, 1.0, 2.0), atol=1e-6)


def test_volume_preprocessing_pad_keeps_world_position() -> None:
    """Padding shifts the origin so the label keeps its world position."""
    sample = _sample()
    before = _world_centroid(sample["label"], sample["label"].affine, 3.0)
    out = volume_preprocessing(spacing=(1.0, 1.0, 2.0), margin=1, spatial_size=[16, 16, 16])(sample)
    after = _world_centroid(out["label"], out["label"].affine, 3.0)
    np.testing.assert_allclose(after, before, atol=0.5)


# --- ForegroundPercentileScaled -------------------------------------------------------------


def test_foreground_percentiles_map_to_zero_and_one() -> None:
    """Foreground percentiles map to 0 and 1, ignoring bright background; values are clipped."""
    fg_values = np.linspace(0.0, 100.0, 101, dtype=np.float32)
    image = np.full((1, 11, 11), 1000.0, dtype=np.float32)  # bright background
    label = np.zeros((1, 11, 11), dtype=np.float32)
    image.reshape(-1)[:101] = fg_values
    label.reshape(-1)[:101] = 2
    out = ForegroundPercentileScaled(keys="image", lower=10.0, upper=90.0)(
        {"image": torch.from_numpy(image), "label": torch.from_numpy(label)}
    )["image"]
    flat = out.reshape(-1).numpy()
    fg = flat[:101]
    lo, hi = np.percentile(fg_values, [10.0, 90.0])
    np.testing.assert_allclose(fg, np.clip((fg_values - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert fg[10] == pytest.approx(0.0, abs=1e-6) and fg[90] == pytest.approx(1.0, abs=1e-6)
    assert fg[50] == pytest.approx(0.5, abs=1e-6)
    assert flat.min() >= 0.0 and flat.max() <= 1.0
    np.testing.assert_array_equal(flat[101:], 1.0)  # background is clipped, not used for scaling


def test_foreground_percentiles_full_range_and_no_foreground() -> None:
    """Percentiles 0/100 map the foreground min/max to 0/1; with no foreground the whole image is used."""
    image = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4) * 2 + 10
    label = torch.zeros(1, 4, 4)
    label[0, 1:3, 1:3] = 1
    out = ForegroundPercentileScaled(keys="image", lower=0.0, upper=100.0)({"image": image, "label": label})["image"]
    fg = out[label > 0]
    assert float(fg.min()) == pytest.approx(0.0) and float(fg.max()) == pytest.approx(1.0)
    empty = ForegroundPercentileScaled(keys="image", lower=0.0, upper=100.0)(
        {"image": image, "label": torch.zeros(1, 4, 4)}
    )["image"]
    torch.testing.assert_close(empty, (image - 10) / 30)


def test_foreground_percentiles_keeps_metadata_and_label() -> None:
    """The image stays a MetaTensor with its affine; the label is untouched."""
    sample = _sample()
    label_before = sample["label"].clone()
    out = ForegroundPercentileScaled(keys="image")(sample)
    assert isinstance(out["image"], MetaTensor)
    torch.testing.assert_close(torch.as_tensor(out["image"].affine), _lps_affine())
    assert torch.equal(torch.as_tensor(out["label"]), torch.as_tensor(label_before))


@pytest.mark.parametrize("lower,upper", [(50.0, 50.0), (90.0, 10.0), (-1.0, 50.0), (0.0, 101.0)])
def test_foreground_percentiles_bad_arguments(lower: float, upper: float) -> None:
    """Percentiles outside 0 <= lower < upper <= 100 raise ValueError."""
    with pytest.raises(ValueError):
        ForegroundPercentileScaled(keys="image", lower=lower, upper=upper)


# --- label_augmentation ---------------------------------------------------------------------


def _label_2d() -> MetaTensor:
    label = torch.zeros(1, 24, 20)
    label[0, 4:16, 5:12] = 2
    label[0, 8:12, 6:10] = 5
    return MetaTensor(label)


def _label_3d() -> MetaTensor:
    label = torch.zeros(1, 12, 10, 8)
    label[0, 2:9, 3:8, 2:6] = 1
    label[0, 4:6, 4:6, 3:5] = 4
    return MetaTensor(label)


@pytest.mark.parametrize("spatial_dims,make", [(2, _label_2d), (3, _label_3d)])
def test_label_augmentation_values_subset(spatial_dims: int, make) -> None:
    """Augmented label maps only hold values of the input (nearest-neighbour, no blending)."""
    label = make()
    values = set(torch.unique(label).tolist())
    aug = label_augmentation(spatial_dims=spatial_dims, rotate_range=0.3, scale_range=0.1)
    aug.set_random_state(seed=0)
    for _ in range(3):
        out = aug({"label": label.clone()})["label"]
        assert tuple(out.shape) == tuple(label.shape)
        assert set(torch.unique(out).tolist()) <= values
        assert float((out > 0).float().mean()) > 0.0


@pytest.mark.parametrize("spatial_dims,make", [(2, _label_2d), (3, _label_3d)])
def test_label_augmentation_reproducible(spatial_dims: int, make) -> None:
    """The same seed gives the same augmented sequence; another seed gives a different one."""
    label = make()

    def run(seed: int) -> list[torch.Tensor]:
        aug = label_augmentation(spatial_dims=spatial_dims)
        aug.set_random_state(seed=seed)
        return [torch.as_tensor(aug({"label": label.clone()})["label"]).clone() for _ in range(3)]

    a, b, c = run(11), run(11), run(12)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not all(torch.equal(x, z) for x, z in zip(a, c))
    # Augmentation actually changes the map.
    assert not all(torch.equal(x, torch.as_tensor(label)) for x in a)


def test_label_augmentation_flip_only() -> None:
    """With no affine change and flip_prob=1, the map is flipped along the first spatial axis."""
    label = _label_2d()
    aug = label_augmentation(flip_prob=1.0, rotate_range=0.0, scale_range=0.0, translate_range=0.0)
    aug.set_random_state(seed=0)
    out = torch.as_tensor(aug({"label": label.clone()})["label"])
    assert torch.equal(out, torch.as_tensor(label).flip(1))
