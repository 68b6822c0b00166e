"""Preprocessing by separable resampling: the result of :func:`~medsynth.transforms.volume_preprocessing`
at a fraction of its time and memory.

MONAI's ``Spacingd`` (with ``diagonal=False``, as the chain uses it) only rescales the voxel axes of
the RAS-reoriented image: along each axis, its output voxel ``i`` samples input coordinate
``scale * i + offset``, independently of the other axes. Trilinear interpolation on such a map is three 1D linear interpolations in a row,
and nearest-neighbour is three index selections, so the resampling is separable. It is also local, so
only the voxels that survive the later crop need computing. :func:`preprocess_separable` therefore:

1. reorients to RAS with views (flips and transposes, no copy);
2. takes the output grid (shape, affine, and the input coordinate each output voxel samples, axis
   by axis) from MONAI's own functions, computed in float32 as MONAI's resampling computes them;
3. resamples the label map to that grid (index selections on ``uint8``), finds the label's bounding
   box plus the margin, and the centred pad/crop window;
4. resamples the image inside the box only, one axis at a time, the most shrinking axis first
   (an axis whose samples fall on input voxels is an index selection);
5. scales intensities with the chain's own transform and pads/crops to the window.

The image is never converted as a whole, and nothing the size of the full resampled grid exists as
float32. The equality with the MONAI chain, within float32 interpolation tolerance, is tested on
random geometries (tests/test_transforms.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data.utils import affine_to_spacing, compute_shape_offset, zoom_affine
from monai.networks.utils import to_norm_affine

AFFINE_TOL = 1e-3
"""MONAI's tolerance: a spacing this close to the target is kept, a transform this close to identity skipped."""


