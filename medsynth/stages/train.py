"""Stage 2: the cached dataset in, a trained conditional diffusion model (``checkpoints/last.pt``) out."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from monai.networks.schedulers import Scheduler

from medsynth import ConfigError, MedsynthError
from medsynth.config.schema import to_mapping
from medsynth.config.settings import (
    DifferentialPrivacySettings,
    ModelSettings,
    RunSettings,
    SchedulerSettings,
    TrainerSettings,
    check_training,
)
from medsynth.data import LabelledArrays, infinite_batches, load_split, read_manifest
from medsynth.data.deid import secret_file
from medsynth.diffusion import Denoiser
from medsynth.diffusion.generator import Generator, build_denoiser, build_scheduler, generator_state
from medsynth.evaluation.provenance import LINEAGE, file_sha256, preprocess_run_id
from medsynth.io import save_png
from medsynth.progress import progress_bar
from medsynth.stages.context import claim_output, pick_device, stage_run
from medsynth.tracking import NullTracker, TrackerLike
from medsynth.training import TrainResult, save_step_checkpoint
from medsynth.training import train as fit
from medsynth.training.activation import enable_activation_checkpointing
from medsynth.training.autoencoder import fit_autoencoder
from medsynth.training.build import condition_vocabulary
from medsynth.training.checkpoint import prune_checkpoints
from medsynth.training.distributed import Distributed, check_replicas, setup_distributed, teardown_distributed
from medsynth.training.dp_sgd import PatientBatch, patient_batches, private_gradient
from medsynth.training.grid import sample_sheet
from medsynth.training.latent_cache import cached_latent_batches, latent_cache
from medsynth.training.objective import denoising_objective, validation_loss, validation_timesteps
from medsynth.training.privacy import (
    PatientAccountant,
    PrivatePlan,
    check_private_model,
    check_private_run,
    patient_groups,
    private_plan,
    resumed_accountant,
)
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
    With ``trainer.privacy.enabled`` it trains with patient-level DP-SGD (one process) and records
    the (epsilon, delta) spent in every checkpoint's ``privacy`` entry.

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
        MedsynthError: For a missing dataset or a checkpoint that cannot be resumed (with DP: one
            trained without DP, or with other noise).
    """
    with claim_output(run, "train"):  # before the checkpoint is read: no other run may be writing it
        return _claimed_train(model, scheduler, trainer, run, tracker=tracker, parent_run_id=parent_run_id)


