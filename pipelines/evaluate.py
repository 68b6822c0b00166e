"""Stage 4: the synthetic set and the real splits in, realism and privacy figures out."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from medsynth import MedsynthError
from medsynth.data import load_split, read_manifest
from medsynth.io import colorize_labels, display_slice, load_nifti, picture_sheet, save_png, write_json
from medsynth.metrics import closer_to_train_fraction, mean_pairwise_ssim, nearest_neighbours, tissue_intensity_distances
from medsynth.tracking import Tracker
from pipelines.common import CONFIG_DIR, exit_on_user_error, stage_run

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
    return rows, np.stack(images), np.rint(np.stack(labels)).astype(np.int64)


def figure(value: float, *, better: str, meaning: str, reference: float | None = None) -> dict[str, Any]:
    """One entry of ``metrics.json``: the value, which way is better, and a reference to read it against."""
    entry: dict[str, Any] = {"value": float(value), "better": better, "meaning": meaning}
    if reference is not None:
        entry["reference"] = float(reference)
    return entry


def run(cfg: DictConfig, *, tracker: Tracker | None = None, parent_run_id: str | None = None) -> Path:
    """Compute realism and privacy figures of the synthetic set listed in ``synthetic/manifest.csv``.

    Args:
        cfg: The composed config.
        tracker: Tracker to log to (default: from ``cfg.mlflow``).
        parent_run_id: Pipeline run to nest under.

    Returns:
        Path of ``evaluation/metrics.json``.
    """
    e = cfg.evaluate
    with stage_run(cfg, "evaluate", tracker=tracker, parent_run_id=parent_run_id) as (tracker, run_id):
        manifest = read_manifest(cfg.paths.data)
        rows, syn_images, syn_labels = read_synthetic(Path(cfg.paths.synthetic), spatial_dims=manifest.spatial_dims)
        train = load_split(manifest, "train")
        holdout = load_split(manifest, "holdout")
        train_images, holdout_images = train.images.numpy(), holdout.images.numpy()
        if syn_images.shape[1:] != holdout_images.shape[1:]:
            raise MedsynthError(
                f"synthetic images have shape {syn_images.shape[1:]}, the dataset {holdout_images.shape[1:]}: "
                "generate again from a model trained on this dataset"
            )
        names = manifest.label_names
        dims = manifest.spatial_dims

        metrics: dict[str, dict[str, Any]] = {}
        syn_tissue = tissue_intensity_distances(holdout_images, holdout.labels.numpy(), syn_images, syn_labels, label_names=names)
        ref_tissue = tissue_intensity_distances(holdout_images, holdout.labels.numpy(), train_images, train.labels.numpy(), label_names=names)
        for name, value in syn_tissue.items():
            metrics[f"realism/intensity_w1_{name}"] = figure(
                value, better="lower", reference=ref_tissue.get(name),
                meaning=f"Wasserstein-1 distance of {name} intensities, synthetic vs real holdout ([0,1] scale); reference: real train vs holdout",
            )
        metrics["realism/ssim_diversity"] = figure(
            mean_pairwise_ssim(syn_images, spatial_dims=dims, max_pairs=e.max_ssim_pairs), better="closer to reference",
            reference=mean_pairwise_ssim(holdout_images, spatial_dims=dims, max_pairs=e.max_ssim_pairs),
            meaning="mean SSIM between pairs of synthetic images; reference: the same among real holdout images; above it = too little variety",
        )

        to_train, nearest_train = nearest_neighbours(syn_images, train_images)
        to_holdout, _ = nearest_neighbours(syn_images, holdout_images)
        holdout_to_train, _ = nearest_neighbours(holdout_images, train_images)
        metrics["privacy/closer_to_train_fraction"] = figure(
            closer_to_train_fraction(to_train, to_holdout), better="0.5 (higher = memorisation)", reference=0.5,
            meaning="fraction of synthetic images nearer to a training image than to any holdout image (pixel RMSE)",
        )
        metrics["privacy/min_distance_to_train"] = figure(
            to_train.min(), better="higher", reference=holdout_to_train.min(),
            meaning="smallest pixel RMSE from a synthetic image to a training image; reference: smallest holdout-to-train distance",
        )
        metrics["privacy/p05_distance_to_train"] = figure(
            np.percentile(to_train, 5), better="higher", reference=np.percentile(holdout_to_train, 5),
            meaning="5th percentile of synthetic-to-train pixel RMSE; reference: the same for holdout-to-train",
        )
        metrics["privacy/median_distance_to_train"] = figure(
            np.median(to_train), better="close to reference", reference=np.median(holdout_to_train),
            meaning="median synthetic-to-train pixel RMSE; reference: the same for holdout-to-train",
        )
        metrics["privacy/below_holdout_p05_count"] = figure(
            int(np.sum(to_train < np.percentile(holdout_to_train, 5))), better="lower",
            meaning="synthetic images nearer to a training image than 95% of real holdout images are",
        )

        out = Path(cfg.paths.evaluation)
        body = {"num_synthetic": len(rows), "num_train": len(train), "num_holdout": len(holdout), "metrics": metrics}
        metrics_path = write_json(out / "metrics.json", body)
        tracker.log_metrics(run_id, {name.replace("/", "_"): m["value"] for name, m in metrics.items()})
        tracker.log_artifact(run_id, metrics_path, artifact_path="evaluation")

        if dims == 2:
            source_index = {rid: i for i, rid in enumerate(train.ids)}
            sheet_rows = []
            for i, row in enumerate(rows[: e.sheet_rows]):
                src = source_index.get(row["label_source"])
                real = train.images[src, 0].numpy() if src is not None else np.zeros(syn_images.shape[2:])
                sheet_rows.append([
                    colorize_labels(display_slice(syn_labels[i, 0])), display_slice(syn_images[i, 0]),
                    display_slice(real), display_slice(train_images[nearest_train[i], 0]),
                ])
            sheet = save_png(out / "comparison.png", picture_sheet(
                sheet_rows, titles=["label", "synthetic", "real (label src)", "nearest train"]))
            tracker.log_artifact(run_id, sheet, artifact_path="evaluation")
        log.info("evaluate: %s", ", ".join(f"{k}={v['value']:.4g}" for k, v in metrics.items()))
        return metrics_path


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    exit_on_user_error("evaluate", run, cfg)


if __name__ == "__main__":
    main()
