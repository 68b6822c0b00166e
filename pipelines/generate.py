"""`python pipelines/generate.py [overrides]`: a trained model in; a labelled synthetic dataset and synthetic/manifest.csv out.

A shim, the same as `medsynth generate`: medsynth.cli.hydra_entry checks the overrides against the
config's schema (one line and exit status 2 on a mistake), then runs the library's stage as a Hydra
job. The stage itself is medsynth.generate (medsynth/stages/).
"""

from __future__ import annotations

from medsynth.cli import hydra_entry

if __name__ == "__main__":
    hydra_entry("generate")()
