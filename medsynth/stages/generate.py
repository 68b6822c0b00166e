"""Stage 3: a trained model in, a labelled synthetic dataset and ``synthetic/manifest.csv`` out.

This module is the wiring: it loads the generator(s), builds the privacy gate, and runs batches
of seeds through :mod:`medsynth.stages.candidates` (planning each seed's condition, drawing, and
replacing what the gate rejects) into :mod:`medsynth.stages.synthetic` (files and manifest).
Sample ``i`` has seed ``generate.seed + i``; everything about it follows from that seed, so any
one sample can be regenerated alone, and an interrupted run is continued by a rerun. With
``generate.push=dicomweb`` the finished set's DICOM series and SEGs are then stored on a DICOMweb
server (:mod:`medsynth.io.dicomweb`); their UIDs follow from the set's identity, so storing the same
set again leaves one copy on the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from medsynth import ConfigError, MedsynthError, __version__
from medsynth.compute import resolve_precision
from medsynth.config.schema import to_mapping
from medsynth.config.settings import (
    EncoderSettings,
    GenerateSettings,
    PrivacySettings,
    RunSettings,
    require_label_source,
    sampler_target,
)
from medsynth.data import LabelledArrays, Manifest, load_split, read_manifest
from medsynth.data.manifest import require_records
from medsynth.diffusion.generator import Generator
from medsynth.evaluation.gate import PrivacyGate, build_privacy_gate
from medsynth.evaluation.instruments import dataset_encoder
from medsynth.evaluation.provenance import LINEAGE, checkpoint_facts
from medsynth.evaluation.synthetic import read_synthetic
from medsynth.io.dicomweb import DicomwebServer
from medsynth.progress import progress_bar
from medsynth.stages.candidates import Candidate, GateRefused, Planner, gated_draws, sample_candidates, user_label_maps
from medsynth.stages.context import pick_device, stage_run
from medsynth.stages.synthetic import SyntheticWriter, dp_columns, listed_samples, sample_bytes
from medsynth.tracking import TrackerLike
from medsynth.training.checkpoint import file_sha256
from medsynth.training.privacy import PrivacyRecord, checkpoint_privacy

log = logging.getLogger("medsynth")

_NOT_FINGERPRINTED = ("num_samples", "batch_size", "formats", "checkpoint", "require_audited", "push", "dicomweb")


def generate(
    *,
    settings: GenerateSettings,
    encoder: EncoderSettings,
    privacy: PrivacySettings,
    run: RunSettings,
    tracker: TrackerLike | None = None,
    parent_run_id: str | None = None,
) -> Path:
    """Generate ``settings.num_samples`` labelled synthetic samples under ``run.paths.synthetic``.

    Args:
        settings: What to generate and how (``conf/generate``).
        encoder: The dataset's feature encoder, for the privacy gate's feature space (``conf/encoder``).
        privacy: The per-sample privacy rules the gate enforces (``conf/privacy``).
        run: The shared settings: seed, device, progress, folders, MLflow.
        tracker: Tracker to log to (default: from ``run.mlflow``).
        parent_run_id: Pipeline run to nest under.

    Returns:
        Path of ``synthetic/manifest.csv``.

    Raises:
        ConfigError: For a sampler that cannot sample the checkpoint's schedule.
        MedsynthError: For a missing or mismatched checkpoint or dataset, bad user label maps, a
            full disk, or a sample the privacy gate keeps rejecting.
    """
    config = {"generate": to_mapping(settings), "encoder": to_mapping(encoder), "privacy": to_mapping(privacy)}
    with stage_run(run, "generate", config, tracker=tracker, parent_run_id=parent_run_id) as (tracker, run_id):
        device = pick_device(run.device)
        # auto becomes what it means on this device: the fingerprint, the manifest and the sampler see that
        settings = dataclasses.replace(
            settings, precision=resolve_precision(settings.precision, device, key="generate.precision")
        )
        manifest = read_manifest(run.paths.data)
        checkpoint = settings.checkpoint or f"{run.paths.checkpoints}/last.pt"
        generator = _load_generator(checkpoint, manifest, run, device)
        _require_records(manifest, settings, generator)
        source = load_split(manifest, settings.labels.split)
        facts = checkpoint_facts(generator)
        registered_audit = _registered_audit(checkpoint, generator, facts, settings, run)
        sampler = sampler_target(settings.sampler, generator.scheduler._target_, key="generate.sampler")
        _check_grid(generator, checkpoint, source, manifest)
        _check_disk(settings, generator, manifest, Path(run.paths.synthetic))
        target = _push_target(settings)  # an unreachable server or refused credentials stop the stage before sampling
        require_label_source(generator.conditioning, settings.labels)
        label_generator = None
        if generator.conditioning == "mask" and settings.labels.source == "generator":
            label_generator = _load_label_generator(str(settings.labels.generator), settings, manifest, run, device)
        if settings.compile:  # after everything that reads the models' weights
            for model in (generator, label_generator):
                if model is not None:
                    model.compile()
        planner = _planner(settings, source, manifest, generator)
        gate = _privacy_gate(
            settings,
            encoder,
            privacy,
            run,
            manifest,
            generator,
            device,
            train_split=source if settings.labels.split == "train" else None,
        )
        gate_description = gate.describe() if gate is not None else {"method": "off"}

        checkpoint_hash, label_hash = _sha256(generator), _sha256(label_generator)
        assert generator.checkpoint is not None  # set by Generator.from_checkpoint
        dp = checkpoint_privacy(generator.checkpoint)
        writer = SyntheticWriter(
            Path(run.paths.synthetic),
            settings,
            manifest.label_names,
            generator.model.vocabulary,
            common=_common_columns(
                settings,
                checkpoint,
                generator,
                sampler=sampler,
                checkpoint_hash=checkpoint_hash,
                label_hash=label_hash,
                gate_method=gate_description["method"],
                data_manifest_hash=facts["data_manifest_sha256"],
                dp=dp,
            ),
            previews_wanted="png" in settings.formats and manifest.spatial_dims == 2,
            privacy=dp.describe() if dp is not None else None,
        )
        start = writer.resume(
            settings_fingerprint(settings, checkpoint_hash, {"label_generator": label_hash, "gate": gate_description["method"]}),
            run_id=run_id,
        )

        def draw(seeds: list[int]) -> tuple[list[Candidate], torch.Tensor | None, torch.Tensor | None]:
            candidates = planner.plan(seeds)
            return (candidates, *sample_candidates(candidates, generator, settings, label_generator=label_generator))

        rejected = 0
        with (
            progress_bar(total=settings.num_samples, initial=start, desc="generate", unit="sample", enabled=run.progress) as bar,
            _says_where(writer),
        ):
            for first in range(start, settings.num_samples, settings.batch_size):
                seeds = [settings.seed + i for i in range(first, min(first + settings.batch_size, settings.num_samples))]
                try:
                    accepted, batch_rejected = gated_draws(
                        seeds, draw, gate, max_redraws=settings.privacy_gate.max_redraws, so_far=rejected
                    )
                except GateRefused as refused:
                    writer.write_batch(refused.accepted)  # the batch's samples before the refused one are complete
                    raise
                rejected += batch_rejected
                writer.write_batch(accepted)
                bar.update(len(seeds))
        sheet = writer.finish(modality=settings.dicom.modality)

        _log_lineage(
            tracker,
            run_id,
            writer,
            facts,
            checkpoint_hash=checkpoint_hash,
            registered_audit=registered_audit,
            name=f"{run.name}/synthetic",
        )
        tracker.log_params(
            run_id,
            {
                "checkpoint_sha256": checkpoint_hash,
                "num_samples": settings.num_samples,
                "label_source": settings.labels.source if generator.conditioning == "mask" else "none",
                "precision_used": settings.precision,
                **{f"privacy_gate_{k}": v for k, v in gate_description.items()},
            },
        )
        _report_gate(gate, rejected, Path(run.paths.synthetic), tracker, run_id, spatial_dims=manifest.spatial_dims)
        tracker.log_artifact(run_id, writer.manifest, artifact_path="synthetic")
        if sheet is not None:
            tracker.log_artifact(run_id, sheet, artifact_path="synthetic")
        log.info("generate: %d samples -> %s", len(writer.rows), writer.manifest)
        if target is not None:
            _push(target, writer, tracker, run_id, progress=run.progress)
        return writer.manifest


@contextlib.contextmanager
def _says_where(writer: SyntheticWriter) -> Iterator[None]:
    """An error while samples are drawn and written ends with where the complete samples are listed.

    ``manifest.csv`` is rewritten atomically after every batch, so it lists exactly the complete
    samples; a user error gets that appended to its one line, any other error is logged with it.
    """
    try:
        yield
    except MedsynthError as err:
        where = f"{len(writer.rows)} complete sample(s) are listed in {writer.manifest}"
        if str(writer.manifest) in str(err):
            raise
        raise err.with_note(where) from None
    except Exception:
        log.error(
            "generate: stopped by an unexpected error; %d complete sample(s) are listed in %s", len(writer.rows), writer.manifest
        )
        raise


def _push_target(settings: GenerateSettings) -> DicomwebServer | None:
    """The server of ``generate.push=dicomweb``, checked with one small search (``None`` without a push)."""
    if settings.push != "dicomweb":
        return None
    target = settings.dicomweb
    if not target.url:
        raise ConfigError(
            "generate.push=dicomweb needs generate.dicomweb.url, the base URL of the research PACS's "
            "DICOMweb service (docs/pacs.md)"
        )
    server = DicomwebServer(target.url, key="generate.dicomweb.url", timeout=target.timeout)
    server.check()
    return server


def _push(server: DicomwebServer, writer: SyntheticWriter, tracker: TrackerLike, run_id: str, *, progress: bool) -> None:
    """Store every listed sample's DICOM image series and SEG on ``server``, one STOW-RS request per sample.

    Raises:
        MedsynthError: One line naming the sample being stored and saying that a rerun stores the set again.
    """
    samples = []
    for row in writer.rows:
        if row.get("dicom_series"):
            files = sorted((writer.out / row["dicom_series"]).glob("*.dcm"))
            if row.get("dicom_seg"):
                files.append(writer.out / row["dicom_seg"])
            samples.append((row["sample_id"], files))
    if not samples:
        log.warning(
            "generate: generate.push=dicomweb, but no sample has a DICOM image series (a label-map model "
            "writes none): nothing was stored"
        )
        return
    stored = 0
    try:
        with progress_bar(total=len(samples), desc="dicomweb: store", unit="sample", enabled=progress) as bar:
            for sample_id, files in samples:
                stored += server.store(files, what=f"sample {sample_id}")
                bar.update(1)
    except MedsynthError as err:
        raise err.with_note(
            f"the synthetic set in {writer.out} is complete; rerun generate to store it (instances "
            "the server holds already are kept once)"
        ) from None
    tracker.log_metrics(run_id, {"dicomweb_stored_samples": len(samples), "dicomweb_stored_instances": stored})
    tracker.set_tags(run_id, {"medsynth.dicomweb.stored_to": server.url})
    log.info("generate: stored %d samples (%d instances) on %s", len(samples), stored, server.url)


def _require_records(manifest: Manifest, settings: GenerateSettings, generator: Generator) -> None:
    """Stop before any work when a split the run reads is empty (one line: how many, what for, what to change)."""
    needs: dict[str, tuple[int, str]] = {
        settings.labels.split: (1, "each sample's geometry and label map (generate.labels.split)")
    }
    if settings.privacy_gate.enabled and generator.model.output != "label":
        needs.setdefault("train", (1, "the privacy gate's references"))
        needs["holdout"] = (1, "the privacy gate's thresholds (or generate without it: generate.privacy_gate.enabled=false)")
    require_records(manifest, needs, stage="generate")


def _check_disk(settings: GenerateSettings, generator: Generator, manifest: Manifest, out: Path) -> None:
    """Refuse, before any work, a run whose outputs clearly do not fit on the disk of ``out``.

    The need is at least (samples still to write) x (least bytes per sample in each format,
    :func:`medsynth.stages.synthetic.sample_bytes`); samples an earlier run listed are counted as done.

    Raises:
        MedsynthError: One line with the need, the free space and what to change.
    """
    per_format = sample_bytes(
        settings.formats,
        image_size=generator.image_size,
        num_classes=manifest.num_classes,
        image=generator.model.output != "label",
        label=generator.model.output in ("label", "pair") or generator.conditioning == "mask",
    )
    todo = max(0, settings.num_samples - listed_samples(out))
    need = todo * sum(per_format.values())
    folder = out
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        each = ", ".join(f"{name} {_size(n)}" for name, n in per_format.items())
        raise MedsynthError(
            f"not enough disk space for generate: {todo} sample(s) need at least {_size(need)} ({each} each), but "
            f"{folder} has {_size(free)} free: free space, or lower generate.num_samples, or drop formats from "
            "generate.formats"
        )


def _size(n: float) -> str:
    """``512 B``, ``3.2 MB``, ``1.5 GB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def settings_fingerprint(settings: GenerateSettings, checkpoint_hash: str, extra: Mapping[str, Any]) -> str:
    """Hash of everything that decides the samples, so a rerun continues only an identical run.

    Args:
        settings: The generate settings (count, batch size, formats and the checkpoint's name left out).
        checkpoint_hash: SHA-256 of the checkpoint file.
        extra: Other facts that decide the samples (label generator, privacy gate).

    Returns:
        A hex digest.
    """
    g = {k: v for k, v in to_mapping(settings).items() if k not in _NOT_FINGERPRINTED}
    body = json.dumps({"generate": g, "checkpoint": checkpoint_hash, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def _load_generator(source: str, manifest: Manifest, run: RunSettings, device: torch.device) -> Generator:
    """The generator ``source`` names (a path, run id or registered model), checked against the dataset's labels."""
    generator = Generator.from_checkpoint(
        source, device=device, tracking_uri=run.mlflow.tracking_uri, download_dir=f"{run.paths.output}/downloads"
    )
    if list(generator.label_names) != manifest.label_names:
        raise MedsynthError(
            f"checkpoint {source} was trained on labels {generator.label_names}, but the dataset at "
            f"{manifest.root} has {manifest.label_names}"
        )
    return generator


def _load_label_generator(
    source: str, settings: GenerateSettings, manifest: Manifest, run: RunSettings, device: torch.device
) -> Generator:
    """The label-map generator of ``generate.labels.generator`` (``generate.sampler`` must sample its schedule)."""
    generator = _load_generator(source, manifest, run, device)
    if generator.model.output != "label":
        raise MedsynthError(f"{source} is not a label-map generator (model.output={generator.model.output})")
    sampler_target(settings.sampler, generator.scheduler._target_, key="generate.sampler")
    return generator


def _check_grid(generator: Generator, source: str, split: LabelledArrays, manifest: Manifest) -> None:
    """The generator must draw samples on the dataset's grid (label maps and geometry come from it)."""
    grid = tuple(split.images.shape[2:])
    if tuple(generator.image_size) != grid:
        raise MedsynthError(
            f"checkpoint {source} generates images of size {list(generator.image_size)}, but the "
            f"dataset at {manifest.root} holds records of size {list(grid)}"
        )


def _planner(settings: GenerateSettings, source: LabelledArrays, manifest: Manifest, generator: Generator) -> Planner:
    """The planner of each seed's candidate, with the user's label maps for ``generate.labels.source=folder``."""
    user_maps = None
    if generator.conditioning == "mask" and settings.labels.source == "folder":
        user_maps = user_label_maps(
            Path(str(settings.labels.folder)), shape=generator.image_size, num_classes=manifest.num_classes
        )
    class_key = _class_key(generator) if settings.class_distribution else "class"
    return Planner(settings, source, manifest, generator.conditioning, class_key=class_key, user_maps=user_maps)


def _common_columns(
    settings: GenerateSettings,
    checkpoint: str,
    generator: Generator,
    *,
    sampler: str,
    checkpoint_hash: str,
    label_hash: str,
    gate_method: str,
    data_manifest_hash: str,
    dp: PrivacyRecord | None = None,
) -> dict[str, Any]:
    """The manifest columns every sample shares: the model and the dataset it was trained on (the
    hash of that ``data/manifest.json``), how it was sampled (``sampler``: its MONAI class path),
    the gate, and the generator's differential-privacy record (``dp_*``, empty without DP)."""
    return {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": checkpoint_hash,
        "train_run_id": generator.info.get("run_id", ""),
        "data_manifest_sha256": data_manifest_hash,
        "sampler": sampler.rsplit(".", 1)[-1],
        "steps": settings.steps,
        "eta": settings.eta,
        "guidance_scale": settings.guidance_scale if generator.guided else "",
        "precision": settings.precision,
        "label_generator_sha256": label_hash,
        "gate_method": gate_method,
        **dp_columns(dp),
        "medsynth_version": __version__,
    }


def _registered_audit(
    source: str, generator: Generator, facts: Mapping[str, str], settings: GenerateSettings, run: RunSettings
) -> str:
    """Whether the generator is a registered model version that passed an audit: ``pass``, ``fail``,
    ``none`` (a version never audited) or ``""`` (not looked up: not a ``models:/`` source).

    Looked up for a ``models:/`` source, and for any source under ``generate.require_audited``,
    which then refuses anything but a version whose last audit passed.

    Raises:
        MedsynthError: Under ``generate.require_audited`` for a generator without a PASS audit.
    """
    if not (source.startswith("models:/") or settings.require_audited):
        return ""
    from medsynth.tracking.registry import audit_status, find_model_version

    assert generator.checkpoint is not None
    found = find_model_version(
        source,
        checkpoint_sha256=file_sha256(generator.checkpoint),
        train_run_id=facts["run_id"],
        tracking_uri=run.mlflow.tracking_uri,
    )
    if found is None:
        raise MedsynthError(
            f"generate.require_audited=true, but the checkpoint {source} is not a registered model version: "
            "generate from models:/NAME/VERSION (or @audited) of a version whose audit passed"
        )
    status = audit_status(*found, tracking_uri=run.mlflow.tracking_uri)
    (log.info if status.passed else log.warning)("generate: %s", status.describe())
    if settings.require_audited and not status.passed:
        raise MedsynthError(
            f"generate.require_audited=true, but {status.describe()}: evaluate a set from it first "
            f"(a PASS sets the alias models:/{status.name}@audited)"
        )
    return status.verdict or "none"


def _log_lineage(
    tracker: TrackerLike,
    run_id: str,
    writer: SyntheticWriter,
    facts: Mapping[str, str],
    *,
    checkpoint_hash: str,
    registered_audit: str,
    name: str,
) -> None:
    """The run's inputs (train run, checkpoint, dataset) as lineage tags, and the set it made as a dataset input."""
    manifest_hash = file_sha256(writer.manifest)
    tracker.set_tags(
        run_id,
        {
            f"{LINEAGE}{k}": v
            for k, v in {
                "train_run_id": facts["run_id"],
                "preprocess_run_id": facts["preprocess_run_id"],
                "checkpoint_sha256": checkpoint_hash,
                "data_manifest_sha256": facts["data_manifest_sha256"],
                "synthetic_manifest_sha256": manifest_hash,
            }.items()
            if v
        },
    )
    if registered_audit:
        tracker.log_params(run_id, {"registered_audit": registered_audit})
    tracker.log_dataset(
        run_id, name=name, sha256=manifest_hash, source=writer.out, context="synthetic", num_records=len(writer.rows)
    )


def _sha256(generator: Generator | None) -> str:
    """SHA-256 of a generator's checkpoint file (``""`` without a generator)."""
    if generator is None:
        return ""
    assert generator.checkpoint is not None  # set by Generator.from_checkpoint
    return file_sha256(generator.checkpoint)


def _class_key(generator: Generator) -> str:
    """The attribute ``generate.class_distribution`` sets: the model's ``model.class_key``."""
    return generator.settings.class_key if generator.settings is not None else "class"


def _privacy_gate(
    settings: GenerateSettings,
    encoder: EncoderSettings,
    privacy: PrivacySettings,
    run: RunSettings,
    manifest: Manifest,
    generator: Generator,
    device: torch.device,
    *,
    train_split: LabelledArrays | None = None,
) -> PrivacyGate | None:
    """The gate of ``generate.privacy_gate`` calibrated on this dataset, or ``None`` when off or not applicable.

    ``train_split`` is the training split when the caller has it loaded already.
    """
    p = settings.privacy_gate
    if not p.enabled:
        log.warning("generate: the privacy gate is off; synthetic images are not checked against the training records")
        return None
    if generator.model.output == "label":
        log.info("generate: a label-map model makes no images; the privacy gate does not apply")
        return None
    train_split = train_split if train_split is not None else load_split(manifest, "train")
    holdout = load_split(manifest, "holdout")
    features = (
        dataset_encoder(
            encoder,
            run.paths.data,
            train_split,
            spatial_dims=manifest.spatial_dims,
            device=device,
            seed=run.seed,
            progress=run.progress,
        )
        if privacy.features
        else None
    )
    return build_privacy_gate(train_split.images, holdout.images, encoder=features, privacy=privacy, device=device)


def _report_gate(
    gate: PrivacyGate | None, rejected: int, folder: Path, tracker: TrackerLike, run_id: str, *, spatial_dims: int
) -> None:
    """Log what the gate rejected (in all and per rule) and preview the audit's aggregate privacy
    figures over the exported set (``preview_*`` metrics and one line).

    The set is read back from its NIfTI files, as evaluate reads it; without NIfTI output there is
    nothing the audit could read, and no preview.
    """
    tracker.log_metrics(
        run_id,
        {
            "privacy_gate_rejected": rejected,
            **{f"privacy_gate_rejected_{rule}": n for rule, n in (gate.rejections if gate else {}).items()},
        },
    )
    if gate is None:
        return
    if rejected:
        log.info(
            "generate: the privacy gate rejected %d candidates and drew replacements (%s)",
            rejected,
            ", ".join(f"{rule}: {n}" for rule, n in gate.rejections.items()),
        )
    try:
        exported = read_synthetic(folder, spatial_dims=spatial_dims)
    except MedsynthError as err:
        log.info("generate: no privacy preview (%s)", err)
        return
    preview = gate.preview(exported.images)
    tracker.log_metrics(run_id, {f"preview_{k}": v for k, v in preview.items()})
    log.info(
        "generate: privacy preview of the %d exported samples (evaluate's limits decide): %s",
        len(exported),
        ", ".join(f"{k}={v:.3g}" for k, v in preview.items()),
    )
