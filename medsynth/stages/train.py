"""Stage 2: the cached dataset in, a trained conditional diffusion model (``checkpoints/last.pt``) out."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth.config.schema import to_mapping
from medsynth.config.settings import ModelSettings, RunSettings, SchedulerSettings, TrainerSettings, check_training
from medsynth.data import infinite_batches, load_split, read_manifest
from medsynth.diffusion.generator import Generator, build_denoiser, build_scheduler, generator_state
from medsynth.evaluation.provenance import LINEAGE, file_sha256, preprocess_run_id
from medsynth.io import save_png
from medsynth.stages.context import pick_device, stage_run
from medsynth.tracking import NullTracker, TrackerLike
from medsynth.training import TrainResult, save_step_checkpoint
from medsynth.training import train as fit
from medsynth.training.activation import enable_activation_checkpointing
from medsynth.training.autoencoder import fit_autoencoder
from medsynth.training.build import condition_vocabulary
from medsynth.training.distributed import Distributed, setup_distributed, teardown_distributed
from medsynth.training.grid import sample_sheet
from medsynth.training.objective import denoising_objective, validation_loss, validation_timesteps
from medsynth.training.resume import resume_state
from medsynth.training.state import TrainingState

log = logging.getLogger("medsynth")


def train(
    *,
    model: ModelSettings,
    scheduler: SchedulerSettings,
    trainer: TrainerSettings,
    run: RunSettings,
    tracker: TrackerLike | None = None,
    parent_run_id: str | None = None,
) -> Path:
    """Train the configured model on the training split, resuming when ``trainer.resume`` says so.

    Under ``torchrun`` every process trains on its own batches and only rank 0 logs and writes.

    Args:
        model: The denoiser (``conf/model``).
        scheduler: The training noise schedule (``conf/scheduler``).
        trainer: The training loop (``conf/trainer``).
        run: The run's seed, device, folders and tracker settings.
        tracker: Tracker to log to (default: from ``run.mlflow``).
        parent_run_id: Pipeline run to nest under.

    Returns:
        Path of ``checkpoints/last.pt``.

    Raises:
        ConfigError: For settings that do not fit each other or the dataset.
        MedsynthError: For a missing dataset or a checkpoint that cannot be resumed.
    """
    config = {"model": to_mapping(model), "scheduler": to_mapping(scheduler), "trainer": to_mapping(trainer)}
    resume_path, saved = resume_state(trainer.resume, checkpoints=run.paths.checkpoints, config=config)
    ddp = setup_distributed(pick_device(run.device))
    if not ddp.is_main:
        tracker = NullTracker()  # only rank 0 logs and writes
    try:
        with stage_run(run, "train", config, tracker=tracker, parent_run_id=parent_run_id,
                       resume_run_id=saved.get("run_id") if saved else None) as (tracker, run_id):
            return _train(model, scheduler, trainer, run, tracker=tracker, run_id=run_id, ddp=ddp,
                          resume_path=resume_path, saved=saved)
    finally:
        teardown_distributed()


def _train(
    model_settings: ModelSettings,
    scheduler_settings: SchedulerSettings,
    t: TrainerSettings,
    run: RunSettings,
    *,
    tracker: TrackerLike,
    run_id: str,
    ddp: Distributed,
    resume_path: Path | None,
    saved: dict[str, Any] | None,
) -> Path:
    """The body of :func:`train` inside its MLflow run, on one rank of a (possibly) distributed job."""
    torch.manual_seed(run.seed)
    device, folder = ddp.device, Path(run.paths.checkpoints)
    manifest = read_manifest(run.paths.data)
    check_training(model_settings, scheduler_settings, t, spatial_dims=manifest.spatial_dims)
    vocabulary = condition_vocabulary(model_settings, manifest.attribute_values())
    train_data = load_split(manifest, "train", vocabulary=vocabulary)
    validation = load_split(manifest, "validation", vocabulary=vocabulary)
    lineage = _lineage(run, saved, tracker=tracker, run_id=run_id, num_records=len(train_data))

    # instantiate: the model (after its autoencoder, for latent diffusion), schedule, optimiser and EMA
    model = build_denoiser(model_settings, num_classes=manifest.num_classes, vocabulary=vocabulary).to(device)
    if model.autoencoder is not None and saved is None:
        scale = fit_autoencoder(
            model, train_data, network=model_settings.autoencoder, settings=t.autoencoder, path=folder / "autoencoder.pt",
            device=device, seed=run.seed, progress=run.progress and ddp.is_main, save=ddp.is_main,
            on_step=lambda step, loss, lr: tracker.log_metrics(run_id, {"autoencoder_loss": loss}, step=step, buffered=True),
        )
        tracker.flush(run_id)
        tracker.log_params(run_id, {"latent_scale": f"{scale:.6g}"})
    if t.gradient_checkpointing:
        enable_activation_checkpointing(model.network)
    scheduler = build_scheduler(scheduler_settings)
    layout = torch.channels_last if t.channels_last and manifest.spatial_dims == 2 else torch.contiguous_format
    model.to(memory_format=layout)
    state = TrainingState.create(model, t, device=device)
    if saved is not None:
        state.load_state_dict(saved)
        log.info("train: resuming from %s at step %d", resume_path, state.step)
    start_step = state.step
    # every rank holds the same weights; DDP averages the gradients of the ranks' batches
    trained = torch.nn.parallel.DistributedDataParallel(model) if ddp.enabled else model
    if t.compile:
        trained = torch.compile(trained, **t.compile_options)
    n_params = sum(p.numel() for p in model.parameters())
    if saved is None:
        tracker.log_params(run_id, {"model_parameters": n_params, "device_resolved": str(device), "train_records": len(train_data)})
    log.info("train: %d records, %.2fM parameters, steps %d..%d on %s (rank %d of %d)", len(train_data), n_params / 1e6,
             start_step + 1, t.max_steps, device, ddp.rank, ddp.world_size)

    # what every checkpoint says about the generator besides its weights (Generator.from_state reads it)
    image_size = [int(s) for s in train_data.images.shape[2:]]
    described = {**generator_state(model_settings, scheduler_settings, t.sampling), "label_names": manifest.label_names,
                 "vocabulary": vocabulary, "spatial_dims": manifest.spatial_dims, "image_size": image_size, **lineage}
    described["config"]["trainer"] = to_mapping(t)
    generator = Generator(state.ema.shadow, scheduler_settings, list(manifest.label_names), tuple(image_size), t.sampling)
    timesteps = validation_timesteps(t.validation.timestep_fractions, scheduler.num_train_timesteps)

    def sample_grid(step: int) -> None:
        """The EMA model's samples for the first validation records with fixed seeds, logged as a picture."""
        sheet = sample_sheet(generator, validation, num=t.grid.num, steps=t.grid.steps, seed=t.grid.seed)
        tracker.log_artifact(run_id, save_png(folder / f"samples_step{step:07d}.png", sheet), artifact_path="samples")

    def on_step(step: int, loss: float, lr: float) -> None:
        tracker.log_metrics(run_id, {"loss": loss, "lr": lr}, step=step, buffered=True)
        if not ddp.is_main or (step % t.checkpoint_every and step != t.max_steps):
            return
        val_loss = validation_loss(state.ema.shadow, validation, scheduler, timesteps=timesteps, seed=run.seed)
        tracker.log_metrics(run_id, {"val_loss": val_loss}, step=step)
        tracker.flush(run_id)  # the losses up to this checkpoint are in MLflow before it counts as saved
        state.step = step
        best = state.record_validation(val_loss)
        save_step_checkpoint(folder, step, {**state.state_dict(), "run_id": run_id, "val_loss": val_loss, **described},
                             best=best, keep=t.keep_last)
        if t.grid.num > 0 and (t.grid.every_checkpoint or step == t.max_steps):
            sample_grid(step)

    # fit: each rank draws its own batches and noise
    seed = run.seed + 7_919 * ddp.rank
    result = fit(
        trained, loss_fn=denoising_objective(model, scheduler, seed=seed, device=device, memory_format=layout),
        batches=infinite_batches(train_data, batch_size=t.batch_size, seed=seed, flip_dims=list(t.flip_dims),
                                 start_step=start_step * t.accumulate),
        optimizer=state.optimizer, max_steps=t.max_steps, lr_scheduler=state.lr_scheduler, ema=state.ema,
        grad_clip=t.grad_clip, accumulate=t.accumulate, precision=t.precision, scaler=state.scaler, on_step=on_step,
        progress=run.progress and ddp.is_main, start_step=start_step,
    )
    if ddp.is_main:
        _report(result, tracker=tracker, run_id=run_id, trainer=t, last=folder / "last.pt", start_step=start_step)
        if not result.steps and t.grid.num > 0:
            sample_grid(max(start_step, t.max_steps))
        if run.mlflow.register_model and run_id:
            from medsynth.tracking.registry import log_generator

            uri = log_generator(folder / "last.pt", run_id=run_id, tracking_uri=run.mlflow.tracking_uri,
                                registered_name=run.mlflow.register_model)
            log.info("train: generator logged as MLflow model %s", uri)
    return folder / "last.pt"


