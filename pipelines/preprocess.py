"""Stage 1: scans in, cached dataset and ``data/manifest.json`` out."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from medsynth import ConfigError
from medsynth.data import Manifest
from medsynth.data.demo import write_mni152_demo
from medsynth.data.preprocess import build_slice_dataset
from medsynth.tracking import Tracker
from pipelines.common import CONFIG_DIR, exit_on_user_error, stage_run

log = logging.getLogger("medsynth")


def _input_pair(cfg: DictConfig) -> tuple[Path, Path]:
    """The image and label files the data config points at (the demo writes its own)."""
    data = cfg.data
    if data.source == "mni152":
        return write_mni152_demo(Path(cfg.paths.output) / "raw")
    if data.source != "nifti":
        raise ConfigError(f"data.source must be 'nifti' or 'mni152', got {data.source!r}")
    base = Path(cfg.paths.input) if cfg.paths.input else Path.cwd()
    return base / str(data.image), base / str(data.label)


def run(cfg: DictConfig, *, tracker: Tracker | None = None, parent_run_id: str | None = None) -> Manifest:
    """Preprocess the configured scans into ``paths.data``.

    Args:
        cfg: The composed config.
        tracker: Tracker to log to (default: from ``cfg.mlflow``).
        parent_run_id: Pipeline run to nest under.

    Returns:
        The written manifest.
    """
    with stage_run(cfg, "preprocess", tracker=tracker, parent_run_id=parent_run_id) as (tracker, run_id):
        image, label = _input_pair(cfg)
        d = cfg.data
        manifest = build_slice_dataset(
            image, label,
            out_dir=cfg.paths.data, label_names=list(d.label_names), case_id=d.case_id or image.name.split(".")[0],
            spacing=list(d.spacing), size=list(d.size), slice_axis=d.slice_axis, min_foreground=d.min_foreground,
            margin=d.margin, lower_percentile=d.intensity.lower, upper_percentile=d.intensity.upper,
            block=d.splits.block, gap=d.splits.gap, fractions=dict(d.splits.fractions),
            level_bands=d.level_bands,
        )
        counts = manifest.counts()
        log.info("preprocess: %s records %s -> %s", len(manifest.records), counts, manifest.root / "manifest.json")
        tracker.log_metrics(run_id, {f"records_{split}": n for split, n in counts.items()})
        tracker.log_artifact(run_id, manifest.root / "manifest.json", artifact_path="data")
        return manifest


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    exit_on_user_error("preprocess", run, cfg)


if __name__ == "__main__":
    main()
