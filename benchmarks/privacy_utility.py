"""What differential privacy costs on the demo data: realism, attacks, memorisation, utility, time.

Usage:
    python benchmarks/privacy_utility.py [--subjects 30] [--steps 400] [--epsilons 1 8]
        [--out outputs/privacy_utility] [--set KEY=VALUE ...]

One cohort of virtual subjects (``data=demo_cohort``) is preprocessed once; then, for each
setting (no DP, and patient-level DP-SGD at each epsilon), the same preset is trained, generated
and evaluated into its own output folder, each stage a fresh process as a user would run it.
DP needs at least ``trainer.privacy.min_patients`` training patients, hence the larger cohort.

The table gives, per setting: the verdict, the feature Fréchet-distance ratio to the real-vs-real
reference, both membership attacks' AUC and TPR at 1% FPR, the memorised count, the utility Dice
of a segmenter trained on real plus synthetic data, and training seconds with their ratio to the
run without DP (measured in the same invocation, one after the other).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

COLUMNS = [
    ("verdict", None),
    ("FD ratio", "realism/fid_features_ratio"),
    ("AUC loss", "privacy/membership_auc_loss"),
    ("AUC PIA", "privacy/membership_auc_pia"),
    ("TPR@1% loss", "privacy/membership_tpr_at_1pct_fpr_loss"),
    ("TPR@1% PIA", "privacy/membership_tpr_at_1pct_fpr_pia"),
    ("memorised", "privacy/memorised_count"),
    ("Dice real", "utility/dice_real_only"),
    ("Dice real+synthetic", "utility/dice_real_plus_synthetic"),
]


def stage(name: str, overrides: list[str]) -> float:
    """Run ``pipelines/<name>.py`` with ``overrides`` in a fresh process; its wall-clock seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / "pipelines" / f"{name}.py"), *overrides],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed ({' '.join(overrides)}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def run_setting(label: str, extra: list[str], *, common: list[str], out: Path, data: Path) -> dict[str, Any]:
    """Train, generate and evaluate one setting into ``out/label``; its figures and seconds."""
    overrides = [*common, f"paths.output={out / label}", f"paths.data={data}",
                 f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}", *extra]
    seconds = {name: stage(name, overrides) for name in ("train", "generate", "evaluate")}
    body = json.loads((out / label / "evaluation" / "metrics.json").read_text())
    figures = {name: entry.get("value") for name, entry in body["metrics"].items()}
    epsilon = (body.get("differential_privacy") or {}).get("epsilon")
    print(f"  {label}: verdict {'PASS' if body['verdict']['passed'] else 'FAIL'}, "
          f"train {seconds['train']:.0f} s", flush=True)
    return {"label": label, "epsilon": epsilon, "passed": body["verdict"]["passed"],
            "failed": body["verdict"]["failed_groups"], "figures": figures, "seconds": seconds}


def cell(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table; training time is divided by the no-DP run's."""
    base = next(r["seconds"]["train"] for r in rows if r["epsilon"] is None)
    head = ["setting", "epsilon", *[name for name, _ in COLUMNS], "train s", "train / no DP"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        verdict = "PASS" if r["passed"] else f"FAIL ({', '.join(r['failed'])})"
        values = [verdict if key is None else cell(r["figures"].get(key)) for _, key in COLUMNS]
        train = r["seconds"]["train"]
        lines.append("| " + " | ".join([r["label"], cell(r["epsilon"]), *values, f"{train:.0f}",
                                        f"{train / base:.2f}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=30, help="virtual subjects in the demo cohort")
    parser.add_argument("--steps", type=int, default=400, help="trainer.max_steps of every setting")
    parser.add_argument("--epsilons", type=float, nargs="*", default=[1.0, 8.0], help="DP targets (no DP always runs)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "privacy_utility")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every setting (repeatable)")
    args = parser.parse_args()

    out = args.out.resolve()
    common = ["data=demo_cohort", f"data.subjects={args.subjects}", f"trainer.max_steps={args.steps}",
              "progress=false", *args.extra]
    base = out / "base"
    data = base / "data"
    print(f"preprocess: {args.subjects} virtual subjects into {data}", flush=True)
    prep = stage("preprocess", [*common, f"paths.output={base}", f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}"])
    print(f"  {prep:.0f} s", flush=True)

    settings = [("no DP", [])] + [(f"DP eps={eps:g}", ["trainer.privacy=dp", f"trainer.privacy.target_epsilon={eps}"])
                                  for eps in args.epsilons]
    rows = [run_setting(label.replace(" ", "_").replace("=", ""), extra, common=common, out=out, data=data)
            for label, extra in settings]
    print()
    print(f"data=demo_cohort data.subjects={args.subjects}, trainer.max_steps={args.steps}"
          + (f", {' '.join(args.extra)}" if args.extra else ""))
    print(table(rows))


if __name__ == "__main__":
    main()
