"""DICOM-to-dataset throughput: medsynth against MONAI's ``LoadImage(reader="PydicomReader")``.

Builds one CT series of ``--slices`` 512x512 slices from pydicom's real ``CT_small.dcm`` (each
slice the 128x128 scan upsampled 4x and shifted a little, so slices differ), written as a
single-frame DICOM series in a temporary folder. Then, each in a fresh process so that peak memory
is its own, and best of ``--repeats``:

- ``medsynth load``: ``medsynth.io.dicom.load_dicom_series`` on the files (volume + affine);
- ``medsynth dataset``: the whole preprocess of the folder with ``build_dataset`` (header scan,
  series grouping, load, reorientation, resampling, CT window, crop/pad, records written);
- ``medsynth chain``: the same preprocess with the path it had before: MONAI's chain
  (``Orientationd``, ``Spacingd`` over the whole volume, ...) and hole filling over the whole mask;
- ``monai load``: ``LoadImage(reader="PydicomReader", image_only=True)`` on the folder.

Peak memory is the process's peak resident set size above what it held after imports, also given
in volumes (one float32 copy of the series). The records of ``medsynth dataset`` and ``medsynth
chain`` are compared at the end: same record ids, labels and images within float32 tolerance.

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
    elif method in ("medsynth dataset", "medsynth chain"):
        if method == "medsynth chain":
            use_the_chain()
        settings = VolumeSettings(spatial_dims=2, spacing=(1.0, 1.0, 1.25), size=(256, 256), min_foreground=0.0)
        manifest = build_dataset(discover_dicom(folder, salt=b"benchmark", labels="body"), out_dir=out, settings=settings)
        shape = (len(manifest.records),)
    else:
        volume = LoadImage(reader="PydicomReader", image_only=True)(folder)
        shape = tuple(volume.shape)
    return time.perf_counter() - start, _rss_mib() - base, shape


def use_the_chain() -> None:
    """Make this process preprocess as medsynth did before the separable path: the MONAI chain, and hole
    filling over the whole mask in its loaded memory order."""
    from scipy import ndimage

    import medsynth.data.case as case

    def fill_whole(mask: np.ndarray) -> None:
        mask[...] = ndimage.binary_fill_holes(mask)

    case.preprocess_separable = lambda *args, **kwargs: None
    case._fill_holes = fill_whole


def compare_records(a: Path, b: Path) -> tuple[int, float, int]:
    """``(records, largest image difference, label voxels that differ)`` between two data folders."""
    names = sorted(p.name for p in (a / "records").glob("*.npz"))
    if names != sorted(p.name for p in (b / "records").glob("*.npz")):
        raise SystemExit("the two paths wrote different records")
    image_diff, label_diff = 0.0, 0
    for name in names:
        with np.load(a / "records" / name) as x, np.load(b / "records" / name) as y:
            image_diff = max(image_diff, float(np.abs(x["image"] - y["image"]).max()))
            label_diff += int(np.count_nonzero(x["label"] != y["label"]))
    return len(names), image_diff, label_diff


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
        volume_mib = args.slices * 512 * 512 * 4 / 2**20
        methods = ("monai load", "medsynth load", "medsynth dataset", "medsynth chain")
        for method in methods:
            best = None
            for r in range(args.repeats):
                out = tmp / f"{method.replace(' ', '_')}_{r}"
                with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                    result = pool.submit(_measure, method, str(tmp / "series"), str(out)).result()
                if r > 0:
                    shutil.rmtree(out, ignore_errors=True)
                best = result if best is None or result[0] < best[0] else best
            results[method] = best
            seconds, peak, shape = best
            print(f"{method:18s} {seconds:7.3f} s  {args.slices / seconds:8.1f} slices/s  "
                  f"peak +{peak:7.1f} MiB ({peak / volume_mib:.2f} volumes)  -> {shape}")
        monai_rate = args.slices / results["monai load"][0]
        for method in methods[1:]:
            print(f"ratio {method} / monai load: {args.slices / results[method][0] / monai_rate:.2f}x the slices/s")
        print(f"ratio medsynth dataset / medsynth chain: {results['medsynth chain'][0] / results['medsynth dataset'][0]:.2f}x the speed")
        count, image_diff, label_diff = compare_records(tmp / "medsynth_dataset_0", tmp / "medsynth_chain_0")
        print(f"records: {count} from both paths; largest image difference {image_diff:.2e}, label voxels that differ {label_diff}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
