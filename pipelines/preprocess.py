"""`python pipelines/preprocess.py [overrides]`: scans in; the cached dataset, data/manifest.json and data/quarantine.json out.

A shim, the same as `medsynth preprocess`: medsynth.cli.hydra_entry checks the overrides against the
config's schema (one line and exit status 2 on a mistake), then runs the library's stage as a Hydra
job. The stage itself is medsynth.preprocess (medsynth/stages/).
"""

from __future__ import annotations

from medsynth.cli import hydra_entry

if __name__ == "__main__":
    hydra_entry("preprocess")()
