"""The ``medsynth <stage> [hydra overrides]`` command."""

from __future__ import annotations

import importlib
import sys

STAGES = ("preprocess", "train", "generate", "evaluate", "run")

USAGE = f"""usage: medsynth <stage> [key=value ...]

stages: {" | ".join(STAGES)}   (run = all four in order)

common overrides:
  experiment=NAME             a preset from conf/experiment (default: demo, CPU demo on MNI152 brain MRI)
  paths.input=DIR             raw scans
  paths.output=DIR            where the run writes everything
  mlflow.tracking_uri=URI     MLflow store (default: sqlite:///mlflow.db in the working directory)
  trainer.max_steps=N  generate.num_samples=N  generate.steps=N

Hydra flags work too, for example `medsynth train --cfg job` prints the composed config.
"""


def main(argv: list[str] | None = None) -> int:
    """Dispatch to ``pipelines.<stage>.main`` with the remaining arguments as Hydra overrides."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    stage, overrides = args[0], args[1:]
    if stage not in STAGES:
        print(f"medsynth: unknown stage {stage!r}; choose one of: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"pipelines.{stage}")
    sys.argv = [f"medsynth-{stage}", *overrides]
    module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
