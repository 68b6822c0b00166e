"""Stage 1: scans in, cached dataset, ``data/manifest.json``, ``data/quarantine.json`` and
``data/lineage.json`` (this run's MLflow id and the manifest's SHA-256, for train's lineage) out.

Every source takes the same path: discover its cases (:mod:`medsynth.data.discovery`; the demo and
``data=nifti`` are one case), then :func:`medsynth.data.build.build_dataset` preprocesses them,
assigns splits and writes the manifest and the quarantine. ``data=dicomweb`` first retrieves the
series a search on a DICOMweb server finds into ``data.dicomweb.folder``
(:mod:`medsynth.io.dicomweb`), then ingests that folder exactly as a folder export (``data=dicom``);
unless ``data.dicomweb.keep`` is set, the retrieved files are deleted once the manifest is written.

``data.shard=K/N`` cuts that in two for large inputs: N processes (a SLURM array) each preprocess the
patients of one shard (:func:`medsynth.data.build.build_shard`), then ``data.shard=merge`` assigns the
splits and writes the manifest (:func:`medsynth.data.build.merge_shards`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from medsynth import ConfigError, MedsynthError
from medsynth.config.schema import to_mapping
from medsynth.config.settings import DataSettings, RunSettings, Shard, parse_shard
from medsynth.data import Manifest
from medsynth.data.build import (
    ShardResult,
    build_dataset,
    build_shard,
    merge_shards,
    shard_count,
    shard_folder,
    shard_folders,
)
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
from medsynth.io.dicomweb import discard_folder
from medsynth.io.lock import LOCK_NAME, output_lock, read_holder
from medsynth.stages.context import (
    check_folders,
    log_config,
    make_tracker,
    stage_run,
    stage_tags,
)
from medsynth.tracking import TrackerLike

log = logging.getLogger("medsynth")

SOURCES = ("mni152", "mni152_cohort", "nifti", "dicom", "nnunet", "folder", "dicomweb")


def preprocess(
    *,
    settings: DataSettings,
    run: RunSettings,
    tracker: TrackerLike | None = None,
    parent_run_id: str | None = None,
) -> Manifest | ShardResult:
    """Preprocess the configured scans into ``run.paths.data``.

    With ``data.shard=K/N`` only the cases of the patients in shard K are preprocessed and no manifest
    is written, only the shard's result (``data/shards/K-of-N/result.json``); ``data.shard=merge``
    (or ``merge/N``) then writes the manifest from all N results, the same one a single run writes
    (docs/data-ingest.md, "Sharded preprocessing").

    Args:
        settings: What to read and how to cut it into records (``conf/data``).
        run: The run's folders, progress display and tracker settings.
        tracker: Tracker to log to (default: from ``run.mlflow``).
        parent_run_id: Pipeline run to nest under.

    Returns:
        The written manifest; for one shard, what the shard did (:class:`~medsynth.data.build.ShardResult`).

    Raises:
        ConfigError: On a setting that does not fit the input.
        MedsynthError: If the input cannot be read, no case makes it into the dataset, the same shard is
            being preprocessed by another run, or a merge finds a shard missing or not fitting.
    """
    if settings.source not in SOURCES:
        raise ConfigError(f"data.source must be one of {SOURCES}, got {settings.source!r}")
    shard = parse_shard(settings.shard)
    config = {"data": to_mapping(settings)}
    if shard is not None and not shard.merge:
        if parent_run_id is not None:
            raise ConfigError(
                f"data.shard={shard.label} preprocesses one shard and writes no manifest, so the stages "
                "after it would have no dataset: run the shards with `medsynth preprocess`, then "
                "merge them (data.shard=merge) before training"
            )
        return _preprocess_shard(settings, run, shard, config, tracker=tracker)
    with stage_run(run, "preprocess", config, tracker=tracker, parent_run_id=parent_run_id) as (active, run_id):
        data = Path(run.paths.data)
        if shard is not None:
            active.set_tags(run_id, {SHARD_TAG: shard.label})
        _require_no_running_shard(
            data,
            "a merge" if shard is not None else "preprocessing the whole input",
            stage="preprocess" if shard is None else f"preprocess data.shard={shard.label}",
        )
        count = None
        if shard is not None:
            count = shard.count if shard.count is not None else shard_count(data)
            if shard.count is None:
                active.set_tags(run_id, {SHARD_TAG: f"merge/{count}"})
        discovery = _discover(settings, run, log_metrics=lambda metrics: active.log_metrics(run_id, metrics))
        fractions, splits = dict(settings.splits.fractions), settings.splits
        if count is None:
            manifest = build_dataset(
                discovery,
                out_dir=data,
                settings=volume_settings(settings),
                fractions=fractions,
                block=splits.block,
                gap=splits.gap,
                workers=settings.workers,
                progress=run.progress,
            )
        else:
            manifest = merge_shards(
                discovery,
                out_dir=data,
                settings=volume_settings(settings),
                count=count,
                fractions=fractions,
                block=splits.block,
                gap=splits.gap,
            )
        counts = manifest.counts()
        log.info("preprocess: %s records %s -> %s", len(manifest.records), counts, manifest.root / "manifest.json")
        active.log_metrics(run_id, {f"records_{split}": n for split, n in counts.items()})
        active.log_artifact(run_id, manifest.root / "manifest.json", artifact_path="data")
        data_hash = file_sha256(manifest.root / "manifest.json")
        active.set_tags(run_id, {f"{LINEAGE}data_manifest_sha256": data_hash})
        write_data_lineage(manifest.root, preprocess_run_id=run_id, data_manifest_sha256=data_hash)
        quarantine = manifest.root / "quarantine.json"
        if quarantine.is_file():
            active.log_artifact(run_id, quarantine, artifact_path="data")
        if settings.source == "dicomweb" and not settings.dicomweb.keep:
            folder = dicomweb_folder(settings, run)
            log.info(
                "preprocess: deleted the %d retrieved file(s) in %s (data.dicomweb.keep=false)", discard_folder(folder), folder
            )
        return manifest


SHARD_TAG = "medsynth.shard"
"""The MLflow tag naming a shard's run (``2/8``) or a merge's (``merge/8``)."""


def holds_output(settings: DataSettings) -> bool:
    """Whether a preprocess run with ``settings`` holds ``paths.output``'s lock: every run but one shard
    (``data.shard=K/N``), which holds its shard's lock instead, so that the N shards of an array job run
    at once on one output folder while two runs of the same shard exclude each other.

    Args:
        settings: The data settings.

    Returns:
        ``False`` for one shard, ``True`` otherwise (the whole input, or the merge).

    Raises:
        ConfigError: For a bad ``data.shard``.
    """
    shard = parse_shard(settings.shard)
    return shard is None or shard.merge


def _preprocess_shard(
    settings: DataSettings, run: RunSettings, shard: Shard, config: Mapping[str, Any], *, tracker: TrackerLike | None
) -> ShardResult:
    """One shard (``data.shard=K/N``) as its own MLflow run.

    It holds its shard's lock (``data/shards/K-of-N/.medsynth.lock``), not ``paths.output``'s, so the
    N shards of an array job run at once on one output folder while two runs of the same shard
    exclude each other.
    """
    assert shard.index is not None and shard.count is not None
    check_folders(run, "preprocess")
    folder = shard_folder(run.paths.data, shard.index, shard.count)
    with _shard_lock(folder, shard):
        tracker = tracker or make_tracker(run)
        tags = {**stage_tags(run, "preprocess"), SHARD_TAG: shard.label}
        with tracker.run(f"preprocess-{shard.name}", tags=tags) as run_id:
            if run_id:
                log.info("preprocess: shard %s, MLflow run %s", shard.label, run_id)
                log_config(tracker, run_id, {**to_mapping(run), **config}, folder=folder)
            discovery = _discover(settings, run, log_metrics=lambda metrics: tracker.log_metrics(run_id, metrics))
            result = build_shard(
                discovery,
                out_dir=Path(run.paths.data),
                settings=volume_settings(settings),
                index=shard.index,
                count=shard.count,
                workers=settings.workers,
                progress=run.progress,
            )
            tracker.log_metrics(
                run_id,
                {
                    "shard_cases": result.cases,
                    "shard_records": result.records,
                    "shard_quarantined": result.quarantined,
                    "shard_reused": result.reused,
                },
            )
            tracker.log_artifact(run_id, result.path, artifact_path=f"data/shards/{shard.name}")
            return result


@contextlib.contextmanager
def _shard_lock(folder: Path, shard: Shard) -> Iterator[None]:
    """Hold a shard's lock for the block; refuse, in one line, when another run is preprocessing that shard."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(output_lock(folder, stage=f"preprocess data.shard={shard.label}", key="data.shard"))
        except MedsynthError as err:
            holder = read_holder(folder)
            if holder is None or "in use by another run" not in str(err):
                raise
            raise MedsynthError(
                f"data.shard={shard.label}: shard {shard.index} of {shard.count} is being preprocessed by "
                f"another run ({holder.describe()}); wait for it to end (lock file "
                f"{folder / LOCK_NAME})"
            ) from None
        yield


