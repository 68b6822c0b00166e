"""The demo datasets, made from nilearn's MNI152 T1 template and a 4-class tissue map built from it.

The template and its grey- and white-matter probability maps install with nilearn, so the demos
run with no download and no data of the user's.

- ``data=demo``: the template itself, one brain cut into slices; its splits are blocks of slices.
- ``data=demo_cohort``: a cohort of virtual subjects. One template is one brain: an audit of a
  model trained on some of its slices and tested on others measures the distance between slice
  positions, not between people. Each virtual subject is the template (and its tissue map) under
  its own smooth random deformation (rotation, anisotropic scaling, shift and a coarse elastic
  field) and MR-like intensity changes (a smooth bias field and a gamma), so subjects differ
  roughly as registered brains of different people do (same-level axial slices correlate at about
  0.8 to 0.9), and the splits hold out whole subjects.
"""

from __future__ import annotations

import json
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


def virtual_subject(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *, voxel_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """One virtual subject: ``image`` and ``labels`` under one smooth random deformation.

    The deformation is a rotation (up to 6 degrees about each axis), an anisotropic scaling
    (0.9 to 1.1), a shift (up to 4 mm) and an elastic field (a 6x6x6 grid of displacements with a
    3 mm standard deviation, interpolated cubically). The intensities get a smooth multiplicative
    bias field (about 12% over the head) and a gamma between 0.85 and 1.15.

    Args:
        image: A 3D intensity volume, non-negative.
        labels: Its label map on the same grid.
        rng: The subject's random source.
        voxel_mm: The voxel size, to express shifts and displacements in voxels.

    Returns:
        ``(image, labels)``: the subject's volume in [0, 1] (float32) and label map (uint8).
    """
    from scipy import ndimage

    shape = np.array(image.shape)
    centre = (shape - 1) / 2.0

    def rotation(angle: float, i: int, j: int) -> np.ndarray:
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(angle)
        r[i, j], r[j, i] = -np.sin(angle), np.sin(angle)
        return r

    angles = np.deg2rad(rng.uniform(-6.0, 6.0, 3))
    matrix = (
        rotation(angles[0], 1, 2)
        @ rotation(angles[1], 0, 2)
        @ rotation(angles[2], 0, 1)
        @ np.diag(1.0 / rng.uniform(0.9, 1.1, 3))
    )
    shift = rng.uniform(-4.0, 4.0, 3) / voxel_mm
    grid = np.indices(image.shape, dtype=np.float32).reshape(3, -1) - centre[:, None]
    coords = (matrix @ grid + (centre + shift)[:, None]).astype(np.float32)

    def smooth(field: np.ndarray) -> np.ndarray:
        return ndimage.zoom(field, shape / np.array(field.shape), order=3)[: shape[0], : shape[1], : shape[2]]

    for axis in range(3):
        coords[axis] += smooth(rng.normal(0.0, 3.0 / voxel_mm, (6, 6, 6))).reshape(-1)
    coords = coords.reshape(3, *image.shape)
    moved = ndimage.map_coordinates(image.astype(np.float32), coords, order=1, mode="constant")
    moved_labels = ndimage.map_coordinates(labels, coords, order=0, mode="constant")
    moved = np.clip(moved, 0.0, None) * np.exp(smooth(rng.normal(0.0, 0.12, (4, 4, 4)))).astype(np.float32)
    moved = (moved / max(float(moved.max()), 1e-6)) ** rng.uniform(0.85, 1.15)
    return moved.astype(np.float32), moved_labels.astype(np.uint8)


def write_mni152_cohort(folder: str | os.PathLike[str], *, subjects: int, seed: int = 0, voxel_mm: float = 2.0) -> Path:
    """Write a cohort of virtual MNI152 subjects as an nnU-Net v2 raw dataset.

    The template is first resampled to ``voxel_mm`` (the demo cuts 2.8 mm slices, so nothing it
    uses is lost), then each subject is made by :func:`virtual_subject` from its own seed, so the
    cohort is the same on every machine. An existing cohort with the same settings is reused.

    Args:
        folder: Destination; the dataset goes to ``folder/Dataset001_MNI152Cohort``.
        subjects: How many subjects (``sub000`` ...).
        seed: Seed of the cohort; subject ``i`` uses ``(seed, i)``.
        voxel_mm: Isotropic voxel size of the written volumes.

    Returns:
        The dataset folder (``dataset.json``, ``imagesTr/subNNN_0000.nii.gz``, ``labelsTr/subNNN.nii.gz``).
    """
    from nilearn import datasets  # imported here: nilearn is slow to import
    from scipy import ndimage

    root = Path(folder) / "Dataset001_MNI152Cohort"
    meta = {
        "channel_names": {"0": "T1"},
        "labels": {name: i for i, name in enumerate(DEMO_LABEL_NAMES)},
        "numTraining": subjects,
        "file_ending": ".nii.gz",
        "medsynth_cohort": {"template": "MNI152", "subjects": subjects, "seed": seed, "voxel_mm": voxel_mm},
    }
    meta_path = root / "dataset.json"
    if meta_path.is_file() and json.loads(meta_path.read_text(encoding="utf-8")) == meta:
        return root
    template = datasets.load_mni152_template()
    brain = np.asarray(template.get_fdata(), dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template().get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template().get_fdata(), dtype=np.float32)
    labels = mni152_tissue_labels(brain, gm, wm)
    zoom = np.abs(np.diag(template.affine)[:3]) / voxel_mm
    brain, labels = ndimage.zoom(brain, zoom, order=1), ndimage.zoom(labels, zoom, order=0)
    affine = template.affine.copy()
    affine[:3, :3] = affine[:3, :3] / zoom
    for i in range(subjects):
        image, label = virtual_subject(brain, labels, np.random.default_rng([seed, i]), voxel_mm=voxel_mm)
        save_nifti(root / "imagesTr" / f"sub{i:03d}_0000.nii.gz", image, affine, dtype=np.float32)
        save_nifti(root / "labelsTr" / f"sub{i:03d}.nii.gz", label, affine, dtype=np.uint8)
    meta_path.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")  # last: marks the cohort complete
    return root