def _claimed_train(
    model: ModelSettings,
    scheduler: SchedulerSettings,
    trainer: TrainerSettings,
    run: RunSettings,
    *,
    tracker: TrackerLike | None,
    parent_run_id: str | None,
) -> Path:
    """:func:`train` once it holds the output folder: resume, set up the ranks, train in the stage's MLflow run."""
    config = {"model": to_mapping(model), "scheduler": to_mapping(scheduler), "trainer": to_mapping(trainer)}
    resume_path, saved = resume_state(trainer.resume, checkpoints=run.paths.checkpoints, config=config)
    ddp = setup_distributed(pick_device(run.device))
    if not ddp.is_main:
        tracker = NullTracker()  # only rank 0 logs and writes
    try:
        with stage_run(
            run,
            "train",
            config,
            tracker=tracker,
            parent_run_id=parent_run_id,
            resume_run_id=saved.get("run_id") if saved else None,
        ) as (tracker, run_id):
            return _train(
                model, scheduler, trainer, run, tracker=tracker, run_id=run_id, ddp=ddp, resume_path=resume_path, saved=saved
            )
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
    groups = patient_groups([r.case for r in manifest.split("train")])
    plan, accountant = _private_setup(t, ddp=ddp, num_patients=len(groups), saved=saved, resume_path=resume_path)
    vocabulary = condition_vocabulary(model_settings, manifest.attribute_values())
    train_data = load_split(manifest, "train", vocabulary=vocabulary)
    validation = load_split(manifest, "validation", vocabulary=vocabulary, limit=t.validation.max_records)
    lineage = _lineage(run, saved, tracker=tracker, run_id=run_id, num_records=len(train_data))

    # instantiate: the model (after its autoencoder, for latent diffusion), schedule, optimiser and EMA
    model = build_denoiser(model_settings, num_classes=manifest.num_classes, vocabulary=vocabulary).to(device)
    if plan is not None:
        check_private_model(model)
    if model.autoencoder is not None and model_settings.autoencoder is not None and saved is None:
        scale = fit_autoencoder(
            model,
            train_data,
            network=model_settings.autoencoder,
            settings=t.autoencoder,
            path=folder / "autoencoder.pt",
            device=device,
            seed=run.seed,
            progress=run.progress and ddp.is_main,
            save=ddp.is_main,
            on_step=lambda step, loss, lr: tracker.log_metrics(run_id, {"autoencoder_loss": loss}, step=step, buffered=True),
        )
        tracker.flush(run_id)
        tracker.log_params(run_id, {"latent_scale": f"{scale:.6g}"})
    if t.gradient_checkpointing:
        enable_activation_checkpointing(model.network)
    scheduler = build_scheduler(scheduler_settings)
    layout = torch.channels_last if t.channels_last and manifest.spatial_dims == 2 else torch.contiguous_format
    model.to(memory_format=layout)  # type: ignore[call-overload]  # torch accepts it; its stubs lack the keyword
    state = TrainingState.create(model, t, device=device)
    if saved is not None:
        state.load_state_dict(saved)
        log.info("train: resuming from %s at step %d", resume_path, state.step)
    start_step = state.step
    # every rank holds the same weights; DDP averages the gradients of the ranks' batches
    trained: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(model) if ddp.enabled else model
    if t.compile:
        trained = cast(torch.nn.Module, torch.compile(trained, **t.compile_options))
    n_params = sum(p.numel() for p in model.parameters())
    if saved is None:
        tracker.log_params(
            run_id, {"model_parameters": n_params, "device_resolved": str(device), "train_records": len(train_data)}
        )
        if plan is not None:
            tracker.log_params(run_id, _privacy_params(plan))
    log.info(
        "train: %d records, %.2fM parameters, steps %d..%d on %s (rank %d of %d)",
        len(train_data),
        n_params / 1e6,
        start_step + 1,
        t.max_steps,
        device,
        ddp.rank,
        ddp.world_size,
    )

    # what every checkpoint says about the generator besides its weights (Generator.from_state reads it)
    image_size = [int(s) for s in train_data.images.shape[2:]]
    described = {
        **generator_state(model_settings, scheduler_settings, t.sampling),
        "label_names": manifest.label_names,
        "vocabulary": vocabulary,
        "spatial_dims": manifest.spatial_dims,
        "image_size": image_size,
        **lineage,
    }
    described["config"]["trainer"] = to_mapping(t)
    ema_model = cast(Denoiser, state.ema.shadow)  # the EMA copy of the denoiser
    generator = Generator(ema_model, scheduler_settings, list(manifest.label_names), tuple(image_size), t.sampling)
    timesteps = validation_timesteps(t.validation.timestep_fractions, scheduler.num_train_timesteps)

    def sample_grid(step: int) -> None:
        """The EMA model's samples for the first validation records with fixed seeds, logged as a picture."""
        sheet = sample_sheet(generator, validation, num=t.grid.num, steps=t.grid.steps, seed=t.grid.seed)
        tracker.log_artifact(run_id, save_png(folder / f"samples_step{step:07d}.png", sheet), artifact_path="samples")

    def on_step(step: int, loss: float, lr: float) -> None:
        tracker.log_metrics(run_id, {"loss": loss, "lr": lr}, step=step, buffered=True)
        checkpoint = step % t.checkpoint_every == 0 or step == t.max_steps
        if plan is not None and accountant is not None and (checkpoint or step % 10 == 0):
            tracker.log_metrics(run_id, {"privacy/epsilon": accountant.epsilon(plan.delta)}, step=step, buffered=True)
        if not ddp.is_main or not checkpoint:
            return
        with progress_bar(
            total=len(validation), desc=f"validation at step {step}", unit="record", leave=False, enabled=run.progress
        ) as bar:
            val_loss = validation_loss(ema_model, validation, scheduler, timesteps=timesteps, seed=run.seed, on_batch=bar.update)
        tracker.log_metrics(run_id, {"val_loss": val_loss}, step=step)
        tracker.flush(run_id)  # the losses up to this checkpoint are in MLflow before it counts as saved
        state.step = step
        best = state.record_validation(val_loss)
        private = {"privacy": plan.record(accountant).as_json()} if plan is not None and accountant is not None else {}
        save_step_checkpoint(
            folder,
            step,
            {**state.state_dict(), "run_id": run_id, "val_loss": val_loss, **described, **private},
            best=best,
            keep=t.keep_last,
        )
        if t.grid.num > 0 and (t.grid.every_checkpoint or step == t.max_steps):
            sample_grid(step)

    if (
        ddp.is_main
        and saved is not None
        and start_step < t.max_steps
        and t.grid.num > 0
        and t.grid.every_checkpoint
        and not (folder / f"samples_step{start_step:07d}.png").is_file()
    ):
        sample_grid(start_step)  # the run that saved this step was stopped before its picture

    # fit: each rank draws its own batches and noise; DP-SGD samples patients and noises their clipped gradients
    seed = run.seed + 7_919 * ddp.rank
    batches: Iterator[Any] | None
    batches, gradient_fn = (
        _private_fit(
            model,
            scheduler,
            train_data,
            groups,
            plan,
            accountant,
            t,
            secret_seed=dp_secret_seed(run.paths.output),
            device=device,
            start_step=start_step,
        )
        if plan is not None
        else (None, None)
    )
    cached = plan is None and model.autoencoder is not None and t.latent_cache and start_step < t.max_steps
    if cached:  # the frozen autoencoder's latents, once, instead of encoding every batch
        latents = latent_cache(
            model,
            train_data,
            flip_dims=list(t.flip_dims),
            device=device,
            folder=folder,
            save=ddp.is_main,
            progress=run.progress and ddp.is_main,
        )
        batches = cached_latent_batches(
            latents,
            train_data,
            batch_size=t.batch_size,
            seed=seed,
            flip_dims=list(t.flip_dims),
            start_step=start_step * t.accumulate,
        )
    result = fit(
        trained,
        loss_fn=denoising_objective(model, scheduler, seed=seed, device=device, memory_format=layout, encoded=cached),
        batches=batches
        or infinite_batches(
            train_data, batch_size=t.batch_size, seed=seed, flip_dims=list(t.flip_dims), start_step=start_step * t.accumulate
        ),
        gradient_fn=gradient_fn,
        optimizer=state.optimizer,
        max_steps=t.max_steps,
        lr_scheduler=state.lr_scheduler,
        ema=state.ema,
        grad_clip=t.grad_clip,
        accumulate=t.accumulate,
        precision=t.precision,
        scaler=state.scaler,
        on_step=on_step,
        progress=run.progress and ddp.is_main,
        start_step=start_step,
    )
    check_replicas(model, ddp)
    if ddp.is_main:
        # a run killed between saving its last checkpoint and pruning the older ones finishes the pruning here
        prune_checkpoints(folder, keep=t.keep_last)
        _report(result, tracker=tracker, run_id=run_id, trainer=t, last=folder / "last.pt", start_step=start_step)
        if plan is not None:
            _report_privacy(plan, accountant, tracker=tracker, run_id=run_id)
        if not result.steps and t.grid.num > 0:
            sample_grid(max(start_step, t.max_steps))
        if run.mlflow.register_model and run_id:
            from medsynth.tracking.registry import log_generator

            uri = log_generator(
                folder / "last.pt", run_id=run_id, tracking_uri=run.mlflow.tracking_uri, registered_name=run.mlflow.register_model
            )
            log.info("train: generator logged as MLflow model %s", uri)
    return folder / "last.pt"


