"""Thin Hydra pipelines, one module per stage: `run(cfg)` wires library objects from the config."""
