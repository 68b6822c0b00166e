"""Reading and writing scans and outputs; the only place nibabel and pydicom are imported."""

from __future__ import annotations

from medsynth.io.atomic import DiskFullError, atomic_path, remove_temporaries, write_json, write_text
from medsynth.io.lock import output_lock
from medsynth.io.nifti import load_nifti, save_nifti
from medsynth.io.png import colorize_labels, display_slice, picture_sheet, save_png

__all__ = [
    "DiskFullError",
    "atomic_path",
    "colorize_labels",
    "display_slice",
    "load_nifti",
    "output_lock",
    "picture_sheet",
    "remove_temporaries",
    "save_nifti",
    "save_png",
    "write_json",
    "write_text",
]
