"""The preprocessed dataset: cached records, their manifest, splits, datasets and loaders."""

from __future__ import annotations

from medsynth.data.dataset import LabelledArrays, infinite_batches, load_split, step_generator
from medsynth.data.manifest import Manifest, Record, read_manifest, write_record
from medsynth.data.splits import SPLITS, block_splits

__all__ = [
    "SPLITS",
    "LabelledArrays",
    "Manifest",
    "Record",
    "block_splits",
    "infinite_batches",
    "load_split",
    "read_manifest",
    "step_generator",
    "write_record",
]
