"""`python pipelines/run.py [overrides]`: all four stages in order under one MLflow pipeline run.

A shim, the same as `medsynth run`: medsynth.cli.hydra_entry checks the overrides against the
config's schema (one line and exit status 2 on a mistake), then runs the library's stage as a Hydra
job. The stage itself is medsynth.run_pipeline (medsynth/stages/).
"""

from __future__ import annotations

from medsynth.cli import hydra_entry

if __name__ == "__main__":
    hydra_entry("run")()