def _lineage(
    run: RunSettings, saved: dict[str, Any] | None, *, tracker: TrackerLike, run_id: str, num_records: int
) -> dict[str, Any]:
    """What every checkpoint records about the data it was trained on (the SHA-256 of
    ``data/manifest.json`` and the preprocess run that wrote it); logged as lineage tags and the
    training set as the run's dataset input."""
    data_hash = file_sha256(Path(run.paths.data) / "manifest.json")
    preprocess = preprocess_run_id(run.paths.data, data_manifest_sha256=data_hash)
    if saved is not None and saved.get("data_manifest_sha256") not in (None, data_hash):
        log.warning(
            "train: resuming a model trained on another data/manifest.json (SHA-256 %s..., now %s...); its "
            "checkpoints will name the dataset of now",
            str(saved["data_manifest_sha256"])[:16],
            data_hash[:16],
        )
    tracker.set_tags(
        run_id,
        {f"{LINEAGE}data_manifest_sha256": data_hash, **({f"{LINEAGE}preprocess_run_id": preprocess} if preprocess else {})},
    )
    tracker.log_dataset(
        run_id, name=f"{run.name}/data", sha256=data_hash, source=run.paths.data, context="training", num_records=num_records
    )
    return {"data_manifest_sha256": data_hash, "lineage": {"preprocess_run_id": preprocess}}


