"""`python pipelines/train.py [overrides]`: the cached dataset in; a trained conditional diffusion model (checkpoints/last.pt) out.

A shim, the same as `medsynth train`: medsynth.cli.hydra_entry checks the overrides against the
config's schema (one line and exit status 2 on a mistake), then runs the library's stage as a Hydra
job. The stage itself is medsynth.train (medsynth/stages/).
"""

from __future__ import annotations

from medsynth.cli import hydra_entry

if __name__ == "__main__":
    hydra_entry("train")()
