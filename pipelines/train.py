"""Stage 2: the cached dataset in, a trained conditional diffusion model (``checkpoints/last.pt``) out."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from medsynth.data import LabelledArrays, infinite_batches, load_split, read_manifest
from medsynth.diffusion import Denoiser, diffusion_loss, from_unit_range, sample, to_unit_range
from medsynth.io import colorize_labels, display_slice, picture_sheet, save_png
from medsynth.tracking import Tracker
from medsynth.train import EMA, save_checkpoint, train, warmup_cosine
from pipelines.common import CONFIG_DIR, build_denoiser, build_sampler, exit_on_user_error, pick_device, resolved, stage_run

log = logging.getLogger("medsynth")


def sample_sheet(
    model: Denoiser, sampler: Any, data: LabelledArrays, *, num: int, steps: int, seed: int, device: torch.device
) -> np.ndarray:
    """Samples for the first ``num`` label maps of ``data`` with fixed seeds, as a picture sheet.

    Columns: label map, synthetic image, the real image of that label map.
    """
    num = min(num, len(data))
    labels = data.labels[:num].to(device)
    images = to_unit_range(sample(model, sampler, labels, seeds=[seed + i for i in range(num)], steps=steps)).cpu()
    rows = [
        [colorize_labels(display_slice(labels[i, 0].cpu().numpy())), display_slice(images[i, 0].numpy()),
         display_slice(data.images[i, 0].numpy())]
        for i in range(num)
    ]
    return picture_sheet(rows, titles=["label", "synthetic", "real"])


def run(cfg: DictConfig, *, tracker: Tracker | None = None, parent_run_id: str | None = None) -> Path:
    """Train the configured model on the training split.

    Args:
        cfg: The composed config.
        tracker: Tracker to log to (default: from ``cfg.mlflow``).
        parent_run_id: Pipeline run to nest under.

    Returns:
        Path of the final checkpoint.
    """
    t = cfg.trainer
    with stage_run(cfg, "train", tracker=tracker, parent_run_id=parent_run_id) as (tracker, run_id):
        torch.manual_seed(cfg.seed)
        device = pick_device(t.device)
        manifest = read_manifest(cfg.paths.data)
        train_data = load_split(manifest, "train")
        model = build_denoiser(cfg.model, num_classes=manifest.num_classes).to(device)
        scheduler = hydra.utils.instantiate(cfg.scheduler)
        optimizer = hydra.utils.instantiate(t.optimizer)(model.parameters())
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            functools.partial(warmup_cosine, warmup_steps=t.warmup_steps, max_steps=t.max_steps, min_factor=t.min_lr_factor),
        )
        ema = EMA(model, decay=t.ema_decay)
        n_params = sum(p.numel() for p in model.parameters())
        tracker.log_params(run_id, {"model_parameters": n_params, "device": str(device), "train_records": len(train_data)})
        log.info("train: %d records, %.2fM parameters, %d steps on %s", len(train_data), n_params / 1e6, t.max_steps, device)

        noise = torch.Generator().manual_seed(cfg.seed)
        batches = infinite_batches(
            train_data, batch_size=t.batch_size, generator=torch.Generator().manual_seed(cfg.seed), flip_dims=list(t.flip_dims)
        )

        def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            images, labels = batch
            return diffusion_loss(m, from_unit_range(images.to(device)), labels.to(device), scheduler, generator=noise)

        def on_step(step: int, loss: float, lr: float) -> None:
            tracker.log_metrics(run_id, {"loss": loss, "lr": lr}, step=step, buffered=True)

        result = train(
            model, loss_fn=loss_fn, batches=batches, optimizer=optimizer, max_steps=t.max_steps,
            lr_scheduler=lr_scheduler, ema=ema, grad_clip=t.grad_clip, on_step=on_step, progress=t.progress,
        )
        tracker.flush(run_id)
        tracker.log_metrics(run_id, {
            "train_seconds": result.seconds,
            "train_images_per_second": result.examples_per_second,
            "final_loss_mean_last_10pct": float(np.mean(result.losses[-max(1, len(result.losses) // 10):])),
        }, step=result.steps)

        checkpoint = save_checkpoint(Path(cfg.paths.checkpoints) / "last.pt", {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "step": result.steps,
            "run_id": run_id,
            "config": resolved(cfg),
            "label_names": manifest.label_names,
            "spatial_dims": manifest.spatial_dims,
        })
        log.info("train: %d steps in %.0f s (%.1f images/s), checkpoint %s", result.steps, result.seconds,
                 result.examples_per_second, checkpoint)

        grid_data = load_split(manifest, "validation")
        sampler = build_sampler(cfg.generate.sampler, cfg.scheduler)
        sheet = sample_sheet(ema.shadow, sampler, grid_data, num=t.grid.num, steps=t.grid.steps, seed=t.grid.seed, device=device)
        grid_path = save_png(Path(cfg.paths.checkpoints) / f"samples_step{result.steps:06d}.png", sheet)
        tracker.log_artifact(run_id, grid_path, artifact_path="samples")
        return checkpoint


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    exit_on_user_error("train", run, cfg)


if __name__ == "__main__":
    main()
