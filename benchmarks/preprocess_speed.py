"""Preprocessing time of the demo cohort, 2D and 3D: the separable path against the MONAI chain.

The demo's input is an nnU-Net v2 raw dataset of ``--subjects`` virtual subjects made from the MNI152
template (``data=demo_cohort``), written once. Each measurement is the whole preprocess of that folder
(discovery, load, reorientation, resampling, intensity scaling, crop/pad, records and manifest written)
in a fresh process, best of ``--repeats``, with:

- ``separable``: medsynth's path (:mod:`medsynth.transforms.grid`);
- ``chain``: the path it had before, MONAI's ``Orientationd``/``Spacingd``/... chain over each volume.

Two settings: the demo's own (``experiment=demo``: 2D slices of 64x64), and the same cohort as 3D
volumes (``data.spatial_dims=3 data.size=[64,64,64]``). The records of both paths are compared.

    .venv/bin/python benchmarks/preprocess_speed.py [--subjects 12] [--repeats 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_ingest import compare_records, use_the_chain  # noqa: E402 - same folder

SETTINGS = {
    "demo 2D": ["experiment=demo"],
    "cohort 3D": ["experiment=demo", "data.spatial_dims=3", "data.size=[64,64,64]"],
}


def _measure(overrides: list[str], path: str, raw: str, out: str) -> tuple[float, int]:
    """One preprocess in this (fresh) process: ``(seconds, records)``."""
    from medsynth.cli import compose
    from medsynth.data.build import build_dataset
    from medsynth.data.discovery import discover_nnunet
    from medsynth.stages.preprocess import volume_settings

    if path == "chain":
        use_the_chain()
    cfg = compose(overrides).data
    start = time.perf_counter()
    manifest = build_dataset(
        discover_nnunet(raw, salt=b"benchmark", channel=0), out_dir=out, settings=volume_settings(cfg),
        fractions=dict(cfg.splits.fractions), block=cfg.splits.block, gap=cfg.splits.gap,
    )
    seconds = time.perf_counter() - start
    return seconds, len(manifest.records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from medsynth.data.demo import write_mni152_cohort

    tmp = Path(tempfile.mkdtemp(prefix="medsynth-bench-"))
    try:
        raw = write_mni152_cohort(tmp / "raw", subjects=args.subjects)
        print(f"input: {args.subjects} virtual subjects (nnU-Net raw dataset), {sys.platform}")
        context = multiprocessing.get_context("spawn")
        for name, overrides in SETTINGS.items():
            seconds = {}
            for path in ("separable", "chain"):
                best = None
                for r in range(args.repeats):
                    out = tmp / f"{name.replace(' ', '_')}_{path}_{r}"
                    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                        result = pool.submit(_measure, overrides, path, str(raw), str(out)).result()
                    if r > 0:
                        shutil.rmtree(out, ignore_errors=True)
                    best = result if best is None or result[0] < best[0] else best
                seconds[path] = best[0]
                print(f"{name:10s} {path:9s} {best[0]:7.3f} s  {best[1]} records")
            count, image_diff, label_diff = compare_records(tmp / f"{name.replace(' ', '_')}_separable_0",
                                                            tmp / f"{name.replace(' ', '_')}_chain_0")
            print(f"{name:10s} separable / chain: {seconds['chain'] / seconds['separable']:.2f}x the speed; {count} records, "
                  f"largest image difference {image_diff:.2e}, label voxels that differ {label_diff}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