def _report(
    result: TrainResult, *, tracker: TrackerLike, run_id: str, trainer: TrainerSettings, last: Path, start_step: int
) -> None:
    """Log the run's speed and final loss (or that the checkpoint was already done)."""
    tracker.flush(run_id)
    if not result.steps:
        log.info("train: %s already holds step %d of %d; nothing to train", last, start_step, trainer.max_steps)
        return
    tracker.log_metrics(
        run_id,
        {
            "train_seconds": result.seconds,
            "train_images_per_second": result.examples_per_second,
            "final_loss_mean_last_10pct": _finite_mean(result.losses[-max(1, len(result.losses) // 10) :]),
        },
        step=trainer.max_steps,
    )
    log.info(
        "train: %d steps in %.0f s (%.1f images/s), checkpoint %s", result.steps, result.seconds, result.examples_per_second, last
    )


def _finite_mean(values: list[float]) -> float:
    """Mean of the finite values (a DP step that sampled no patient has a NaN loss); NaN if none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _private_setup(
    t: TrainerSettings, *, ddp: Distributed, num_patients: int, saved: dict[str, Any] | None, resume_path: Path | None
) -> tuple[PrivatePlan | None, PatientAccountant | None]:
    """The DP plan (calibrated noise) and accountant of a private run, checked before any work; ``(None, None)`` without DP.

    Raises:
        ConfigError: For a distributed run or too few patients.
        MedsynthError: For a checkpoint that cannot be resumed into this private run.
    """
    dp = _dp_settings(t)
    if not dp.enabled:
        return None, None
    check_private_run(distributed=ddp.enabled)
    plan = private_plan(dp, train_patients=num_patients, max_steps=t.max_steps)
    accountant = resumed_accountant(plan, saved, where=str(resume_path))
    log.info(
        "train: patient-level DP-SGD on %d patients: sample rate %.4g, noise multiplier %.4g, clipping %.3g, "
        "target epsilon %.3g at step %d for delta %.3g",
        num_patients,
        plan.sample_rate,
        plan.noise_multiplier,
        dp.max_grad_norm,
        dp.target_epsilon,
        t.max_steps,
        plan.delta,
    )
    return plan, accountant


def _dp_settings(t: TrainerSettings) -> DifferentialPrivacySettings:
    """``trainer.privacy`` as settings (loading the config expands its ``dp`` / ``off`` shorthands)."""
    if not isinstance(t.privacy, DifferentialPrivacySettings):
        raise ConfigError(f"trainer.privacy must be dp, off or a group of DP settings, got {t.privacy!r}")
    return t.privacy


def _private_fit(
    model: Denoiser,
    scheduler: Scheduler,
    train_data: LabelledArrays,
    groups: list[list[int]],
    plan: PrivatePlan,
    accountant: PatientAccountant | None,
    t: TrainerSettings,
    *,
    secret_seed: int,
    device: torch.device,
    start_step: int,
) -> tuple[Iterator[PatientBatch], Callable[[torch.nn.Module, PatientBatch, int], tuple[float, int]]]:
    """The patient batches (from step ``start_step + 1``) and the DP-SGD gradient step of a private run.

    Which patients each step samples and the Gaussian noise come from ``secret_seed``
    (:func:`dp_secret_seed`), never from the public ``seed``: whoever could replay them could
    subtract the noise, and the guarantee would be gone.
    """
    assert accountant is not None
    dp = _dp_settings(t)
    batches = patient_batches(
        train_data,
        groups,
        rate=plan.sample_rate,
        records_per_patient=dp.records_per_patient,
        seed=secret_seed,
        flip_dims=list(t.flip_dims),
        start_step=start_step,
    )
    gradient_fn = private_gradient(
        model,
        scheduler,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_patients=plan.sample_rate * plan.train_patients,
        seed=secret_seed,
        device=device,
        chunk=dp.patients_per_pass,
        on_noised=accountant.step,
    )
    return batches, gradient_fn


def dp_secret_seed(output: str | os.PathLike[str]) -> int:
    """The secret seed of a DP run's patient sampling and noise: ``<output>/secret/dp_seed``.

    32 random bytes made on first use (mode 0600), kept beside the de-identification salt, never
    logged or put in a checkpoint, so a resumed run draws the same noise while nobody who only has
    the config, the checkpoint or the logs can replay it.

    Args:
        output: The run's output folder (``paths.output``).

    Returns:
        A non-negative 63-bit seed.

    Raises:
        MedsynthError: If the file exists but is empty.
    """
    path = Path(output) / "secret" / "dp_seed"
    secret = secret_file(path)
    if not secret:
        raise MedsynthError(
            f"the DP seed file {path} is empty; delete it to make a new one (a resumed run then draws other noise)"
        )
    return int.from_bytes(hashlib.sha256(secret).digest()[:8], "big") >> 1


def _privacy_params(plan: PrivatePlan) -> dict[str, Any]:
    """The DP run's settings as MLflow parameters."""
    return {
        "dp_accountant": plan.settings.accountant,
        "dp_noise_multiplier": f"{plan.noise_multiplier:.6g}",
        "dp_sample_rate": f"{plan.sample_rate:.6g}",
        "dp_delta": f"{plan.delta:.6g}",
        "dp_max_grad_norm": plan.settings.max_grad_norm,
        "dp_target_epsilon": plan.settings.target_epsilon,
        "dp_train_patients": plan.train_patients,
    }


def _report_privacy(plan: PrivatePlan, accountant: PatientAccountant | None, *, tracker: TrackerLike, run_id: str) -> None:
    """Log the epsilon spent by the whole run."""
    assert accountant is not None
    record = plan.record(accountant)
    tracker.log_metrics(run_id, {"privacy/epsilon_final": record.epsilon}, step=record.steps)
    log.info("train: %s after %d steps", record.describe(), record.steps)