def ras_view(arrays: Sequence[np.ndarray], affine: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Reorient ``(X, Y, Z)`` arrays on one grid to RAS as views, as MONAI's ``Orientationd`` does.

    Returns:
        ``(views, affine)``: the arrays flipped and transposed without copying, and their RAS affine.
    """
    affine = np.asarray(affine, dtype=np.float64)
    shape = arrays[0].shape
    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt("RAS"))
    views = [nib.orientations.apply_orientation(a, ornt) for a in arrays]
    return views, affine @ nib.orientations.inv_ornt_aff(ornt, shape)


def spacing_grid(
    shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float]
) -> tuple[tuple[int, ...], np.ndarray, list[np.ndarray]] | None:
    """The output grid of MONAI's ``Spacing(pixdim=spacing)`` for an image of ``shape`` and ``affine``.

    Returns:
        ``(shape, affine, positions)``: the output grid, and per axis the input coordinate that each
        output voxel samples (float32, as MONAI's resampling computes them); ``None`` if the map is not
        axis-aligned (never for a finite, invertible affine, which ``diagonal=False`` only rescales;
        kept as a guard).
    """
    affine = np.asarray(affine, dtype=np.float64)
    target = np.asarray(spacing, dtype=np.float64)
    current = affine_to_spacing(affine, 3, target.dtype)
    out_spacing = np.where(np.abs(current - target) <= AFFINE_TOL, current, target)
    new_affine = zoom_affine(affine, out_spacing, diagonal=False)
    grid_shape, offset = compute_shape_offset(list(shape), affine, new_affine, False)
    new_affine[:3, 3] = offset[:3]
    xform = np.linalg.solve(affine, new_affine)
    out_shape = tuple(int(s) for s in grid_shape)
    if out_shape == tuple(shape) and np.allclose(xform, np.eye(4), atol=AFFINE_TOL):
        # MONAI leaves such an image as it is, affine included
        return out_shape, affine, [np.arange(n, dtype=np.float32) for n in shape]
    diagonal = np.abs(np.diag(xform)[:3])
    if (np.abs(xform[:3, :3] - np.diag(np.diag(xform[:3, :3]))) > 1e-9 * np.maximum(diagonal, 1.0)).any():
        return None
    return out_shape, new_affine, source_positions(xform, shape, out_shape)


def source_positions(xform: np.ndarray, shape: Sequence[int], out_shape: Sequence[int]) -> list[np.ndarray]:
    """Per axis, the input coordinate sampled by each output voxel under the axis-aligned ``xform``,
    computed as MONAI's resampling computes it: the float32 grid of ``torch.nn.functional.affine_grid``
    for MONAI's normalised transform, unnormalised and clamped as ``grid_sample`` does (align_corners
    False, border padding). Nearest-neighbour ties (a coordinate halfway between two voxels) are
    thereby decided as the MONAI chain decides them.
    """
    theta = torch.as_tensor(xform, dtype=torch.float64).to(torch.float32)[None]
    theta = to_norm_affine(theta, src_size=tuple(shape), dst_size=tuple(out_shape), align_corners=False, zero_centered=False)
    reverse = torch.as_tensor([2, 1, 0])
    theta[:, :3] = theta[:, reverse]
    theta[:, :, :3] = theta[:, :, reverse]
    positions = []
    for axis in range(3):
        size = [1, 1, 1, 1, 1]
        size[2 + axis] = int(out_shape[axis])
        grid = torch.nn.functional.affine_grid(theta[:, :3], size=size, align_corners=False)
        g = grid.reshape(-1, 3)[:, 2 - axis].numpy()
        n = np.float32(shape[axis])
        s = ((g + np.float32(1)) * n - np.float32(1)) / np.float32(2)
        positions.append(np.minimum(n - np.float32(1), np.maximum(s, np.float32(0))))
    return positions


_ON_VOXEL = 1e-4
"""A sample this close to an input voxel takes that voxel's value: MONAI's float32 grid puts the samples of a
whole-voxel map up to ~2e-5 off, and interpolating with such a weight changes a value by that fraction of
its neighbour's difference."""


def resample_nearest(array: np.ndarray, positions: Sequence[np.ndarray], box: Sequence[tuple[int, int]]) -> np.ndarray:
    """Nearest-neighbour samples of ``array`` at output voxels ``box`` (``(start, stop)`` per axis), from
    the input coordinates of :func:`source_positions`."""
    out = array
    for axis in _shrinking_first(array.shape, box):
        start, stop = box[axis]
        out = _select(out, np.rint(positions[axis][start:stop]).astype(np.intp), axis)
    return out


def resample_linear(array: np.ndarray, positions: Sequence[np.ndarray], box: Sequence[tuple[int, int]]) -> np.ndarray:
    """Trilinear samples (float32) of ``array`` at output voxels ``box``, one axis at a time.

    An axis whose samples all fall on input voxels (within :data:`_ON_VOXEL`, the float32 rounding of
    MONAI's grid) costs an index selection, often a view; the others a weighted sum of two selections.
    """
    out = array
    for axis in _shrinking_first(array.shape, box):
        start, stop = box[axis]
        size = array.shape[axis]
        position = positions[axis][start:stop].astype(np.float64)
        low = np.minimum(np.floor(position), max(size - 2, 0)).astype(np.intp)
        weight = position - low
        if np.all((weight < _ON_VOXEL) | (weight > 1.0 - _ON_VOXEL)):
            out = _select(out, np.minimum(np.rint(position).astype(np.intp), size - 1), axis)
            continue
        view = [1] * out.ndim
        view[axis] = -1
        w = weight.astype(np.float32).reshape(view)
        high = np.minimum(low + 1, size - 1)
        below = np.array(_select(out, low, axis), dtype=np.float32)
        above = np.array(_select(out, high, axis), dtype=np.float32)
        above -= below
        above *= w
        below += above
        out = below
    return np.ascontiguousarray(out, dtype=np.float32)


def _select(array: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """``array.take(index, axis)`` without copying the whole array first: a view where ``index`` is evenly
    spaced (a slice), otherwise indexing along ``axis`` alone (``take`` would copy a strided array whole)."""
    where: list[slice | np.ndarray] = [slice(None)] * array.ndim
    steps = np.diff(index)
    if index.size > 1 and steps[0] != 0 and np.all(steps == steps[0]):
        step = int(steps[0])
        stop = int(index[-1]) + step
        where[axis] = slice(int(index[0]), stop if stop >= 0 else None, step)
    elif index.size == 1:
        where[axis] = slice(int(index[0]), int(index[0]) + 1)
    else:
        where[axis] = index
    return array[tuple(where)]


def _shrinking_first(shape: Sequence[int], box: Sequence[tuple[int, int]]) -> list[int]:
    """Axes in the order that shrinks the data fastest."""
    return sorted(range(len(shape)), key=lambda a: (box[a][1] - box[a][0]) / max(shape[a], 1))


def foreground_box(label: np.ndarray, margin: int) -> list[tuple[int, int]] | None:
    """``(start, stop)`` per axis of ``label > 0`` widened by ``margin`` and kept inside the array
    (MONAI's ``CropForegroundd(margin=margin, allow_smaller=True)``); ``None`` if there is none."""
    box = []
    for axis in range(label.ndim):
        hit = np.flatnonzero(label.any(axis=tuple(a for a in range(label.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append((max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, label.shape[axis])))
    return box


def centre_window(box: Sequence[tuple[int, int]], size: Sequence[int]) -> list[tuple[int, int]]:
    """The window of MONAI's ``ResizeWithPadOrCropd(spatial_size=size)`` applied to ``box``: a centred
    crop (start at ``L // 2 - S // 2``) or a symmetric pad (``(S - L) // 2`` before); -1 keeps an axis."""
    window = []
    for (start, stop), target in zip(box, size):
        length = stop - start
        target = length if target < 0 else int(target)
        first = start + length // 2 - target // 2 if target <= length else start - (target - length) // 2
        window.append((first, first + target))
    return window


def preprocess_separable(
    image: np.ndarray,
    label: np.ndarray,
    affine: np.ndarray,
    *,
    spacing: Sequence[float],
    size: Sequence[int] | None,
    margin: int,
    scaling: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    pointwise: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """What :func:`~medsynth.transforms.volume_preprocessing` makes of ``image`` and ``label``, by separable
    resampling of the label's box only.

    Args:
        image: ``(X, Y, Z)`` intensities (any real dtype, any memory layout).
        label: ``(X, Y, Z)`` integer label map on the same grid.
        affine: Their 4x4 affine.
        spacing: Target spacing (mm) per RAS axis.
        size: Pad/crop size per axis (-1 keeps an axis); ``None``: no pad/crop.
        margin: Voxels kept around the label's bounding box.
        scaling: The chain's intensity transform, called on ``{"image", "label"}`` channel-first tensors.
        pointwise: ``scaling`` maps each voxel on its own (a fixed window): it is then applied a slab
            at a time, so its temporaries stay small; otherwise (foreground percentiles) to the whole box.

    Returns:
        ``(volume, labels, affine)`` as the chain gives them: ``(1, X', Y', Z')`` float32 and uint8, and
        the affine; ``None`` where this path does not apply (a non-separable grid, an empty label map on
        the output grid), for the caller to run the chain.
    """
    (image, label), ras_affine = ras_view([image, label], affine)
    grid = spacing_grid(image.shape, ras_affine, spacing)
    if grid is None:
        return None
    out_shape, out_affine, positions = grid
    whole = [(0, n) for n in out_shape]
    labels = resample_nearest(label, positions, whole)
    box = foreground_box(labels, margin)
    if box is None:
        return None
    window = centre_window(box, size) if size is not None else list(box)
    labels = np.ascontiguousarray(labels[tuple(slice(a, b) for a, b in box)])
    volume = resample_linear(image, positions, box)
    step = 8 if pointwise else volume.shape[-1]
    for k in range(0, volume.shape[-1], step):
        part = np.s_[..., k : k + step]
        scaled = scaling({"image": torch.from_numpy(volume[part][None]), "label": torch.from_numpy(labels[part][None])})
        volume[part] = np.asarray(scaled["image"], dtype=np.float32)[0]

    out_volume = np.zeros([b - a for a, b in window], dtype=np.float32)
    out_labels = np.zeros(out_volume.shape, dtype=np.uint8)
    source, target = [], []
    for (b0, b1), (w0, w1) in zip(box, window):
        lo, hi = max(b0, w0), min(b1, w1)
        source.append(slice(lo - b0, hi - b0))
        target.append(slice(lo - w0, hi - w0))
    out_volume[tuple(target)] = volume[tuple(source)]
    out_labels[tuple(target)] = labels[tuple(source)]
    result_affine = out_affine.copy()
    result_affine[:3, 3] = out_affine[:3, :3] @ np.array([w0 for w0, _ in window], dtype=np.float64) + out_affine[:3, 3]
    return out_volume[None], out_labels[None], result_affine
