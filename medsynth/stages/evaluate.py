"""Stage 4: the synthetic set and the real splits in; realism, privacy and utility figures, a verdict and a report out.

This module is the wiring: the instruments (encoder features, segmenters, the membership attack)
live in :mod:`medsynth.evaluation.instruments`, the figures in :mod:`medsynth.evaluation.audit`.
The generator audited is the one ``synthetic/manifest.csv`` names, and only if its file is still
the one the samples were made with (same SHA-256).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

from medsynth import MedsynthError
from medsynth.config.schema import to_mapping
from medsynth.config.settings import EncoderSettings, EvaluateSettings, PrivacySettings, RunSettings
from medsynth.data import Manifest, load_split, read_manifest
from medsynth.diffusion.generator import Generator
from medsynth.evaluation import AuditSet, privacy_figures, realism_figures, render_report, utility_figures, verdict
from medsynth.evaluation.figures import Figure
from medsynth.evaluation.instruments import dataset_encoder, features, holdout_dice, membership_errors, train_segmenters
from medsynth.evaluation.pictures import picture_sheets
from medsynth.evaluation.synthetic import SyntheticSet, read_synthetic
from medsynth.io import write_json, write_text
from medsynth.metrics import label_intensity_stats
from medsynth.stages.context import pick_device, stage_run
from medsynth.tracking import TrackerLike
from medsynth.training import file_sha256
from medsynth.training.segmenter import segment

log = logging.getLogger("medsynth")


def evaluate(
    *,
    settings: EvaluateSettings,
    encoder: EncoderSettings,
    privacy: PrivacySettings,
    run: RunSettings,
    tracker: TrackerLike | None = None,
    parent_run_id: str | None = None,
) -> Path:
    """Audit the synthetic set listed in ``synthetic/manifest.csv`` against the real splits.

    Writes ``evaluation/metrics.json`` (every figure with its meaning and reference, the verdict
    and its limits), ``evaluation/report.html`` and, for 2D sets, picture sheets; logs them to
    MLflow with the figures as metrics and the verdict as tags.

    Args:
        settings: The audit's settings (``conf/evaluate``).
        encoder: The dataset's feature encoder (``conf/encoder``).
        run: The shared settings: seed, device, progress, folders, MLflow.
        tracker: Tracker to log to (default: from ``run.mlflow``).
        parent_run_id: Pipeline run to nest under.

    Returns:
        Path of ``evaluation/metrics.json``.

    Raises:
        MedsynthError: For a missing dataset or synthetic set, a synthetic set of another shape, or
            a generator checkpoint that is missing or not the file the samples were made with.
    """
    config = {"evaluate": to_mapping(settings), "encoder": to_mapping(encoder), "privacy": to_mapping(privacy)}
    with stage_run(run, "evaluate", config, tracker=tracker, parent_run_id=parent_run_id) as (tracker, run_id):
        device = pick_device(run.device)
        manifest = read_manifest(run.paths.data)
        names, dims, num_classes = manifest.label_names, manifest.spatial_dims, manifest.num_classes
        synthetic = read_synthetic(run.paths.synthetic, spatial_dims=dims)
        train, holdout = load_split(manifest, "train"), load_split(manifest, "holdout")
        if synthetic.images.shape[1:] != tuple(holdout.images.shape[1:]):
            raise MedsynthError(
                f"synthetic images have shape {synthetic.images.shape[1:]}, the dataset {tuple(holdout.images.shape[1:])}: "
                "generate again from a model trained on this dataset"
            )
        generator = _audited_generator(synthetic, manifest, run, device)

        measure = dataset_encoder(encoder, run.paths.data, train, spatial_dims=dims, device=device, seed=run.seed,
                                  progress=run.progress).to(device)
        sets: dict[str, AuditSet] = {}
        for name, (images, labels) in {"train": (train.images.numpy(), train.labels.numpy()),
                                       "holdout": (holdout.images.numpy(), holdout.labels.numpy()),
                                       "synthetic": (synthetic.images, synthetic.labels)}.items():
            measured = features(measure, images)
            sets[name] = AuditSet(images, labels, measured.items, measured.planes)
        segmenters = train_segmenters(settings.segmenter, real=train, synthetic=synthetic.arrays(), num_classes=num_classes,
                                      spatial_dims=dims, seed=settings.seed, device=device, progress=run.progress)
        errors = {name: membership_errors(generator, data, manifest.split(name), timesteps=settings.membership.timesteps,
                                          seed=settings.seed)
                  for name, data in (("train", train), ("holdout", holdout))}

        figures = realism_figures(
            *sets.values(), label_names=names, spatial_dims=dims, max_ssim_pairs=settings.max_ssim_pairs, seed=settings.seed,
            segment=lambda x: segment(segmenters["real"], torch.as_tensor(x)).numpy(),
        )
        privacy, correlation, nearest = privacy_figures(
            *sets.values(), num_classes=num_classes, member_errors=errors["train"], nonmember_errors=errors["holdout"],
            memorisation_threshold=privacy.memorisation_threshold,
        )
        figures += privacy
        dice = {name: holdout_dice(model, holdout, num_classes=num_classes) for name, model in segmenters.items()}
        figures += utility_figures(dice_real=dice["real"], dice_synthetic=dice["synthetic"], dice_both=dice["real+synthetic"])
        limits = settings.limit_table()
        passed, reasons = verdict(figures, limits)

        out = Path(run.paths.evaluation)
        pictures: dict[str, Path] = {}
        if dims == 2:
            pictures = picture_sheets(out, synthetic, train, correlation, nearest, sheet_rows=settings.sheet_rows)
        body = {
            "num_synthetic": len(synthetic), "num_train": len(train), "num_holdout": len(holdout),
            "verdict": {"passed": passed, "reasons": reasons, "limits": limits},
            "metrics": {f.name: f.as_json() for f in figures},
            "label_intensity_stats": {split: label_intensity_stats(x.images, x.labels, label_names=names)
                                      for split, x in sets.items()},
        }
        metrics_path = write_json(out / "metrics.json", body)
        facts = {"synthetic samples": str(len(synthetic)), "training records": str(len(train)),
                 "holdout records": str(len(holdout)), "checkpoint sha256": synthetic.rows[0].get("checkpoint_sha256", ""),
                 "MLflow run": run_id}
        report = write_text(out / "report.html", render_report(
            title=f"medsynth evaluation: {run.name}", figures=figures, passed=passed, reasons=reasons,
            pictures=pictures, facts=facts))

        _log_results(tracker, run_id, parent_run_id, figures, passed, reasons, (metrics_path, report, *pictures.values()))
        return metrics_path


def _audited_generator(synthetic: SyntheticSet, manifest: Manifest, run: RunSettings, device: torch.device) -> Generator:
    """The generator the synthetic manifest names, if its checkpoint is byte for byte the one that made the samples."""
    source, expected = synthetic.generator_source()
    from_mlflow = source.startswith(("runs:/", "models:/")) or re.fullmatch(r"[0-9a-f]{32}", source) is not None
    if not from_mlflow and not Path(source).is_file():
        raise MedsynthError(f"checkpoint not found: {source}, the generator {synthetic.manifest} was made with: "
                            "restore that file, or generate the set again")
    generator = Generator.from_checkpoint(source, device=device, tracking_uri=run.mlflow.tracking_uri,
                                          download_dir=f"{run.paths.output}/downloads")
    assert generator.checkpoint is not None
    actual = file_sha256(generator.checkpoint)
    if actual != expected:
        raise MedsynthError(
            f"checkpoint {generator.checkpoint} has SHA-256 {actual}, but {synthetic.manifest} was generated by "
            f"{expected}: the file changed since generation; generate again or restore that checkpoint")
    if list(generator.label_names) != manifest.label_names:
        raise MedsynthError(f"checkpoint {source} was trained on labels {generator.label_names}, but the dataset at "
                            f"{manifest.root} has {manifest.label_names}")
    return generator


def _log_results(
    tracker: TrackerLike,
    run_id: str,
    parent_run_id: str | None,
    figures: list[Figure],
    passed: bool,
    reasons: list[str],
    artifacts: tuple[Path, ...],
) -> None:
    """Figures as metrics, the verdict as tags, the files as artifacts; headline figures and the verdict on the parent too."""
    tracker.log_metrics(run_id, {f.name.replace("/", "_"): f.value for f in figures if np.isfinite(f.value)})
    tracker.set_tags(run_id, {"medsynth.verdict": "pass" if passed else "fail",
                              "medsynth.verdict_reasons": "; ".join(reasons) or "all limits hold"})
    for path in artifacts:
        tracker.log_artifact(run_id, path, artifact_path="evaluation")
    if parent_run_id:
        tracker.log_metrics(parent_run_id, {f.name.replace("/", "_"): f.value
                                            for f in figures if f.headline and np.isfinite(f.value)})
        tracker.set_tags(parent_run_id, {"medsynth.verdict": "pass" if passed else "fail"})
    log.info("evaluate: verdict %s%s", "PASS" if passed else "FAIL", "" if passed else ": " + "; ".join(reasons))
    log.info("evaluate: %s", ", ".join(f"{f.name}={f.value:.4g}" for f in figures if f.headline))
