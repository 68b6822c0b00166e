"""Stage 4: the synthetic set and the real splits in; realism, privacy and utility figures, a verdict and a report out."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from medsynth import MedsynthError
from medsynth.data import LabelledArrays, load_split, read_manifest
from medsynth.data.dataset import attribute_codes
from medsynth.diffusion import denoising_errors
from medsynth.evaluation import AuditSet, privacy_figures, realism_figures, render_report, utility_figures, verdict
from medsynth.io import colorize_labels, display_slice, load_nifti, picture_sheet, save_png, write_json, write_text
from medsynth.metrics import label_intensity_stats
from medsynth.metrics.segmentation import mean_dice
from medsynth.tracking import Tracker
from medsynth.train import load_checkpoint
from medsynth.train.encoder import encode, encode_volumes
from medsynth.train.segmenter import segment, train_segmenter
from pipelines.common import CONFIG_DIR, dataset_encoder, exit_on_user_error, load_ema_model, pick_device, stage_run

log = logging.getLogger("medsynth")


def read_synthetic(folder: Path, *, spatial_dims: int) -> tuple[list[dict[str, str]], np.ndarray, np.ndarray]:
    """Rows of ``manifest.csv`` and the images and label maps they list, as ``(N, 1, *spatial)`` arrays."""
    path = folder / "manifest.csv"
    if not path.is_file():
        raise MedsynthError(f"no synthetic manifest at {path}: run `medsynth generate` first")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise MedsynthError(f"{path} lists no samples")
    if not rows[0].get("image"):
        raise MedsynthError(f"{path} lists no NIfTI files: generate with generate.formats including nifti")
    images, labels = [], []
    for row in rows:
        image, _ = load_nifti(folder / row["image"])
        label, _ = load_nifti(folder / row["label"])
        if spatial_dims == 2:
            image, label = image[..., 0], label[..., 0]
        images.append(image[None])
        labels.append(label[None])
    return rows, np.stack(images).astype(np.float32), np.rint(np.stack(labels)).astype(np.int64)


def run(cfg: DictConfig, *, tracker: Tracker | None = None, parent_run_id: str | None = None) -> Path:
    """Audit the synthetic set listed in ``synthetic/manifest.csv`` against the real splits.

    Args:
        cfg: The composed config.
        tracker: Tracker to log to (default: from ``cfg.mlflow``).
        parent_run_id: Pipeline run to nest under.

    Returns:
        Path of ``evaluation/metrics.json``.
    """
    e = cfg.evaluate
    with stage_run(cfg, "evaluate", tracker=tracker, parent_run_id=parent_run_id) as (tracker, run_id):
        device = pick_device(e.device)
        manifest = read_manifest(cfg.paths.data)
        rows, syn_images, syn_labels = read_synthetic(Path(cfg.paths.synthetic), spatial_dims=manifest.spatial_dims)
        train, holdout = load_split(manifest, "train"), load_split(manifest, "holdout")
        if syn_images.shape[1:] != tuple(holdout.images.shape[1:]):
            raise MedsynthError(
                f"synthetic images have shape {syn_images.shape[1:]}, the dataset {tuple(holdout.images.shape[1:])}: "
                "generate again from a model trained on this dataset"
            )
        names, dims, num_classes = manifest.label_names, manifest.spatial_dims, manifest.num_classes
        train_images, train_labels = train.images.numpy(), train.labels.numpy()
        holdout_images, holdout_labels = holdout.images.numpy(), holdout.labels.numpy()
        synthetic = LabelledArrays(torch.from_numpy(syn_images), torch.from_numpy(syn_labels), [r["sample_id"] for r in rows], [])

        encoder = dataset_encoder(cfg, train, spatial_dims=dims, device=device).to(device)
        features = {}
        for name, x in (("train", train_images), ("holdout", holdout_images), ("synthetic", syn_images)):
            if dims == 2:
                features[name] = (encode(encoder, torch.as_tensor(x)).numpy(), {})
            else:
                per_volume, planes = encode_volumes(encoder, torch.as_tensor(x))
                features[name] = (per_volume.numpy(), {p: f.numpy() for p, f in planes.items()})

        s = e.segmenter
        segmenter_args = dict(num_classes=num_classes, spatial_dims=dims, channels=s.channels, steps=s.steps,
                              batch_size=s.batch_size, lr=s.lr, seed=e.seed, device=device, progress=cfg.trainer.progress)
        both = LabelledArrays(torch.cat([train.images, synthetic.images]), torch.cat([train.labels, synthetic.labels]),
                              train.ids + synthetic.ids, [])
        segmenters = {name: train_segmenter(data, desc=f"segmenter ({name})", **segmenter_args)
                      for name, data in (("real", train), ("synthetic", synthetic), ("real+synthetic", both))}

        def holdout_dice(name: str) -> float:
            return mean_dice(segment(segmenters[name], holdout.images), holdout_labels, num_classes=num_classes)

        checkpoint = load_checkpoint(cfg.generate.checkpoint)
        model = load_ema_model(checkpoint, cfg.generate.checkpoint, num_classes=num_classes).to(device)
        scheduler = hydra.utils.instantiate(checkpoint["config"]["scheduler"])
        errors = {name: denoising_errors(model, data.images, data.labels, scheduler, timesteps=list(e.membership.timesteps),
                                         codes=attribute_codes(manifest.split(name), model.vocabulary), seed=e.seed).numpy()
                  for name, data in (("train", train), ("holdout", holdout))}

        sets = (
            AuditSet(train_images, train_labels, *features["train"]),
            AuditSet(holdout_images, holdout_labels, *features["holdout"]),
            AuditSet(syn_images, syn_labels, *features["synthetic"]),
        )
        figures = realism_figures(
            *sets, label_names=names, spatial_dims=dims, max_ssim_pairs=e.max_ssim_pairs, seed=e.seed,
            segment=lambda x: segment(segmenters["real"], torch.as_tensor(x)).numpy(),
        )
        privacy, correlation, nearest = privacy_figures(
            *sets, num_classes=num_classes, member_errors=errors["train"], nonmember_errors=errors["holdout"],
            memorisation_threshold=e.memorisation_threshold,
        )
        figures += privacy
        figures += utility_figures(dice_real=holdout_dice("real"), dice_synthetic=holdout_dice("synthetic"),
                                   dice_both=holdout_dice("real+synthetic"))
        limits = {k: dict(v) for k, v in OmegaConf.to_container(e.limits, resolve=True).items() if v is not None}
        passed, reasons = verdict(figures, limits)

        out = Path(cfg.paths.evaluation)
        pictures: dict[str, Path] = {}
        if dims == 2:
            pictures = _picture_sheets(out, rows, syn_images, syn_labels, train, correlation, nearest, sheet_rows=e.sheet_rows)
        body = {
            "num_synthetic": len(rows), "num_train": len(train), "num_holdout": len(holdout),
            "verdict": {"passed": passed, "reasons": reasons, "limits": limits},
            "metrics": {f.name: f.as_json() for f in figures},
            "label_intensity_stats": {split: label_intensity_stats(x.images, x.labels, label_names=names)
                                      for split, x in zip(("train", "holdout", "synthetic"), sets)},
        }
        metrics_path = write_json(out / "metrics.json", body)
        facts = {"synthetic samples": str(len(rows)), "training records": str(len(train)),
                 "holdout records": str(len(holdout)), "checkpoint sha256": rows[0].get("checkpoint_sha256", ""),
                 "MLflow run": run_id}
        report = write_text(out / "report.html", render_report(
            title=f"medsynth evaluation: {cfg.name}", figures=figures, passed=passed, reasons=reasons,
            pictures=pictures, facts=facts))

        tracker.log_metrics(run_id, {f.name.replace("/", "_"): f.value for f in figures if np.isfinite(f.value)})
        tracker.set_tags(run_id, {"medsynth.verdict": "pass" if passed else "fail",
                                  "medsynth.verdict_reasons": "; ".join(reasons) or "all limits hold"})
        for path in (metrics_path, report, *pictures.values()):
            tracker.log_artifact(run_id, path, artifact_path="evaluation")
        if parent_run_id:
            tracker.log_metrics(parent_run_id, {f.name.replace("/", "_"): f.value for f in figures if f.headline and np.isfinite(f.value)})
            tracker.set_tags(parent_run_id, {"medsynth.verdict": "pass" if passed else "fail"})
        log.info("evaluate: verdict %s%s", "PASS" if passed else "FAIL", "" if passed else ": " + "; ".join(reasons))
        log.info("evaluate: %s", ", ".join(f"{f.name}={f.value:.4g}" for f in figures if f.headline))
        return metrics_path


def _picture_sheets(
    out: Path,
    rows: list[dict[str, str]],
    syn_images: np.ndarray,
    syn_labels: np.ndarray,
    train: LabelledArrays,
    correlation: np.ndarray,
    nearest: np.ndarray,
    *,
    sheet_rows: int,
) -> dict[str, Path]:
    """The comparison sheet (label, synthetic, real source, nearest train) and the five most similar pairs."""
    source_index = {rid: i for i, rid in enumerate(train.ids)}
    blank = np.zeros(syn_images.shape[2:])
    comparison = []
    for i, row in enumerate(rows[:sheet_rows]):
        src = source_index.get(row["label_source"])
        comparison.append([
            colorize_labels(display_slice(syn_labels[i, 0])), display_slice(syn_images[i, 0]),
            display_slice(train.images[src, 0].numpy() if src is not None else blank),
            display_slice(train.images[nearest[i], 0].numpy()),
        ])
    top = np.argsort(-correlation)[:5]
    pairs = [[display_slice(syn_images[i, 0]), display_slice(train.images[nearest[i], 0].numpy())] for i in top]
    return {
        "Synthetic samples beside real images": save_png(out / "comparison.png", picture_sheet(
            comparison, titles=["label", "synthetic", "real (label src)", "nearest train"])),
        "The five synthetic images most correlated with a training image": save_png(out / "most_similar_pairs.png", picture_sheet(
            pairs, titles=["synthetic", "training"])),
    }


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    exit_on_user_error("evaluate", run, cfg)


if __name__ == "__main__":
    main()