def _require_no_running_shard(data: Path, what: str, *, stage: str) -> None:
    """Refuse ``what`` (a merge, or a run over the whole input) while a shard is preprocessing into ``data``:
    its records are not finished, and the run's cleanup would delete them. Each shard's lock is taken and
    released (a crashed shard's lock is taken over with a warning)."""
    for (index, count), folder in shard_folders(data).items():
        try:
            with output_lock(folder, stage=stage, key="data.shard"):
                pass
        except MedsynthError as err:
            holder = read_holder(folder)
            if holder is None or "in use by another run" not in str(err):
                raise
            raise MedsynthError(
                f"shard {index}/{count} is still being preprocessed into {data} ({holder.describe()}): "
                f"wait for it to end before {what}"
            ) from None


def volume_settings(settings: DataSettings) -> VolumeSettings:
    """How each case becomes records, from the data settings."""
    i = settings.intensity
    return VolumeSettings(
        spatial_dims=settings.spatial_dims,
        spacing=tuple(float(s) for s in settings.spacing),
        size=tuple(int(s) for s in settings.size),
        slice_axis=settings.slice_axis,
        min_foreground=float(settings.min_foreground),
        margin=settings.margin,
        intensity=i.mode,
        lower_percentile=float(i.lower),
        upper_percentile=float(i.upper),
        window=(float(i.window[0]), float(i.window[1])),
        level_bands=settings.level_bands,
        max_image_bytes=image_bytes(settings),
    )


