"""The preprocessed dataset: cached records, their manifest, splits, datasets and loaders.

Building it is three steps, one module each: :mod:`~medsynth.data.discovery` finds the cases of
an input (DICOM export, nnU-Net dataset, NIfTI folder or one NIfTI pair),
:mod:`~medsynth.data.case` turns one case into records, and :mod:`~medsynth.data.build` runs
every case (cached, optionally in workers), assigns splits and writes the manifest and the
quarantine. Those names are exported here too, imported on first use (they load MONAI).
"""

from __future__ import annotations

from typing import Any

from medsynth.data.dataset import LabelledArrays, infinite_batches, load_split, step_generator
from medsynth.data.manifest import Manifest, Record, read_manifest, write_record
from medsynth.data.splits import SPLITS, block_splits

_BUILDING = {
    "CaseSpec": "discovery",
    "Discovery": "discovery",
    "discover_dicom": "discovery",
    "discover_folder": "discovery",
    "discover_nnunet": "discovery",
    "nifti_pair_case": "discovery",
    "read_attributes": "discovery",
    "CaseError": "case",
    "VolumeSettings": "case",
    "load_case": "case",
    "process_case": "case",
    "build_dataset": "build",
}


def __getattr__(name: str) -> Any:
    """The dataset-building names, imported on first use."""
    if name in _BUILDING:
        import importlib

        return getattr(importlib.import_module(f"medsynth.data.{_BUILDING[name]}"), name)
    raise AttributeError(f"module 'medsynth.data' has no attribute {name!r}")


__all__ = [
    "SPLITS",
    "CaseError",
    "CaseSpec",
    "Discovery",
    "LabelledArrays",
    "Manifest",
    "Record",
    "VolumeSettings",
    "block_splits",
    "build_dataset",
    "discover_dicom",
    "discover_folder",
    "discover_nnunet",
    "infinite_batches",
    "load_case",
    "load_split",
    "nifti_pair_case",
    "process_case",
    "read_attributes",
    "read_manifest",
    "step_generator",
    "write_record",
]
