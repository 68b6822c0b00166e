"""Seconds the demo's generate and evaluate stages take, in two settings side by side, with their figures.

Usage:
    python benchmarks/generate_evaluate.py --output outputs/demo [--repeats 2]
        [--baseline-code DIR] [--set KEY=VALUE ...] [--scores]

``--output`` is a finished ``medsynth run`` (``make demo`` leaves one in ``outputs/demo``): its
``data/`` and ``checkpoints/`` are copied into a fresh folder for every run, which then runs
``medsynth generate`` and ``medsynth evaluate`` as the pipeline does (32 samples, all figures),
each in its own process, with its MLflow store in that folder. Two settings, alternating, the
median of ``--repeats`` runs each:

- ``before``: float32 networks and the membership attacks at 64 records a pass
  (``generate.precision=fp32 evaluate.precision=fp32 evaluate.membership.batch_size=64``); or,
  with ``--baseline-code``, the defaults of that checkout of an earlier commit (put first on
  ``PYTHONPATH``), so that changes no setting switches off (the networks' memory layout) are
  measured too: ``git worktree add /tmp/before 0665f01`` is the commit before these changes;
- ``now``: the defaults of this checkout.

With ``--scores``, it first scores the membership attacks' records of ``--output`` in float32 and
under bf16 autocast in this process, and prints the largest relative difference of a record's
score and each attack's AUC in both.

Printed per setting: each stage's seconds (from its first log line to its last, so without
Python's start-up and imports) and the process's wall seconds, the sum and its ratio to
``before``, and the audit's headline figures from ``evaluation/metrics.json`` (the same samples
and figures must come out of both, within the networks' rounding).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BEFORE = ["generate.precision=fp32", "evaluate.precision=fp32", "evaluate.membership.batch_size=64"]
"""The settings of the ``before`` runs."""

FIGURES = (
    "realism/fid_features_ratio",
    "realism/label_consistency_dice_ratio",
    "privacy/membership_auc",
    "privacy/max_correlation_to_train",
    "utility/dice_synthetic_only_ratio",
)
"""The headline figures printed beside the times."""

_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", re.MULTILINE)


def _stage_seconds(log: str) -> float:
    """Seconds from the first to the last timestamped log line of a stage."""
    stamps = [dt.datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in _STAMP.findall(log)]
    if len(stamps) < 2:
        raise RuntimeError(f"no timestamped log lines in:\n{log[-2000:]}")
    return (stamps[-1] - stamps[0]).total_seconds()


def run_once(source: Path, overrides: list[str], *, code: Path | None) -> dict[str, float]:
    """Generate and evaluate once in a fresh copy of ``source``: stage and process seconds, and the figures."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(prefix="medsynth-bench-") as tmp:
        out = Path(tmp) / "run"
        for part in ("data", "checkpoints"):
            shutil.copytree(source / part, out / part, symlinks=True)
        common = [f"paths.output={out}", f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}", *overrides]
        result: dict[str, float] = {}
        for stage in ("generate", "evaluate"):
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "medsynth.cli", stage, *common], cwd=tmp, env=env,
                                  capture_output=True, text=True)
            result[f"{stage} process s"] = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(f"medsynth {stage} failed ({done.returncode}):\n{done.stderr[-3000:]}")
            result[f"{stage} s"] = _stage_seconds(done.stdout + done.stderr)
        metrics = json.loads((out / "evaluation" / "metrics.json").read_text())["metrics"]
        result.update({name: metrics[name]["value"] for name in FIGURES if name in metrics})
        return result


def compare_scores(output: Path) -> None:
    """The largest relative change of a record's attack score under bf16, and each attack's AUC in fp32 and bf16."""
    import numpy as np

    from medsynth.config import compose
    from medsynth.data import load_split, read_manifest
    from medsynth.diffusion.generator import Generator
    from medsynth.evaluation.instruments import attack_sample, membership_errors
    from medsynth.metrics import roc_auc

    settings = compose([]).evaluate
    generator = Generator.from_checkpoint(output / "checkpoints" / "last.pt")
    manifest = read_manifest(output / "data")
    scores = {}
    for precision in ("fp32", "bf16"):
        for split in ("train", "holdout"):
            data, records = attack_sample(load_split(manifest, split), manifest.split(split),
                                          max_records=settings.membership.max_records, seed=settings.seed)
            scores[precision, split] = membership_errors(generator, data, records, timesteps=settings.membership.timesteps,
                                                         seed=settings.seed, batch_size=settings.membership.batch_size,
                                                         precision=precision)
    for attack in settings.membership.attacks:
        change = max(float(np.max(np.abs(scores["bf16", s][attack] / scores["fp32", s][attack] - 1))) for s in ("train", "holdout"))
        aucs = [roc_auc(-scores[p, "train"][attack], -scores[p, "holdout"][attack]) for p in ("fp32", "bf16")]
        print(f"{attack}: largest relative change of a record's score under bf16 {change:.2e}; "
              f"AUC fp32 {aucs[0]:.4f}, bf16 {aucs[1]:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"), help="a finished medsynth run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline-code", type=Path, default=None, help="checkout the before runs import medsynth from")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both settings")
    parser.add_argument("--scores", action="store_true", help="compare the attacks' scores in fp32 and bf16 first")
    args = parser.parse_args()
    for part in ("data", "checkpoints"):
        if not (args.output / part).is_dir():
            parser.error(f"{args.output / part} is missing: give --output a finished medsynth run (make demo)")
    if args.scores:
        compare_scores(args.output)
    before = list(args.set) if args.baseline_code is not None else [*BEFORE, *args.set]
    settings = {"before": (before, args.baseline_code), "now": (list(args.set), None)}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in settings}
    for repeat in range(args.repeats):
        for name, (overrides, code) in settings.items():
            runs[name].append(run_once(args.output, overrides, code=code))
            print(f"repeat {repeat + 1}, {name}: {json.dumps(runs[name][-1])}", flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    base = median("before", "generate s") + median("before", "evaluate s")
    print("\n| setting | generate s | evaluate s | together | ratio to before | processes s | "
          + " | ".join(f.split("/")[1] for f in FIGURES) + " |")
    print("|---" * (6 + len(FIGURES)) + "|")
    for name in settings:
        together = median(name, "generate s") + median(name, "evaluate s")
        processes = median(name, "generate process s") + median(name, "evaluate process s")
        figures = " | ".join(f"{median(name, f):.4g}" if all(f in r for r in runs[name]) else "-" for f in FIGURES)
        print(f"| {name} | {median(name, 'generate s'):.1f} | {median(name, 'evaluate s'):.1f} | {together:.1f} | "
              f"{together / base:.2f} | {processes:.1f} | {figures} |")


if __name__ == "__main__":
    main()