def image_bytes(settings: DataSettings) -> int:
    """``data.max_image_gb`` in bytes."""
    return int(settings.max_image_gb * 1e9)


def dicomweb_folder(settings: DataSettings, run: RunSettings) -> Path:
    """Where ``data=dicomweb`` retrieves to: ``data.dicomweb.folder``, by default ``<paths.output>/dicomweb``."""
    return Path(settings.dicomweb.folder or f"{run.paths.output}/dicomweb")


def _retrieve(
    settings: DataSettings, run: RunSettings, salt: bytes, *, log_metrics: Callable[[dict[str, float]], None] | None
) -> Path:
    """Search the DICOMweb server and retrieve what it finds into the retrieval folder (continuing an
    interrupted retrieval); returns the folder."""
    from medsynth.io.dicomweb import DicomwebServer, SearchFilters, read_accession_list

    web = settings.dicomweb
    if not web.url:
        raise ConfigError("data=dicomweb needs data.dicomweb.url, the base URL of the DICOMweb service (docs/pacs.md)")
    filters = SearchFilters(
        study_date=web.study_date,
        study_description=web.study_description,
        series_description=web.series_description,
        modality=settings.modality or None,
        accession_numbers=read_accession_list(web.accession_list) if web.accession_list else (),
    )
    if filters.empty:
        log.warning("preprocess: data=dicomweb without a filter retrieves every series on %s", web.url)
    server = DicomwebServer(web.url, key="data.dicomweb.url", timeout=web.timeout)
    found = server.search(filters)
    if not found:
        raise MedsynthError(
            f"the search on {server.url} found no series: check the filters under data.dicomweb and data.modality (docs/pacs.md)"
        )
    folder = dicomweb_folder(settings, run)
    log.info("preprocess: %d series found on %s; retrieving into %s", len(found), server.url, folder)
    retrieval = server.retrieve(found, folder, salt=salt, max_bytes=image_bytes(settings), progress=run.progress)
    log.info("preprocess: dicomweb: %s", retrieval.describe())
    if log_metrics is not None:
        log_metrics(retrieval.metrics())
    return folder


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


def _discover(
    settings: DataSettings, run: RunSettings, *, log_metrics: Callable[[dict[str, float]], None] | None = None
) -> Discovery:
    """The cases to preprocess: one per DICOM series, nnU-Net case (the demo cohort is written as one) or NIfTI
    file, or the one NIfTI pair. ``data=dicomweb`` retrieves its series first (their counts go to ``log_metrics``)."""
    if settings.source in ("mni152", "nifti"):
        image, label = _input_pair(settings, run)
        return nifti_pair_case(
            image,
            label,
            case_id=_case_id(settings, image),
            label_names=list(settings.label_names or []),
            modality=settings.modality or "",
            source=settings.source,
        )
    salt_file = settings.deid.salt_file or f"{run.paths.output}/secret/salt"
    if settings.source == "dicomweb":  # the retrieved files are named by keyed hashes: the salt comes first
        salt = load_salt(salt_file)
        root = _retrieve(settings, run, salt, log_metrics=log_metrics)
    else:
        root = (
            write_mni152_cohort(Path(run.paths.output) / "raw", subjects=settings.subjects)
            if settings.source == "mni152_cohort"
            else _input_folder(settings, run)
        )
        salt = load_salt(salt_file)
    attributes = _attributes(settings)
    label_names = list(settings.label_names) if settings.label_names else None
    modality = settings.modality or None
    if settings.source in ("dicom", "dicomweb"):
        return discover_dicom(
            root,
            salt=salt,
            labels=settings.labels,
            label_names=label_names,
            modality=modality,
            attributes=attributes,
            attribute_match=settings.attributes.match,
            exclude=[run.paths.output],
            hash_all_paths=settings.deid.hash_all_paths,
            workers=settings.workers,
            progress=run.progress,
            max_bytes=image_bytes(settings),
        )
    if settings.source in ("nnunet", "mni152_cohort"):
        volume = settings.channel if settings.channel is not None else 0
        return discover_nnunet(root, salt=salt, channel=volume, attributes=attributes, modality=modality)
    channel = settings.channel
    if isinstance(channel, str):
        if not channel.isdigit():
            raise ConfigError(f"data.channel must be a volume index for data=folder, got {channel!r}")
        channel = int(channel)
    return discover_folder(root, salt=salt, channel=channel, modality=modality, attributes=attributes, label_names=label_names)
