"""DICOM-to-dataset throughput: medsynth against MONAI's ``LoadImage(reader="PydicomReader")``.

Builds one CT series of ``--slices`` 512x512 slices from pydicom's real ``CT_small.dcm`` (each
slice the 128x128 scan upsampled 4x and shifted a little, so slices differ), written as a
single-frame DICOM series in a temporary folder. Then, each in a fresh process so that peak memory
is its own, and best of ``--repeats``:

- ``medsynth load``: ``medsynth.io.dicom.load_dicom_series`` on the files (volume + affine);
- ``medsynth dataset``: the whole preprocess of the folder with ``build_dataset`` (header scan,
  series grouping, load, reorientation, resampling, CT window, crop/pad, records written);
- ``monai load``: ``LoadImage(reader="PydicomReader", image_only=True)`` on the folder.

Peak memory is the process's peak resident set size above what it held after imports.

    .venv/bin/python benchmarks/dicom_ingest.py [--slices 240] [--repeats 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_series(folder: Path, slices: int) -> list[Path]:
    """A 512x512 CT series of ``slices`` slices built from pydicom's CT_small.dcm."""
    import pydicom
    from pydicom.data import get_testdata_file

    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    base = np.kron(template.pixel_array, np.ones((4, 4), dtype=template.pixel_array.dtype))
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    series_uid = pydicom.uid.generate_uid()
    for k in range(slices):
        ds = template.copy()
        ds.Rows = ds.Columns = 512
        ds.PixelSpacing = ["0.5", "0.5"]
        ds.SliceThickness = "1.25"
        ds.ImagePositionPatient = ["-128", "-128", f"{1.25 * k:.2f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.PixelData = np.roll(base, k % 16, axis=0).astype(base.dtype).tobytes()
        path = folder / f"IM{k:04d}.dcm"
        ds.save_as(path)
        files.append(path)
    return files


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _measure(method: str, folder: str, out: str) -> tuple[float, float, tuple[int, ...]]:
    """Run one method in this (fresh) process: ``(seconds, peak MiB above the post-import level, shape)``."""
    from monai.transforms import LoadImage

    from medsynth.data.build import build_dataset
    from medsynth.data.case import VolumeSettings
    from medsynth.data.discovery import discover_dicom
    from medsynth.io.dicom import load_dicom_series

    files = sorted(Path(folder).iterdir())
    base = _rss_mib()
    start = time.perf_counter()
    if method == "medsynth load":
        volume, _ = load_dicom_series(files)
        shape = volume.shape
    elif method == "medsynth dataset":
        settings = VolumeSettings(spatial_dims=2, spacing=(1.0, 1.0, 1.25), size=(256, 256), min_foreground=0.0)
        manifest = build_dataset(discover_dicom(folder, salt=b"benchmark", labels="body"), out_dir=out, settings=settings)
        shape = (len(manifest.records),)
    else:
        volume = LoadImage(reader="PydicomReader", image_only=True)(folder)
        shape = tuple(volume.shape)
    return time.perf_counter() - start, _rss_mib() - base, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="medsynth-bench-"))
    try:
        write_series(tmp / "series", args.slices)
        print(f"series: {args.slices} slices of 512x512 int16 (CT_small.dcm upsampled), {sys.platform}")
        results: dict[str, tuple[float, float, tuple[int, ...]]] = {}
        context = multiprocessing.get_context("spawn")
        for method in ("monai load", "medsynth load", "medsynth dataset"):
            best = None
            for r in range(args.repeats):
                with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                    out = str(tmp / f"out_{r}")
                    result = pool.submit(_measure, method, str(tmp / "series"), out).result()
                shutil.rmtree(tmp / f"out_{r}", ignore_errors=True)
                best = result if best is None or result[0] < best[0] else best
            results[method] = best
            seconds, peak, shape = best
            print(f"{method:18s} {seconds:7.3f} s  {args.slices / seconds:8.1f} slices/s  peak +{peak:7.1f} MiB  -> {shape}")
        monai_rate = args.slices / results["monai load"][0]
        for method in ("medsynth load", "medsynth dataset"):
            print(f"ratio {method} / monai load: {args.slices / results[method][0] / monai_rate:.2f}x the slices/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