def _lineage(run: RunSettings, saved: dict[str, Any] | None, *, tracker: TrackerLike, run_id: str,
             num_records: int) -> dict[str, Any]:
    """What every checkpoint records about the data it was trained on (the SHA-256 of
    ``data/manifest.json`` and the preprocess run that wrote it); logged as lineage tags and the
    training set as the run's dataset input."""
    data_hash = file_sha256(Path(run.paths.data) / "manifest.json")
    preprocess = preprocess_run_id(run.paths.data, data_manifest_sha256=data_hash)
    if saved is not None and saved.get("data_manifest_sha256") not in (None, data_hash):
        log.warning("train: resuming a model trained on another data/manifest.json (SHA-256 %s..., now %s...); its "
                    "checkpoints will name the dataset of now", str(saved["data_manifest_sha256"])[:16], data_hash[:16])
    tracker.set_tags(run_id, {f"{LINEAGE}data_manifest_sha256": data_hash,
                              **({f"{LINEAGE}preprocess_run_id": preprocess} if preprocess else {})})
    tracker.log_dataset(run_id, name=f"{run.name}/data", sha256=data_hash, source=run.paths.data,
                        context="training", num_records=num_records)
    return {"data_manifest_sha256": data_hash, "lineage": {"preprocess_run_id": preprocess}}


def _report(result: TrainResult, *, tracker: TrackerLike, run_id: str, trainer: TrainerSettings, last: Path,
            start_step: int) -> None:
    """Log the run's speed and final loss (or that the checkpoint was already done)."""
    tracker.flush(run_id)
    if not result.steps:
        log.info("train: %s already holds step %d of %d; nothing to train", last, start_step, trainer.max_steps)
        return
    tracker.log_metrics(run_id, {
        "train_seconds": result.seconds,
        "train_images_per_second": result.examples_per_second,
        "final_loss_mean_last_10pct": float(np.mean(result.losses[-max(1, len(result.losses) // 10):])),
    }, step=trainer.max_steps)
    log.info("train: %d steps in %.0f s (%.1f images/s), checkpoint %s", result.steps, result.seconds,
             result.examples_per_second, last)
