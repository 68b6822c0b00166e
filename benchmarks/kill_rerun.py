"""Kill anywhere, rerun, same result, at many more points than the test suite tries.

Usage:
    python benchmarks/kill_rerun.py [--trials 10] [--stages preprocess train generate evaluate] [--seed 0]
        [--workdir DIR]

Uses the machinery of ``tests/test_kill_rerun.py``: each stage runs as ``medsynth <stage> ...`` in its own
process group (the tiny settings of the tests, on the phantom), uninterrupted once as the reference.
Then each trial SIGKILLs the stage at a moment drawn uniformly (seeded) between 2% and 98% of an
uninterrupted run's duration, checks that nothing half-written looks whole, reruns the same command and
compares every output with the reference (manifests and records byte for byte, checkpoints' step and
weights, synthetic images to float tolerance, metrics.json figures).

Prints a markdown table per stage: trials, killed before the end, reruns that completed, reruns
identical to the reference, trials with a half-written file, median kill moment and rerun time.
Exits 1 if any trial failed.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_kill_rerun import STAGES, Lab, Point  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="kills per stage")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where the trials run (default: a temporary folder)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rng = random.Random(args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="medsynth-kill-rerun-"))
    workdir.mkdir(parents=True, exist_ok=True)
    lab = Lab(workdir)
    rows, failures = [], []
    for stage in args.stages:
        lab.reference(stage)
        timing = workdir / f"timing-{stage}"  # the reference's first run also set up the MLflow store: time a second
        shutil.copytree(lab.start_folder(stage), timing)
        duration = lab.run(stage, timing, tag="timing").seconds
        killed = completed = identical = half = 0
        moments, reruns = [], []
        for i in range(args.trials):
            at = duration * rng.uniform(0.02, 0.98)
            trial = lab.trial(stage, Point(f"t{i}", seconds=at), name=f"bench{i}")
            was_killed = trial.killed.code < 0
            killed += was_killed
            half += bool(trial.half_written)
            done = trial.rerun.code == 0
            completed += done
            differences = trial.differences() if done else ["the rerun failed"]
            identical += not differences
            moments.append(at)
            reruns.append(trial.rerun.seconds)
            if trial.half_written or differences:
                failures.append(f"{stage} killed at {at:.1f} s: {trial.half_written + differences}")
            print(f"{stage} trial {i + 1}/{args.trials}: kill at {at:.1f} s ({'killed' if was_killed else 'had ended'}), "
                  f"rerun {'ok' if done else 'FAILED'}, {'identical' if not differences else differences}", flush=True)
        rows.append((stage, args.trials, killed, completed, identical, half, duration, statistics.median(moments),
                     statistics.median(reruns)))
    print("\n| stage | trials | killed before the end | reruns completed | identical to the reference | half-written "
          "files | reference s | median kill at s | median rerun s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for stage, n, k, c, same, h, ref, at, rerun in rows:
        print(f"| {stage} | {n} | {k} | {c} | {same} | {h} | {ref:.1f} | {at:.1f} | {rerun:.1f} |")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
