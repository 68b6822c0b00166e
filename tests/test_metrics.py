"""Tests for medsynth.metrics on constructed cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsynth.metrics import (
    closer_to_train_fraction,
    mean_pairwise_ssim,
    nearest_neighbours,
    tissue_intensity_distances,
)

NAMES = ["background", "grey", "white"]


def _labelled_set(seed: int = 0, n: int = 4, size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (n, 1, size, size))
    images = np.where(labels == 2, 0.7, np.where(labels == 1, 0.4, 0.0)) + 0.05 * rng.standard_normal(labels.shape)
    return images.astype(np.float32), labels


# --- tissue_intensity_distances -----------------------------------------------------------


def test_tissue_distances_identical_sets() -> None:
    """Identical real and synthetic sets are 0 apart for every foreground label; background is left out."""
    images, labels = _labelled_set()
    out = tissue_intensity_distances(images, labels, images.copy(), labels.copy(), label_names=NAMES)
    assert set(out) == {"grey", "white"}
    for value in out.values():
        assert value == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("shift", [0.05, 0.2, -0.1])
def test_tissue_distances_constant_shift(shift: float) -> None:
    """A constant intensity shift gives a distance equal to the shift for every tissue."""
    images, labels = _labelled_set()
    out = tissue_intensity_distances(images, labels, images + shift, labels, label_names=NAMES)
    assert out["grey"] == pytest.approx(abs(shift), abs=1e-5)
    assert out["white"] == pytest.approx(abs(shift), abs=1e-5)


def test_tissue_distances_per_tissue_and_pooling() -> None:
    """Only the shifted tissue moves; sets of different sizes are pooled per label."""
    images, labels = _labelled_set(n=4)
    synthetic = np.where(labels == 2, images + 0.3, images)
    out = tissue_intensity_distances(images, labels, synthetic[:2], labels[:2], label_names=NAMES)
    assert out["white"] == pytest.approx(0.3, abs=0.03)
    assert out["grey"] < 0.03


def test_tissue_distances_absent_label_left_out() -> None:
    """A label missing from either set is left out rather than given a value."""
    images, labels = _labelled_set()
    no_white = np.where(labels == 2, 1, labels)
    out = tissue_intensity_distances(images, labels, images, no_white, label_names=NAMES)
    assert set(out) == {"grey"}
    out = tissue_intensity_distances(images, labels, images, labels, label_names=[*NAMES, "tumour"])
    assert "tumour" not in out


# --- mean_pairwise_ssim ---------------------------------------------------------------------


def _shape(spatial_dims: int) -> tuple[int, ...]:
    return (16, 16) if spatial_dims == 2 else (8, 8, 8)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_ssim_identical_copies(spatial_dims: int) -> None:
    """Copies of one image have mean pairwise SSIM 1."""
    base = torch.rand(1, 1, *_shape(spatial_dims), generator=torch.Generator().manual_seed(0))
    images = base.repeat(4, 1, *([1] * spatial_dims))
    assert mean_pairwise_ssim(images, spatial_dims=spatial_dims) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_ssim_independent_noise_is_lower(spatial_dims: int) -> None:
    """Independent noise images are far less similar than copies, and near-copies are in between."""
    gen = torch.Generator().manual_seed(1)
    noise = torch.rand(5, 1, *_shape(spatial_dims), generator=gen)
    low = mean_pairwise_ssim(noise.numpy(), spatial_dims=spatial_dims)
    assert -1.0 <= low < 0.3
    near = (noise[:1] + 0.05 * torch.rand(5, 1, *_shape(spatial_dims), generator=gen)).clamp(0, 1)
    mid = mean_pairwise_ssim(near, spatial_dims=spatial_dims)
    assert low < mid < 1.0


def test_ssim_small_images_and_pair_cap() -> None:
    """Images smaller than the default window work; capped pairs are reproducible per seed."""
    images = torch.rand(8, 1, 4, 6, generator=torch.Generator().manual_seed(2))
    a = mean_pairwise_ssim(images, spatial_dims=2, max_pairs=5, seed=3)
    b = mean_pairwise_ssim(images, spatial_dims=2, max_pairs=5, seed=3)
    assert a == b
    assert -1.0 <= a <= 1.0
    assert np.isfinite(mean_pairwise_ssim(images, spatial_dims=2))


def test_ssim_needs_two_images() -> None:
    """A single image raises ValueError."""
    with pytest.raises(ValueError):
        mean_pairwise_ssim(np.zeros((1, 1, 8, 8)), spatial_dims=2)


# --- nearest_neighbours ------------------------------------------------------------------


@pytest.mark.parametrize("n_refs", [10, 40])  # 40: torch.cdist switches to its matmul path
def test_nearest_neighbours_exact_copy(n_refs: int) -> None:
    """An exact copy of a reference is found at distance ~0 with the right index."""
    rng = np.random.default_rng(0)
    refs = rng.random((n_refs, 1, 8, 8)).astype(np.float32)
    queries = refs[[7, 2, 2, 0]]
    dist, idx = nearest_neighbours(queries, refs)
    np.testing.assert_array_equal(idx, [7, 2, 2, 0])
    np.testing.assert_allclose(dist, 0.0, atol=1e-3)
    assert dist.shape == (4,) and idx.shape == (4,)


@pytest.mark.parametrize("d", [0.1, 0.25])
def test_nearest_neighbours_rmse_scale(d: float) -> None:
    """A constant difference d in every voxel gives distance d, whatever the image size."""
    for shape in [(1, 4, 4), (2, 8, 8, 3)]:
        refs = np.full((2, *shape), 0.5, dtype=np.float32)
        refs[1] = 0.0
        dist, idx = nearest_neighbours(refs[:1] + d, refs)
        assert idx[0] == 0
        assert dist[0] == pytest.approx(d, rel=1e-4)


def test_nearest_neighbours_chunking() -> None:
    """A chunk smaller than the query count gives the same answer as one chunk."""
    rng = np.random.default_rng(1)
    refs = rng.random((12, 1, 6, 6)).astype(np.float32)
    queries = rng.random((11, 1, 6, 6)).astype(np.float32)
    queries[4] = refs[9]
    d_all, i_all = nearest_neighbours(queries, refs, chunk=512)
    d_chunk, i_chunk = nearest_neighbours(torch.from_numpy(queries), torch.from_numpy(refs), chunk=3)
    np.testing.assert_array_equal(i_chunk, i_all)
    np.testing.assert_allclose(d_chunk, d_all, atol=1e-5)
    assert len(d_chunk) == 11
    assert i_chunk[4] == 9 and d_chunk[4] == pytest.approx(0.0, abs=1e-3)
    # Brute-force check of the result.
    full = np.sqrt(((queries[:, None] - refs[None]) ** 2).reshape(11, 12, -1).mean(-1))
    np.testing.assert_array_equal(i_chunk, full.argmin(1))
    np.testing.assert_allclose(d_chunk, full.min(1), atol=1e-4)


def test_nearest_neighbours_size_mismatch() -> None:
    """Queries and references of different sizes raise ValueError."""
    with pytest.raises(ValueError):
        nearest_neighbours(np.zeros((2, 1, 4, 4)), np.zeros((3, 1, 5, 5)))


# --- closer_to_train_fraction -------------------------------------------------------------


@pytest.mark.parametrize(
    "to_train,to_holdout,expected",
    [
        ([0.1, 0.2, 0.3, 0.4], [0.2, 0.1, 0.4, 0.3], 0.5),
        ([0.1, 0.1, 0.1], [0.5, 0.5, 0.5], 1.0),
        ([0.5, 0.5], [0.1, 0.2], 0.0),
        ([0.3, 0.3, 0.1, 0.9], [0.3, 0.4, 0.2, 0.1], 0.5),  # ties do not count as closer
    ],
)
def test_closer_to_train_fraction(to_train: list[float], to_holdout: list[float], expected: float) -> None:
    """The fraction counts strictly closer-to-train samples."""
    assert closer_to_train_fraction(np.array(to_train), np.array(to_holdout)) == pytest.approx(expected)


@pytest.mark.parametrize("to_train,to_holdout", [([0.1, 0.2], [0.1]), ([], [])])
def test_closer_to_train_fraction_errors(to_train: list[float], to_holdout: list[float]) -> None:
    """Mismatched lengths or empty arrays raise ValueError."""
    with pytest.raises(ValueError):
        closer_to_train_fraction(np.array(to_train), np.array(to_holdout))


def test_closer_to_train_fraction_per_record() -> None:
    """With the set sizes, a sample of the population scores 0.5 however unequal the splits are;
    copies of training records still score 1, and equal sizes leave the raw fraction unchanged."""
    rng = np.random.default_rng(0)
    for n, h in [(400, 80), (80, 400)]:
        train, holdout, samples = rng.normal(size=(n, 8)), rng.normal(size=(h, 8)), rng.normal(size=(2000, 8))
        to_train, _ = nearest_neighbours(samples, train)
        to_holdout, _ = nearest_neighbours(samples, holdout)
        raw = closer_to_train_fraction(to_train, to_holdout)
        assert abs(raw - n / (n + h)) < 0.05  # the bias the sizes correct
        assert closer_to_train_fraction(to_train, to_holdout, train_size=n, holdout_size=h) == pytest.approx(0.5, abs=0.05)
    copies = train[:50] + 1e-4
    to_train, _ = nearest_neighbours(copies, train)
    to_holdout, _ = nearest_neighbours(copies, holdout)
    assert closer_to_train_fraction(to_train, to_holdout, train_size=len(train), holdout_size=len(holdout)) == 1.0
    d_train, d_holdout = np.array([0.1, 0.4, 0.2]), np.array([0.2, 0.3, 0.3])
    assert closer_to_train_fraction(d_train, d_holdout, train_size=5, holdout_size=5) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="sizes"):
        closer_to_train_fraction(d_train, d_holdout, train_size=5)
