"""Preprocess keeps its memory near the size of the series it reads: no step copies the volume in
float64 (the full measurement on a 1 GiB series is ``benchmarks/preprocess_memory.py``)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from skimage.filters import threshold_otsu

from medsynth.data.case import body_mask
from medsynth.transforms import volume_preprocessing


def _phantom(shape: tuple[int, int, int] = (96, 96, 64)) -> np.ndarray:
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((grid**2).sum(0))
    return (np.where(r < 0.7, 300.0, 20.0) + 15.0 * rng.standard_normal(shape)).astype(np.float32)


def _peak(work) -> tuple[object, int]:
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        result = work()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_body_mask_costs_masks_not_float64_copies_of_the_volume() -> None:
    volume = _phantom()
    mask, peak = _peak(lambda: body_mask(volume, modality="MR"))
    assert peak < 2.0 * volume.nbytes, f"body_mask allocated {peak / volume.nbytes:.2f}x the volume"
    # the threshold is Otsu's on the whole volume, as before
    low, high = float(volume.min()), float(volume.max())
    expected = low + float(threshold_otsu((volume.astype(np.float64) - low) / (high - low))) * (high - low)
    assert np.array_equal(mask.astype(bool), volume > expected) or abs(int(mask.sum()) - int((volume > expected).sum())) < 10
    assert mask.dtype == np.uint8 and 0.1 < mask.mean() < 0.5


def _resident_peak(work) -> tuple[object, float]:
    """``work()`` and the rise of this process's peak resident memory while it ran, in bytes (Linux)."""
    def high_water() -> float:
        with open("/proc/self/status") as fh:
            return next(float(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))

    try:
        with open("/proc/self/clear_refs", "w") as fh:  # "5" resets the peak to the current size
            fh.write("5")
    except OSError as err:
        pytest.skip(f"cannot reset the peak resident memory here ({err})")
    before = high_water()
    result = work()
    return result, high_water() - before


def test_resampling_a_large_volume_costs_about_one_copy_of_it() -> None:
    volume = _phantom((256, 256, 160))  # 40 MiB: large enough to see, small enough for the suite
    label = (volume > 150).astype(np.float32)
    data = {"image": MetaTensor(torch.from_numpy(volume[None]), affine=torch.eye(4, dtype=torch.float64)),
            "label": MetaTensor(torch.from_numpy(label[None]), affine=torch.eye(4, dtype=torch.float64))}
    spacing = volume_preprocessing(spacing=(2.0, 2.0, 2.0), spatial_size=None).transforms[1]
    out, rise = _resident_peak(lambda: spacing(data))
    assert out["image"].dtype == torch.float32 and tuple(out["image"].shape[1:]) == (128, 128, 80)
    # resampling in float64 (MONAI's default) would copy image and label at twice their size: 4x
    assert rise < 2.0 * volume.nbytes, f"resampling raised the peak by {rise / volume.nbytes:.2f}x the volume"
