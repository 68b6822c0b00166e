"""Fuzzing the ingest: seeded hostile DICOM, NIfTI and attributes-CSV files through the preprocess path.

Mutants are made from the DICOM test corpus (``tests/dicom_corpus.py``), small valid NIfTI images and a
valid attributes table (mutators in ``tests/fuzzing.py``): bit flips, truncations, corrupted length
fields, huge declared dimensions and deflate bombs, wrong VRs, deeply nested sequences, damaged values;
NIfTI bad headers, zero or enormous dimensions, NaN/Inf voxels, zero or non-finite scaling, damaged gzip
streams; CSVs in other encodings, with formula-injection strings, with damaged structure.

Each file is ingested on its own by the library path of ``medsynth preprocess`` (discovery, then
``build_dataset``; ``read_attributes`` for a CSV) in a worker process with a time limit per file and an
address-space limit (RLIMIT_AS: what the imports took plus ``--memory-mb``), at ``data.max_image_gb=0.25``.
Every file must end in the dataset (CSV: accepted) or in ``quarantine.json`` with a one-line reason that
holds no planted identifier (CSV: refused in one line naming the file). The unmutated files run first, in
the same workers, as the baseline (family ``clean``).

Columns: files; in dataset (CSV: accepted); quarantined (CSV: refused); crashes (an exception escaping the
library, or the worker dying); hangs (no answer within ``--timeout``); other failures (a file in neither
place, a reason that is empty, several lines, from a catch-all or holding an identifier); peak RSS of the
worker during one file (MB, the imports take about 500); mean seconds per file. Exits 1 on any failure.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fuzz_ingest.py [--dicom 1050] [--nifti 490] [--csv 320] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzzing import make_clean, make_jobs, markdown, run_jobs, summarise  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run the fuzz and print its table; 1 if any file crashed, hung or was lost."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dicom", type=int, default=1050, help="DICOM mutants (spread over 7 families)")
    parser.add_argument("--nifti", type=int, default=490, help="NIfTI mutants (7 families)")
    parser.add_argument("--csv", type=int, default=320, help="attributes CSV mutants (4 families)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds one file may take")
    parser.add_argument("--memory-mb", type=int, default=1536, help="address space a worker may add to its imports")
    parser.add_argument("--keep", type=Path, default=None, help="write the mutants here and keep them")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="medsynth-fuzz-") as tmp:
        root = args.keep or Path(tmp)
        start = time.perf_counter()
        clean = make_clean(root, corpus_root=root / "_corpus_clean")
        jobs = make_jobs(root, dicom=args.dicom, nifti=args.nifti, csv=args.csv, seed=args.seed)
        made = time.perf_counter() - start
        start = time.perf_counter()
        outcomes = run_jobs([*clean, *jobs], timeout=args.timeout, memory_bytes=args.memory_mb * 1024**2,
                            log=root / "worker.log")
        ran = time.perf_counter() - start
        print(f"seed {args.seed}: {len(jobs)} mutants (+{len(clean)} clean files) made in {made:.1f} s, ingested in "
              f"{ran:.1f} s; limits {args.timeout:g} s per file, {args.memory_mb} MB address space over the imports\n")
        rows = summarise(outcomes)
        print(markdown(rows))
        mutants = [o for o in outcomes if o.job.family != "clean"]
        totals = {key: sum(r[key] for r in rows if r["family"] != "clean")
                  for key in ("files", "in dataset", "quarantined", "crashes", "hangs", "other failures")}
        print("\nmutants in all: " + ", ".join(f"{k} {v}" for k, v in totals.items())
              + f"; peak RSS {max(o.peak_rss for o in mutants) / 2**20:.0f} MB")
        failed = [o for o in outcomes if o.failed]
        for o in failed[:30]:
            print(f"FAILED {o.job.kind}/{o.job.family} {o.job.folder}/{o.job.target} ({o.job.note}): {o.outcome}: "
                  f"{ascii(o.reason[:300])}")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
