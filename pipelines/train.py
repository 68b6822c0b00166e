"""Stage 2: the cached dataset in, a trained conditional diffusion model (``checkpoints/last.pt``) out."""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from medsynth import ConfigError, MedsynthError
from medsynth.data import LabelledArrays, infinite_batches, load_split, read_manifest, step_generator
from medsynth.diffusion import Denoiser, denoising_errors, diffusion_loss, from_unit_range, sample
from medsynth.io import colorize_labels, display_slice, picture_sheet, save_png
from medsynth.tracking import NullTracker, Tracker
from medsynth.train.distributed import Distributed, setup_distributed, teardown_distributed
from medsynth.diffusion.denoiser import GUIDED_MODES
from medsynth.diffusion.latent import latent_scale_factor
from medsynth.train import EMA, link_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint, train, warmup_cosine
from medsynth.train.activation import enable_activation_checkpointing
from medsynth.train.autoencoder import AutoencoderSettings, train_autoencoder
from pipelines.common import (
    CONFIG_DIR, build_denoiser, build_sampler, condition_vocabulary, exit_on_user_error, pick_device, resolved, stage_run,
)

log = logging.getLogger("medsynth")


def sample_sheet(
    model: Denoiser, sampler: Any, data: LabelledArrays, *, num: int, steps: int, seed: int, device: torch.device,
    guidance_scale: float = 1.0,
) -> np.ndarray:
    """Samples with fixed seeds as a picture sheet, one row per record of ``data`` whose condition they were given.

    Columns: the label map (generated, or given to a ``mask`` model), the synthetic image, and the
    real record. A label-map generator's rows show generated and real label maps.
    """
    num = min(num, len(data))
    labels, codes = data.labels[:num].to(device), data.codes[:num].to(device)
    x = sample(model, sampler, model.condition(labels, codes), seeds=[seed + i for i in range(num)],
               shape=model.sample_shape(labels.shape[2:]), steps=steps, device=device,
               guidance_scale=guidance_scale if model.conditioning in GUIDED_MODES else 1.0)
    images, generated = model.split(x)
    images = images.cpu() if images is not None else None
    shown = generated.cpu() if generated is not None else labels.cpu()
    rows = []
    for i in range(num):
        row = [colorize_labels(display_slice(shown[i, 0].numpy()))]
        if images is not None:
            row += [display_slice(images[i, 0].numpy()), display_slice(data.images[i, 0].numpy())]
        else:
            row += [colorize_labels(display_slice(data.labels[i, 0].numpy()))]
        rows.append(row)
    titles = ["label", "synthetic", "real"] if images is not None else ["generated label", "real label"]
    return picture_sheet(rows, titles=titles)


def fit_autoencoder(cfg: DictConfig, model: Denoiser, data: LabelledArrays, *, device: torch.device,
                    tracker: Tracker | NullTracker, run_id: str, is_main: bool) -> None:
    """Latent diffusion's first stage: train ``model.autoencoder`` on the training images (or reuse
    ``checkpoints/autoencoder.pt`` made with the same settings), then set ``model.latent_scale``.

    The autoencoder is trained on every rank with the same seed, so all ranks hold the same
    weights; rank 0 saves them.
    """
    config = resolved(cfg)
    settings = AutoencoderSettings(**config["trainer"]["autoencoder"])
    path = Path(cfg.paths.checkpoints) / "autoencoder.pt"
    wanted = {"network": config["model"]["autoencoder"], "settings": dataclasses.asdict(settings)}
    autoencoder = model.autoencoder
    if path.is_file() and (saved := load_checkpoint(path))["config"] == wanted:
        autoencoder.load_state_dict(saved["weights"])
        log.info("train: autoencoder from %s", path)
    else:
        autoencoder.train().requires_grad_(True)
        result = train_autoencoder(
            autoencoder, data, settings=settings, device=device, seed=cfg.seed, progress=cfg.trainer.progress and is_main,
            on_step=lambda step, loss, lr: tracker.log_metrics(run_id, {"autoencoder_loss": loss}, step=step, buffered=True),
        )
        autoencoder.requires_grad_(False).eval()
        tracker.flush(run_id)
        log.info("train: autoencoder %d steps in %.0f s, final L1+KL %.4f", result.steps, result.seconds, result.losses[-1])
        if is_main:
            save_checkpoint(path, {"weights": autoencoder.state_dict(), "config": wanted})
    scale = latent_scale_factor(autoencoder, from_unit_range(data.images))
    model.latent_scale.fill_(scale)
    tracker.log_params(run_id, {"latent_scale": f"{scale:.6g}"})
    log.info("train: latent scale factor %.4g", scale)


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
    ddp = setup_distributed(pick_device(t.device))
    if not ddp.is_main:
        tracker = NullTracker()  # only rank 0 logs and writes
    try:
        with stage_run(cfg, "train", tracker=tracker, parent_run_id=parent_run_id, resume_run_id=resume_run_id) as (tracker, run_id):
            return _train(cfg, tracker, run_id, ddp, resume_path, state)
    finally:
        teardown_distributed()


