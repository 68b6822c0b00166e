"""`python pipelines/evaluate.py [overrides]`: the synthetic set and the real splits in; realism, privacy and utility figures, a verdict and a report out.

A shim, the same as `medsynth evaluate`: medsynth.cli.hydra_entry checks the overrides against the
config's schema (one line and exit status 2 on a mistake), then runs the library's stage as a Hydra
job. The stage itself is medsynth.evaluate (medsynth/stages/).
"""

from __future__ import annotations

from medsynth.cli import hydra_entry

if __name__ == "__main__":
    hydra_entry("evaluate")()
