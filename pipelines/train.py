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

from medsynth import MedsynthError
from medsynth.data import LabelledArrays, infinite_batches, load_split, read_manifest, step_generator
from medsynth.diffusion import Denoiser, denoising_errors, diffusion_loss, from_unit_range, sample, to_unit_range
from medsynth.io import colorize_labels, display_slice, picture_sheet, save_png
from medsynth.tracking import Tracker
from medsynth.train import EMA, link_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint, train, warmup_cosine
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


def resume_state(cfg: DictConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint ``trainer.resume`` asks to continue from, loaded; ``(None, None)`` for a fresh start.

    ``auto`` continues from ``checkpoints/last.pt`` when it exists. A checkpoint made with another
    model or noise schedule is refused, naming the differing section.
    """
    choice = cfg.trainer.resume
    if not choice:
        return None, None
    path = Path(cfg.paths.checkpoints) / "last.pt" if choice == "auto" else Path(choice)
    if choice == "auto" and not path.is_file():
        return None, None
    state = load_checkpoint(path)
    current = resolved(cfg)
    for section in ("model", "scheduler"):
        if state["config"].get(section) != current[section]:
            raise MedsynthError(f"cannot resume from {path}: it was trained with another `{section}` config")
    return path, state


def run(cfg: DictConfig, *, tracker: Tracker | None = None, parent_run_id: str | None = None) -> Path:
    """Train the configured model on the training split, resuming when ``trainer.resume`` says so.

    Args:
        cfg: The composed config.
        tracker: Tracker to log to (default: from ``cfg.mlflow``).
        parent_run_id: Pipeline run to nest under.

    Returns:
        Path of ``checkpoints/last.pt``.
    """
    t = cfg.trainer
    resume_path, state = resume_state(cfg)
    resume_run_id = state.get("run_id") if state else None
    with stage_run(cfg, "train", tracker=tracker, parent_run_id=parent_run_id, resume_run_id=resume_run_id) as (tracker, run_id):
        torch.manual_seed(cfg.seed)
        device = pick_device(t.device)
        manifest = read_manifest(cfg.paths.data)
        train_data, validation = load_split(manifest, "train"), load_split(manifest, "validation")
        model = build_denoiser(cfg.model, num_classes=manifest.num_classes).to(device)
        scheduler = hydra.utils.instantiate(cfg.scheduler)
        optimizer = hydra.utils.instantiate(t.optimizer)(model.parameters())
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            functools.partial(warmup_cosine, warmup_steps=t.warmup_steps, max_steps=t.max_steps, min_factor=t.min_lr_factor),
        )
        layout = torch.channels_last if t.channels_last and manifest.spatial_dims == 2 else torch.contiguous_format
        model.to(memory_format=layout)
        ema = EMA(model, decay=t.ema_decay)
        scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
        start_step, best = 0, float("inf")
        if state is not None:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            lr_scheduler.load_state_dict(state["lr_scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start_step, best = int(state["step"]), float(state.get("best_val_loss", float("inf")))
            log.info("train: resuming from %s at step %d", resume_path, start_step)
        n_params = sum(p.numel() for p in model.parameters())
        if state is None:
            tracker.log_params(run_id, {"model_parameters": n_params, "device": str(device), "train_records": len(train_data)})
        log.info("train: %d records, %.2fM parameters, steps %d..%d on %s", len(train_data), n_params / 1e6,
                 start_step + 1, t.max_steps, device)

        batches = infinite_batches(train_data, batch_size=t.batch_size, seed=cfg.seed, flip_dims=list(t.flip_dims),
                                   start_step=start_step * t.accumulate)
        val_timesteps = sorted({int(f * (scheduler.num_train_timesteps - 1)) for f in t.validation.timestep_fractions})
        folder = Path(cfg.paths.checkpoints)

        def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], draw: int) -> torch.Tensor:
            images, labels = (x.to(device).contiguous(memory_format=layout) for x in batch)
            noise = step_generator(cfg.seed, draw, stream=3)
            return diffusion_loss(m, from_unit_range(images), labels, scheduler, generator=noise)

        def checkpoint(step: int) -> None:
            nonlocal best
            val_loss = float(denoising_errors(ema.shadow, from_unit_range(validation.images), validation.labels, scheduler,
                                              timesteps=val_timesteps, seed=cfg.seed).mean())
            tracker.log_metrics(run_id, {"val_loss": val_loss}, step=step)
            improved = val_loss < best
            best = min(best, val_loss)
            path = save_checkpoint(folder / f"step_{step:07d}.pt", {
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else {},
                "step": step, "run_id": run_id, "val_loss": val_loss,
                "best_val_loss": best, "config": resolved(cfg), "label_names": manifest.label_names,
                "spatial_dims": manifest.spatial_dims,
            })
            tracker.flush(run_id)  # the losses up to this checkpoint are in MLflow before it counts as saved
            link_checkpoint(path, folder / "last.pt")
            if improved:
                link_checkpoint(path, folder / "best.pt")
            prune_checkpoints(folder, keep=t.keep_last)

        def on_step(step: int, loss: float, lr: float) -> None:
            tracker.log_metrics(run_id, {"loss": loss, "lr": lr}, step=step, buffered=True)
            if step % t.checkpoint_every == 0 or step == t.max_steps:
                checkpoint(step)

        result = train(
            model, loss_fn=loss_fn, batches=batches, optimizer=optimizer, max_steps=t.max_steps,
            lr_scheduler=lr_scheduler, ema=ema, grad_clip=t.grad_clip, accumulate=t.accumulate, precision=t.precision,
            scaler=scaler, on_step=on_step, progress=t.progress, start_step=start_step,
        )
        tracker.flush(run_id)
        if result.steps:
            tracker.log_metrics(run_id, {
                "train_seconds": result.seconds,
                "train_images_per_second": result.examples_per_second,
                "final_loss_mean_last_10pct": float(np.mean(result.losses[-max(1, len(result.losses) // 10):])),
            }, step=t.max_steps)
            log.info("train: %d steps in %.0f s (%.1f images/s), checkpoint %s", result.steps, result.seconds,
                     result.examples_per_second, folder / "last.pt")
        else:
            log.info("train: %s already holds step %d of %d; nothing to train", resume_path, start_step, t.max_steps)

        sampler = build_sampler(cfg.generate.sampler, cfg.scheduler)
        sheet = sample_sheet(ema.shadow, sampler, validation, num=t.grid.num, steps=t.grid.steps, seed=t.grid.seed, device=device)
        grid_path = save_png(folder / f"samples_step{max(start_step, t.max_steps):07d}.png", sheet)
        tracker.log_artifact(run_id, grid_path, artifact_path="samples")
        return folder / "last.pt"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    exit_on_user_error("train", run, cfg)


if __name__ == "__main__":
    main()
