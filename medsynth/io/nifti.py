"""NIfTI reading and writing with nibabel."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from medsynth import MedsynthError
from medsynth.io.atomic import atomic_path


def load_nifti(path: str | os.PathLike[str], *, dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI image.

    Args:
        path: A ``.nii`` or ``.nii.gz`` file.
        dtype: Array type to return.

    Returns:
        ``(array, affine)``: the voxel array as stored (no reorientation) and its 4x4
        voxel-to-world (RAS+ mm) affine.

    Raises:
        MedsynthError: If the file is missing or cannot be read as NIfTI.
    """
    path = Path(path)
    if not path.is_file():
        raise MedsynthError(f"input file not found: {path}")
    try:
        img = nib.load(str(path))
        array = np.asanyarray(img.dataobj).astype(dtype, copy=False)
    except Exception as err:  # nibabel raises many types for corrupt files
        raise MedsynthError(f"cannot read {path} as NIfTI: {err}") from None
    return array, np.asarray(img.affine, dtype=np.float64)


def save_nifti(
    path: str | os.PathLike[str], array: np.ndarray, affine: np.ndarray, *, dtype: type | None = None
) -> Path:
    """Write ``array`` with ``affine`` to ``path`` atomically.

    Args:
        path: Destination ending in ``.nii`` or ``.nii.gz``.
        array: Voxel array (2D arrays are stored as a single-slice 3D volume).
        affine: 4x4 voxel-to-world affine; spacing in the header follows from it.
        dtype: Optional on-disk type (for example ``np.uint8`` for label maps).

    Returns:
        The destination path.
    """
    data = np.asarray(array if dtype is None else array.astype(dtype))
    if data.ndim == 2:
        data = data[..., None]
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)