def _train(cfg: DictConfig, tracker: Tracker | NullTracker, run_id: str, ddp: Distributed, resume_path: Path | None,
           state: dict[str, Any] | None) -> Path:
    """The body of :func:`run` inside its MLflow run, on one rank of a (possibly) distributed job."""
    t = cfg.trainer
    torch.manual_seed(cfg.seed)
    device = ddp.device
    manifest = read_manifest(cfg.paths.data)
    vocabulary = condition_vocabulary(cfg.model, manifest.attribute_values())
    train_data = load_split(manifest, "train", vocabulary=vocabulary)
    validation = load_split(manifest, "validation", vocabulary=vocabulary)
    model = build_denoiser(cfg.model, num_classes=manifest.num_classes, vocabulary=vocabulary).to(device)
    if model.autoencoder is not None and state is None:
        fit_autoencoder(cfg, model, train_data, device=device, tracker=tracker, run_id=run_id, is_main=ddp.is_main)
    if t.gradient_checkpointing:
        enable_activation_checkpointing(model.network)
    scheduler = hydra.utils.instantiate(cfg.scheduler)
    if model.autoencoder is not None and getattr(scheduler, "clip_sample", False):
        raise ConfigError("latent diffusion needs scheduler.clip_sample=false: latents are not confined to [-1, 1]")
    optimizer = hydra.utils.instantiate(t.optimizer)([p for p in model.parameters() if p.requires_grad])
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
    # every rank holds the same weights; DDP averages the gradients of the ranks' batches
    trained = torch.nn.parallel.DistributedDataParallel(model) if ddp.enabled else model
    if t.compile:
        trained = torch.compile(trained, **t.compile_options)
    if state is None:
        tracker.log_params(run_id, {"model_parameters": n_params, "device": str(device), "train_records": len(train_data)})
    log.info("train: %d records, %.2fM parameters, steps %d..%d on %s (rank %d of %d)", len(train_data), n_params / 1e6,
             start_step + 1, t.max_steps, device, ddp.rank, ddp.world_size)

    seed = cfg.seed + 7_919 * ddp.rank  # each rank draws its own batches and noise
    batches = infinite_batches(train_data, batch_size=t.batch_size, seed=seed, flip_dims=list(t.flip_dims),
                               start_step=start_step * t.accumulate)
    val_timesteps = sorted({int(f * (scheduler.num_train_timesteps - 1)) for f in t.validation.timestep_fractions})
    folder = Path(cfg.paths.checkpoints)

    def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, ...], draw: int) -> torch.Tensor:
        images, labels = (x.to(device).contiguous(memory_format=layout) for x in batch[:2])
        condition = model.drop_condition(model.condition(labels, batch[2].to(device)),
                                         generator=step_generator(seed, draw, stream=4))
        noise = step_generator(seed, draw, stream=3)
        return diffusion_loss(m, model.to_sample(images, labels), condition, scheduler, generator=noise)

    sampler = build_sampler(cfg.generate.sampler, cfg.scheduler)

    def sample_grid(step: int) -> None:
        """The EMA model's samples for the first validation records with fixed seeds, logged as a picture."""
        sheet = sample_sheet(ema.shadow, sampler, validation, num=t.grid.num, steps=t.grid.steps, seed=t.grid.seed,
                             device=device, guidance_scale=cfg.generate.guidance_scale)
        tracker.log_artifact(run_id, save_png(folder / f"samples_step{step:07d}.png", sheet), artifact_path="samples")

    def checkpoint(step: int) -> None:
        nonlocal best
        val_loss = float(denoising_errors(ema.shadow, validation.images, validation.labels, scheduler,
                                          timesteps=val_timesteps, codes=validation.codes, seed=cfg.seed).mean())
        tracker.log_metrics(run_id, {"val_loss": val_loss}, step=step)
        improved = val_loss < best
        best = min(best, val_loss)
        path = save_checkpoint(folder / f"step_{step:07d}.pt", {
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else {},
            "step": step, "run_id": run_id, "val_loss": val_loss,
            "best_val_loss": best, "config": resolved(cfg), "label_names": manifest.label_names, "vocabulary": vocabulary,
            "spatial_dims": manifest.spatial_dims,
        })
        tracker.flush(run_id)  # the losses up to this checkpoint are in MLflow before it counts as saved
        link_checkpoint(path, folder / "last.pt")
        if improved:
            link_checkpoint(path, folder / "best.pt")
        prune_checkpoints(folder, keep=t.keep_last)
        if t.grid.num > 0 and (t.grid.every_checkpoint or step == t.max_steps):
            sample_grid(step)

    def on_step(step: int, loss: float, lr: float) -> None:
        tracker.log_metrics(run_id, {"loss": loss, "lr": lr}, step=step, buffered=True)
        if ddp.is_main and (step % t.checkpoint_every == 0 or step == t.max_steps):
            checkpoint(step)

    result = train(
        trained, loss_fn=loss_fn, batches=batches, optimizer=optimizer, max_steps=t.max_steps,
        lr_scheduler=lr_scheduler, ema=ema, grad_clip=t.grad_clip, accumulate=t.accumulate, precision=t.precision,
        scaler=scaler, on_step=on_step, progress=t.progress and ddp.is_main, start_step=start_step,
    )
    if not ddp.is_main:
        return folder / "last.pt"
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

    if not result.steps and t.grid.num > 0:
        sample_grid(max(start_step, t.max_steps))
    if cfg.mlflow.register_model and run_id:
        from medsynth.tracking.model import log_generator

        uri = log_generator(folder / "last.pt", run_id=run_id, tracking_uri=cfg.mlflow.tracking_uri,
                            registered_name=cfg.mlflow.register_model)
        log.info("train: generator logged as MLflow model %s", uri)
    return folder / "last.pt"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    exit_on_user_error("train", run, cfg)


if __name__ == "__main__":
    main()
