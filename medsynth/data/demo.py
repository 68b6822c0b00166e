"""The demo dataset: nilearn's MNI152 T1 template and a 4-class tissue label map built from it.

The template and its grey- and white-matter probability maps install with nilearn, so the demo
runs with no download and no data of the user's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medsynth.io import save_nifti

DEMO_LABEL_NAMES: tuple[str, ...] = ("background", "other_brain", "grey_matter", "white_matter")


def mni152_tissue_labels(brain: np.ndarray, gm: np.ndarray, wm: np.ndarray, *, threshold: float = 0.4) -> np.ndarray:
    """Turn a brain-extracted T1 and GM/WM probability maps into a tissue label map.

    Args:
        brain: Brain-extracted T1 intensities; voxels above zero are brain.
        gm: Grey-matter probability in [0, 1].
        wm: White-matter probability in [0, 1].
        threshold: Smallest GM or WM probability that can claim a voxel.

    Returns:
        ``uint8`` map: 0 background, 1 other brain tissue / CSF, 2 grey matter, 3 white matter.
        Inside the brain, a voxel goes to the more probable of GM and WM when that probability
        reaches ``threshold``, otherwise to "other brain".
    """
    labels = np.zeros(brain.shape, dtype=np.uint8)
    inside = brain > 0
    labels[inside] = 1
    grey = inside & (gm >= wm) & (gm >= threshold)
    white = inside & (wm > gm) & (wm >= threshold)
    labels[grey] = 2
    labels[white] = 3
    return labels


def write_mni152_demo(folder: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write the MNI152 T1 template and its tissue label map as NIfTI files.

    Args:
        folder: Destination folder; existing files are reused unchanged.

    Returns:
        ``(image_path, label_path)``.
    """
    from nilearn import datasets  # imported here: nilearn is slow to import

    folder = Path(folder)
    image_path, label_path = folder / "mni152_t1.nii.gz", folder / "mni152_t1_tissue.nii.gz"
    if image_path.is_file() and label_path.is_file():
        return image_path, label_path
    template = datasets.load_mni152_template()
    brain = np.asarray(template.get_fdata(), dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template().get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template().get_fdata(), dtype=np.float32)
    labels = mni152_tissue_labels(brain, gm, wm)
    save_nifti(label_path, labels, template.affine, dtype=np.uint8)
    save_nifti(image_path, brain, template.affine, dtype=np.float32)
    return image_path, label_path
