"""Stage 1: scans in, cached dataset, ``data/manifest.json`` and ``data/quarantine.json`` out."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from medsynth import ConfigError, MedsynthError
from medsynth.data import Manifest
from medsynth.data.deid import load_salt
from medsynth.data.demo import write_mni152_demo
from medsynth.data.ingest import (
    VolumeSettings,
    build_dataset,
    discover_dicom,
    discover_folder,
    discover_nnunet,
    nifti_pair_case,
    read_attributes,
)
from medsynth.data.preprocess import build_slice_dataset
from medsynth.io import write_json
from medsynth.tracking import Tracker
from pipelines.common import CONFIG_DIR, exit_on_user_error, stage_run

log = logging.getLogger("medsynth")

SOURCES = ("mni152", "nifti", "dicom", "nnunet", "folder")


def _input_pair(cfg: DictConfig) -> tuple[Path, Path]:
    """The image and label files the data config points at (the demo writes its own)."""
    data = cfg.data
    if data.source == "mni152":
        return write_mni152_demo(Path(cfg.paths.output) / "raw")
    base = Path(cfg.paths.input) if cfg.paths.input else Path.cwd()
    return base / str(data.image), base / str(data.label)


def _input_folder(cfg: DictConfig) -> Path:
    if not cfg.paths.input:
        raise ConfigError(f"data={cfg.data.source} reads a folder: set paths.input=DIR")
    folder = Path(cfg.paths.input)
    if not folder.is_dir():
        raise MedsynthError(f"paths.input={folder} is not a folder")
    return folder


def _volume_settings(d: DictConfig) -> VolumeSettings:
    return VolumeSettings(
        spatial_dims=int(d.spatial_dims), spacing=tuple(float(s) for s in d.spacing), size=tuple(int(s) for s in d.size),
        slice_axis=int(d.slice_axis), min_foreground=float(d.min_foreground), margin=int(d.margin),
        intensity=str(d.intensity.mode), lower_percentile=float(d.intensity.lower), upper_percentile=float(d.intensity.upper),
        window=tuple(float(w) for w in d.intensity.window), level_bands=int(d.level_bands),
    )


def _attributes(d: DictConfig) -> dict[str, dict[str, str]] | None:
    a = d.get("attributes")
    if a is None or not a.csv:
        return None
    if not a.key:
        raise ConfigError("data.attributes.key: name the CSV column that identifies each case")
    columns = list(a.columns) if a.columns is not None else None
    return read_attributes(a.csv, key=str(a.key), columns=columns)


def _many_cases(cfg: DictConfig) -> Manifest:
    """DICOM exports, nnU-Net datasets, NIfTI folders, and NIfTI pairs in 3D: one volume per case."""
    d = cfg.data
    settings = _volume_settings(d)
    out_dir = Path(cfg.paths.data)
    if d.source in ("mni152", "nifti"):
        image, label = _input_pair(cfg)
        discovery = nifti_pair_case(image, label, case_id=d.case_id or image.name.split(".")[0],
                                    label_names=list(d.label_names), modality=str(d.modality or ""))
    else:
        root = _input_folder(cfg)
        salt = load_salt(d.deid.salt_file)
        attributes = _attributes(d)
        label_names = list(d.label_names) if d.label_names else None
        modality = str(d.modality) if d.modality else None
        if d.source == "dicom":
            discovery = discover_dicom(
                root, salt=salt, labels=str(d.labels), label_names=label_names, modality=modality, attributes=attributes,
                attribute_match=str(d.attributes.match), exclude=[cfg.paths.output], hash_all_paths=bool(d.deid.hash_all_paths),
                workers=int(d.workers), progress=bool(d.progress),
            )
        elif d.source == "nnunet":
            channel = d.channel if d.channel is not None else 0
            discovery = discover_nnunet(root, salt=salt, channel=channel, attributes=attributes, modality=modality)
        else:
            discovery = discover_folder(root, salt=salt, channel=d.channel, modality=modality, attributes=attributes,
                                        label_names=label_names)
    return build_dataset(
        discovery, out_dir=out_dir, settings=settings, fractions=dict(d.splits.fractions), block=int(d.splits.block),
        gap=int(d.splits.gap), workers=int(d.get("workers", 0) or 0), progress=bool(d.get("progress", False)),
    )


def run(cfg: DictConfig, *, tracker: Tracker | None = None, parent_run_id: str | None = None) -> Manifest:
    """Preprocess the configured scans into ``paths.data``.

    Args:
        cfg: The composed config.
        tracker: Tracker to log to (default: from ``cfg.mlflow``).
        parent_run_id: Pipeline run to nest under.

    Returns:
        The written manifest.
    """
    d = cfg.data
    if d.source not in SOURCES:
        raise ConfigError(f"data.source must be one of {SOURCES}, got {d.source!r}")
    with stage_run(cfg, "preprocess", tracker=tracker, parent_run_id=parent_run_id) as (tracker, run_id):
        if d.source in ("mni152", "nifti") and int(d.spatial_dims) == 2:
            image, label = _input_pair(cfg)
            intensity = str(OmegaConf.select(d, "intensity.mode", default="percentile"))
            if intensity == "auto":
                intensity = "window" if str(OmegaConf.select(d, "modality", default="")).upper() == "CT" else "percentile"
            manifest = build_slice_dataset(
                image, label,
                out_dir=cfg.paths.data, label_names=list(d.label_names), case_id=d.case_id or image.name.split(".")[0],
                spacing=list(d.spacing), size=list(d.size), slice_axis=d.slice_axis, min_foreground=d.min_foreground,
                margin=d.margin, lower_percentile=d.intensity.lower, upper_percentile=d.intensity.upper,
                block=d.splits.block, gap=d.splits.gap, fractions=dict(d.splits.fractions),
                level_bands=d.level_bands, intensity=intensity,
                window=list(OmegaConf.select(d, "intensity.window", default=[-1000, 1000])),
            )
            write_json(manifest.root / "quarantine.json", {"count": 0, "items": []})
        else:
            manifest = _many_cases(cfg)
        counts = manifest.counts()
        log.info("preprocess: %s records %s -> %s", len(manifest.records), counts, manifest.root / "manifest.json")
        tracker.log_metrics(run_id, {f"records_{split}": n for split, n in counts.items()})
        tracker.log_artifact(run_id, manifest.root / "manifest.json", artifact_path="data")
        quarantine = manifest.root / "quarantine.json"
        if quarantine.is_file():
            tracker.log_artifact(run_id, quarantine, artifact_path="data")
        return manifest


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    exit_on_user_error("preprocess", run, cfg)


if __name__ == "__main__":
    main()
