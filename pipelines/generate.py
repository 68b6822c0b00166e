"""Stage 3: a checkpoint in, synthetic images with their label maps and ``synthetic/manifest.csv`` out."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from medsynth import MedsynthError, __version__
from medsynth.data import load_split, read_manifest
from medsynth.diffusion import sample
from medsynth.diffusion.denoiser import GUIDED_MODES
from medsynth.io import colorize_labels, display_slice, picture_sheet, save_nifti, save_png, write_text
from medsynth.tracking import Tracker
from medsynth.train import file_sha256, load_checkpoint
from medsynth.transforms import label_augmentation
from pipelines.common import CONFIG_DIR, build_sampler, exit_on_user_error, load_ema_model, pick_device, stage_run

log = logging.getLogger("medsynth")

FORMATS = ("nifti", "png")
MANIFEST_COLUMNS = (
    "sample_id", "image", "label", "preview", "seed", "label_source", "attributes", "checkpoint", "checkpoint_sha256",
    "train_run_id", "sampler", "steps", "eta", "guidance_scale", "medsynth_version",
)


def augmented_label(label: torch.Tensor, *, seed: int, augment: DictConfig, spatial_dims: int) -> torch.Tensor:
    """A randomly flipped and slightly warped copy of a ``(1, *spatial)`` label map, fixed by ``seed``."""
    chain = label_augmentation(
        flip_prob=augment.flip_prob, rotate_range=augment.rotate_range, scale_range=augment.scale_range,
        translate_range=augment.translate_range, spatial_dims=spatial_dims,
    )
    chain.set_random_state(seed=seed)
    out = chain({"label": label.float()})["label"]
    return torch.as_tensor(out).round().long()


def describe_codes(vocabulary: dict[str, list[str]], codes: torch.Tensor) -> str:
    """Attribute codes as ``key=value`` pairs separated by spaces (the prompt syntax); "not given" is left out."""
    return " ".join(f"{key}={values[int(c)]}" for (key, values), c in zip(vocabulary.items(), codes) if int(c) < len(values))


def _write_manifest(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def run(cfg: DictConfig, *, tracker: Tracker | None = None, parent_run_id: str | None = None) -> Path:
    """Generate ``generate.num_samples`` labelled synthetic images.

    Args:
        cfg: The composed config.
        tracker: Tracker to log to (default: from ``cfg.mlflow``).
        parent_run_id: Pipeline run to nest under.

    Returns:
        Path of ``synthetic/manifest.csv``.
    """
    g = cfg.generate
    unknown = sorted(set(g.formats) - set(FORMATS))
    if unknown:
        raise MedsynthError(f"generate.formats: unknown format(s) {unknown}; choose from {list(FORMATS)}")
    if g.num_samples < 1:
        raise MedsynthError(f"generate.num_samples must be >= 1, got {g.num_samples}")
    with stage_run(cfg, "generate", tracker=tracker, parent_run_id=parent_run_id) as (tracker, run_id):
        device = pick_device(g.device)
        checkpoint_path = Path(g.checkpoint)
        ckpt = load_checkpoint(checkpoint_path)
        train_cfg = OmegaConf.create(ckpt["config"])
        manifest = read_manifest(cfg.paths.data)
        if list(ckpt["label_names"]) != manifest.label_names:
            raise MedsynthError(
                f"checkpoint {checkpoint_path} was trained on labels {ckpt['label_names']}, "
                f"but the dataset at {manifest.root} has {manifest.label_names}"
            )
        model = load_ema_model(ckpt, checkpoint_path, num_classes=manifest.num_classes).to(device)
        sampler = build_sampler(g.sampler, train_cfg.scheduler)
        checkpoint_hash = file_sha256(checkpoint_path)
        source = load_split(manifest, g.labels.split, vocabulary=model.vocabulary)
        shape = model.sample_shape(source.images.shape[2:])
        guided = model.conditioning in GUIDED_MODES

        out = Path(cfg.paths.synthetic)
        rows: list[dict] = []
        previews: list[list[np.ndarray]] = []
        bar = tqdm(total=g.num_samples, desc="generate", unit="sample", disable=not cfg.trainer.progress)
        for start in range(0, g.num_samples, g.batch_size):
            seeds = [g.seed + i for i in range(start, min(start + g.batch_size, g.num_samples))]
            # the seed picks a record: its label map (augmented) for mask models, its attributes for
            # class/attributes models (so they follow the split's distribution), its geometry always
            picks = [int(np.random.default_rng(s).integers(len(source))) for s in seeds]
            given = torch.stack([
                augmented_label(source.labels[p], seed=s, augment=g.labels, spatial_dims=manifest.spatial_dims)
                for p, s in zip(picks, seeds)
            ]) if model.conditioning == "mask" else None
            codes = source.codes[picks]
            condition = model.condition(given, codes)
            x = sample(model, sampler, condition.to(device) if condition is not None else None, seeds=seeds, shape=shape,
                       steps=g.steps, eta=g.eta, guidance_scale=g.guidance_scale if guided else 1.0, device=device)
            images, generated = model.split(x)
            labels = generated.cpu() if generated is not None else given
            for k, (seed, pick) in enumerate(zip(seeds, picks)):
                sample_id = f"syn_{seed - g.seed:05d}"
                affine = source.affines[pick]
                row = {
                    "sample_id": sample_id, "image": "", "label": "", "preview": "", "seed": seed,
                    "label_source": source.ids[pick] if given is not None else ("generated" if labels is not None else ""),
                    "attributes": describe_codes(model.vocabulary, codes[k]), "checkpoint": str(checkpoint_path),
                    "checkpoint_sha256": checkpoint_hash, "train_run_id": ckpt.get("run_id", ""),
                    "sampler": g.sampler._target_.rsplit(".", 1)[-1], "steps": g.steps, "eta": g.eta,
                    "guidance_scale": g.guidance_scale if guided else "", "medsynth_version": __version__,
                }
                image = images[k, 0].cpu().numpy() if images is not None else None
                label = labels[k, 0].numpy() if labels is not None else None
                if "nifti" in g.formats:
                    if image is not None:
                        row["image"] = save_nifti(out / "images" / f"{sample_id}.nii.gz", image, affine, dtype=np.float32).relative_to(out).as_posix()
                    if label is not None:
                        row["label"] = save_nifti(out / "labels" / f"{sample_id}.nii.gz", label, affine, dtype=np.uint8).relative_to(out).as_posix()
                if "png" in g.formats and manifest.spatial_dims == 2:
                    blank = np.zeros(source.images.shape[2:], dtype=np.float32)
                    pair = [colorize_labels(display_slice(label if label is not None else blank.astype(np.uint8))),
                            display_slice(image if image is not None else blank)]
                    row["preview"] = save_png(out / "previews" / f"{sample_id}.png", picture_sheet([pair])).relative_to(out).as_posix()
                    if len(previews) < 16:
                        previews.append(pair)
                rows.append(row)
            _write_manifest(out / "manifest.csv", rows)
            bar.update(len(seeds))
        bar.close()
        tracker.log_params(run_id, {"checkpoint_sha256": checkpoint_hash, "num_samples": g.num_samples})
        tracker.log_artifact(run_id, out / "manifest.csv", artifact_path="synthetic")
        if previews:
            grid = save_png(out / "samples.png", picture_sheet(previews, titles=["label", "synthetic"]))
            tracker.log_artifact(run_id, grid, artifact_path="synthetic")
        log.info("generate: %d samples -> %s", len(rows), out / "manifest.csv")
        return out / "manifest.csv"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    exit_on_user_error("generate", run, cfg)


if __name__ == "__main__":
    main()
