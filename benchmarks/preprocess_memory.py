"""Peak memory of preprocess on one large DICOM series, against a small series of the same geometry.

Usage:
    python benchmarks/preprocess_memory.py [--slices 2048] [--baseline-slices 128] [--size 512]
        [--workdir DIR] [--keep]

Writes two synthetic MR series (a smooth phantom with texture, 16-bit pixels, ``--size`` squared,
one file per slice): the large one of ``--slices`` slices (2048 x 512 x 512 x 2 bytes = 1 GiB of
pixel data by default) and a baseline of ``--baseline-slices``. Each is preprocessed by
``medsynth preprocess data=dicom`` (body-mask labels, 2D records) in a fresh process, and the
table reports, per series: its pixel bytes, the process's peak resident memory (``ru_maxrss`` of
the child), the peak above the baseline's, that excess per byte of pixel data, records written
and seconds. Bounded memory means the excess grows linearly with the series, by a small factor:
the volume is held as float32 (2 bytes per 16-bit pixel byte) with its label map, the body mask's
working arrays and one float32 copy while it is resampled; no step copies it in float64. A series
over ``data.max_image_gb`` is refused from its headers before any of this is allocated.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_series(folder: Path, *, slices: int, size: int, seed: int = 0) -> int:
    """A synthetic MR series of ``slices`` slices under ``folder``, one file per slice, written a slice at a
    time (the first by medsynth's DICOM writer, the rest as copies of it with their own pixels, position and
    UIDs); its pixel bytes."""
    import pydicom
    from pydicom.uid import generate_uid

    from medsynth.io.dicom_write import write_image_series

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size)] * 2, indexing="ij"))
    z = np.linspace(-1, 1, slices)
    affine = np.diag([0.5, 0.5, 1.0, 1.0])

    def pixels(k: int) -> np.ndarray:
        r = np.sqrt((grid**2).sum(0) + z[k] ** 2)
        image = np.where(r < 0.8, 0.6, 0.0) + np.where(r < 0.5, 0.3, 0.0) + 0.02 * rng.standard_normal((size, size))
        return image.astype(np.float32)

    first = write_image_series(pixels(0)[:, :, None], affine, folder / "template", sample_id="big",
                               series_description="large series", intensity_range=(-0.2, 1.2))[0]
    ds = pydicom.dcmread(first)
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    origin = [float(v) for v in ds.ImagePositionPatient]
    for k in range(slices):
        stored = np.clip(np.round((pixels(k) - intercept) / slope), 0, 65535).astype(np.uint16)
        ds.PixelData = stored.T.tobytes()  # rows are the second array axis, as the writer stores them
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + float(k)]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / f"slice{k:05d}.dcm", enforce_file_format=True)
    shutil.rmtree(folder / "template")
    return slices * size * size * 2


def preprocess(folder: Path, out: Path) -> tuple[float, int, float]:
    """``medsynth preprocess`` on ``folder`` in a child process: (peak RSS in MiB, records, seconds)."""
    args = [sys.executable, "-m", "medsynth.cli", "preprocess", "data=dicom", "data.labels=body",
            f"paths.input={folder}", f"paths.output={out}", f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}",
            "progress=false", "data.size=[128,128]", "data.spacing=[2.0,2.0,2.0]"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, cwd=out.parent)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if done.returncode != 0:
        sys.exit(f"preprocess failed on {folder}:\n{done.stderr[-3000:]}")
    if peak <= before:
        sys.exit("cannot tell this child's peak from an earlier one's: the larger series must run after the smaller")
    records = len(json.loads((out / "data" / "manifest.json").read_text())["records"])
    return peak / 1024, records, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=2048)
    parser.add_argument("--baseline-slices", type=int, default=128)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the written series")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="medsynth-preprocess-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        # ru_maxrss of the children is a running maximum: the baseline runs first, so the large run's peak is its own
        for name, slices in (("baseline", args.baseline_slices), ("large", args.slices)):
            series = work / f"{name}-series"
            t = time.perf_counter()
            pixel_bytes = write_series(series, slices=slices, size=args.size)
            print(f"{name}: wrote {slices} slices ({pixel_bytes / 2**30:.2f} GiB of pixels) in "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
            peak, records, seconds = preprocess(series, work / f"{name}-out")
            rows.append((name, slices, pixel_bytes, peak, records, seconds))
            print(f"{name}: peak RSS {peak:.0f} MiB, {records} records, {seconds:.0f} s", flush=True)
            if not args.keep:
                shutil.rmtree(series)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    base = next(r for r in rows if r[0] == "baseline")
    print(f"\nDICOM series {args.size}x{args.size}, 16-bit; preprocess data=dicom data.labels=body, 2D records at 128x128")
    print("| series | slices | pixel data MiB | peak RSS MiB | above the baseline MiB | excess per pixel byte | records | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, slices, pixel_bytes, peak, records, seconds in rows:
        excess = peak - base[3]
        extra = max(pixel_bytes - base[2], 1)
        per_byte = f"{excess * 2**20 / extra:.2f}" if name != "baseline" else "-"
        print(f"| {name} | {slices} | {pixel_bytes / 2**20:.0f} | {peak:.0f} | {excess:.0f} | {per_byte} | {records} | "
              f"{seconds:.0f} |")


if __name__ == "__main__":
    main()
