"""Stage 1: scans in, cached dataset, ``data/manifest.json``, ``data/quarantine.json`` and
``data/lineage.json`` (this run's MLflow id and the manifest's SHA-256, for train's lineage) out.

Every source takes the same path: discover its cases (:mod:`medsynth.data.discovery`; the demo and
``data=nifti`` are one case), then :func:`medsynth.data.build.build_dataset` preprocesses them,
assigns splits and writes the manifest and the quarantine.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medsynth import ConfigError, MedsynthError
from medsynth.config.schema import to_mapping
from medsynth.config.settings import DataSettings, RunSettings
from medsynth.data import Manifest
from medsynth.data.build import build_dataset
from medsynth.data.case import VolumeSettings
from medsynth.data.deid import load_salt
from medsynth.data.demo import write_mni152_cohort, write_mni152_demo
from medsynth.data.discovery import (
    Discovery,
    discover_dicom,
    discover_folder,
    discover_nnunet,
    nifti_pair_case,
    read_attributes,
)
from medsynth.evaluation.provenance import LINEAGE, file_sha256, write_data_lineage
from medsynth.stages.context import stage_run
from medsynth.tracking import TrackerLike

log = logging.getLogger("medsynth")

SOURCES = ("mni152", "mni152_cohort", "nifti", "dicom", "nnunet", "folder")


def preprocess(
    *,
    settings: DataSettings,
    run: RunSettings,
    tracker: TrackerLike | None = None,
    parent_run_id: str | None = None,
) -> Manifest:
    """Preprocess the configured scans into ``run.paths.data``.

    Args:
        settings: What to read and how to cut it into records (``conf/data``).
        run: The run's folders, progress display and tracker settings.
        tracker: Tracker to log to (default: from ``run.mlflow``).
        parent_run_id: Pipeline run to nest under.

    Returns:
        The written manifest.

    Raises:
        ConfigError: On a setting that does not fit the input.
        MedsynthError: If the input cannot be read or no case makes it into the dataset.
    """
    if settings.source not in SOURCES:
        raise ConfigError(f"data.source must be one of {SOURCES}, got {settings.source!r}")
    config = {"data": to_mapping(settings)}
    with stage_run(run, "preprocess", config, tracker=tracker, parent_run_id=parent_run_id) as (tracker, run_id):
        manifest = build_dataset(
            _discover(settings, run), out_dir=Path(run.paths.data), settings=volume_settings(settings),
            fractions=dict(settings.splits.fractions), block=settings.splits.block, gap=settings.splits.gap,
            workers=settings.workers, progress=run.progress,
        )
        counts = manifest.counts()
        log.info("preprocess: %s records %s -> %s", len(manifest.records), counts, manifest.root / "manifest.json")
        tracker.log_metrics(run_id, {f"records_{split}": n for split, n in counts.items()})
        tracker.log_artifact(run_id, manifest.root / "manifest.json", artifact_path="data")
        data_hash = file_sha256(manifest.root / "manifest.json")
        tracker.set_tags(run_id, {f"{LINEAGE}data_manifest_sha256": data_hash})
        write_data_lineage(manifest.root, preprocess_run_id=run_id, data_manifest_sha256=data_hash)
        quarantine = manifest.root / "quarantine.json"
        if quarantine.is_file():
            tracker.log_artifact(run_id, quarantine, artifact_path="data")
        return manifest


def volume_settings(settings: DataSettings) -> VolumeSettings:
    """How each case becomes records, from the data settings."""
    i = settings.intensity
    return VolumeSettings(
        spatial_dims=settings.spatial_dims, spacing=tuple(float(s) for s in settings.spacing),
        size=tuple(int(s) for s in settings.size), slice_axis=settings.slice_axis,
        min_foreground=float(settings.min_foreground), margin=settings.margin, intensity=i.mode,
        lower_percentile=float(i.lower), upper_percentile=float(i.upper),
        window=(float(i.window[0]), float(i.window[1])), level_bands=settings.level_bands,
        max_image_bytes=image_bytes(settings),
    )


def image_bytes(settings: DataSettings) -> int:
    """``data.max_image_gb`` in bytes."""
    return int(settings.max_image_gb * 1e9)


def _input_pair(settings: DataSettings, run: RunSettings) -> tuple[Path, Path]:
    """The image and label files the data settings point at (the demo writes its own)."""
    if settings.source == "mni152":
        return write_mni152_demo(Path(run.paths.output) / "raw")
    base = Path(run.paths.input) if run.paths.input else Path.cwd()
    return base / str(settings.image), base / str(settings.label)


def _input_folder(settings: DataSettings, run: RunSettings) -> Path:
    if not run.paths.input:
        raise ConfigError(f"data={settings.source} reads a folder: set paths.input=DIR")
    folder = Path(run.paths.input)
    if not folder.is_dir():
        raise MedsynthError(f"paths.input={folder} is not a folder")
    return folder


def _attributes(settings: DataSettings) -> dict[str, dict[str, str]] | None:
    a = settings.attributes
    if not a.csv:
        return None
    return read_attributes(a.csv, key=str(a.key), columns=list(a.columns) if a.columns is not None else None)


def _case_id(settings: DataSettings, image: Path) -> str:
    return settings.case_id or image.name.split(".")[0]


def _discover(settings: DataSettings, run: RunSettings) -> Discovery:
    """The cases to preprocess: one per DICOM series, nnU-Net case (the demo cohort is written as one) or NIfTI
    file, or the one NIfTI pair."""
    if settings.source in ("mni152", "nifti"):
        image, label = _input_pair(settings, run)
        return nifti_pair_case(image, label, case_id=_case_id(settings, image), label_names=list(settings.label_names or []),
                               modality=settings.modality or "", source=settings.source)
    root = (write_mni152_cohort(Path(run.paths.output) / "raw", subjects=settings.subjects)
            if settings.source == "mni152_cohort" else _input_folder(settings, run))
    salt = load_salt(settings.deid.salt_file or f"{run.paths.output}/secret/salt")
    attributes = _attributes(settings)
    label_names = list(settings.label_names) if settings.label_names else None
    modality = settings.modality or None
    if settings.source == "dicom":
        return discover_dicom(
            root, salt=salt, labels=settings.labels, label_names=label_names, modality=modality, attributes=attributes,
            attribute_match=settings.attributes.match, exclude=[run.paths.output],
            hash_all_paths=settings.deid.hash_all_paths, workers=settings.workers, progress=run.progress,
            max_bytes=image_bytes(settings),
        )
    if settings.source in ("nnunet", "mni152_cohort"):
        channel = settings.channel if settings.channel is not None else 0
        return discover_nnunet(root, salt=salt, channel=channel, attributes=attributes, modality=modality)
    channel = settings.channel
    if isinstance(channel, str):
        if not channel.isdigit():
            raise ConfigError(f"data.channel must be a volume index for data=folder, got {channel!r}")
        channel = int(channel)
    return discover_folder(root, salt=salt, channel=channel, modality=modality, attributes=attributes,
                           label_names=label_names)
