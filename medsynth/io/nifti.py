"""NIfTI reading and writing with nibabel, and the declared-size limit every image reader applies.

A header declares how big its image is before a single voxel is read; readers compare that size
with :data:`MAX_IMAGE_BYTES` (or the caller's limit) first, so a damaged or hostile header cannot
make medsynth allocate more memory than the limit allows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from medsynth import MedsynthError
from medsynth.io.atomic import atomic_path

MAX_IMAGE_BYTES = 4 * 1024**3
"""Default limit on an image's declared size, counted as float32 voxels (4 bytes each): 2**30 voxels,
for example 1024 x 1024 x 1024, well above any CT or MR series."""

_MAX_MESSAGE = 200


def image_size_problem(shape: Sequence[int], *, max_bytes: int, itemsize: int = 4, what: str = "declared size") -> str | None:
    """Why an image of ``shape`` must not be read, or ``None`` when it is within the limit.

    Args:
        shape: The declared voxel counts per axis (any number of axes).
        max_bytes: The limit, in bytes of float32 voxels (the volume medsynth works on).
        itemsize: Bytes per stored voxel; stored data wider than float32 counts at its own width.
        what: What the size is of, at the start of the reason.

    Returns:
        A one-line reason naming the declared size and the limit, or ``None``.
    """
    counts = [int(n) for n in shape]
    if any(n < 1 for n in counts):
        return f"{what}: an empty image (voxels per axis {counts}); expected at least 1 along every axis"
    voxels = math.prod(counts)
    need = voxels * max(4, int(itemsize))
    if need > max_bytes:
        return (
            f"{what}: {voxels} voxels ({need / 1e9:.3g} GB in memory), more than the {max_bytes / 1e9:.3g} GB "
            "limit on one image (data.max_image_gb); refused before reading the voxels"
        )
    return None


def one_line(err: BaseException) -> str:
    """A library exception as one short line: its type and the start of its first line."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _header_problem(img: nib.Nifti1Image | nib.Nifti2Image, path: Path, *, max_bytes: int) -> str | None:
    """What is wrong with a NIfTI header before its voxels are read (size, voxel type, truncation)."""
    dtype = img.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        return f"voxel type {dtype} is not supported; expected integers or real numbers (one value per voxel)"
    problem = image_size_problem(img.shape, max_bytes=max_bytes, itemsize=dtype.itemsize)
    if problem is not None:
        return problem
    if not str(path).lower().endswith(".gz"):  # an uncompressed file must hold all the voxels it declares
        offset = int(img.header.get_data_offset())
        need = offset + math.prod(img.shape) * dtype.itemsize
        have = path.stat().st_size
        if offset < 0 or need > have:
            return f"the file is truncated: its header declares {need} bytes (voxels from byte {offset}), the file has {have}"
    return None


def load_nifti(
    path: str | os.PathLike[str], *, dtype: type = np.float32, max_bytes: int = MAX_IMAGE_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI image, refusing a header that declares more than ``max_bytes`` before reading voxels.

    Args:
        path: A ``.nii`` or ``.nii.gz`` file.
        dtype: Array type to return.
        max_bytes: Largest image accepted, in bytes of float32 voxels (see :func:`image_size_problem`).

    Returns:
        ``(array, affine)``: the voxel array as stored (no reorientation) and its 4x4
        voxel-to-world (RAS+ mm) affine.

    Raises:
        MedsynthError: If the file is missing, cannot be read as NIfTI, declares an image over the
            limit, or holds a voxel type other than integers or reals; one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise MedsynthError(f"input file not found: {path}")
    try:
        img = nib.load(str(path))
        problem = (
            _header_problem(img, path, max_bytes=max_bytes)
            if isinstance(img, (nib.Nifti1Image, nib.Nifti2Image))
            else f"a {type(img).__name__}, not a NIfTI image (.nii or .nii.gz)"
        )
    except MemoryError:
        raise
    except Exception as err:  # nibabel raises many types for corrupt headers
        raise MedsynthError(f"cannot read {path} as NIfTI ({one_line(err)})") from None
    if problem is not None:
        raise MedsynthError(f"{path}: {problem}")
    assert isinstance(img, (nib.Nifti1Image, nib.Nifti2Image))  # anything else has a problem
    try:
        array: np.ndarray = np.asanyarray(img.dataobj).astype(dtype, copy=False)
        affine = np.asarray(img.affine, dtype=np.float64)
    except MemoryError:
        raise
    except Exception as err:  # truncated or corrupt voxel data, a broken gzip stream
        raise MedsynthError(f"cannot read the voxels of {path} (damaged or truncated file: {one_line(err)})") from None
    return array, affine


def save_nifti(path: str | os.PathLike[str], array: np.ndarray, affine: np.ndarray, *, dtype: type | None = None) -> Path:
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
