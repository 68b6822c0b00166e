"""What every stage shares: the Hydra entry shim, the MLflow stage run, device choice."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hydra
import torch
from monai.networks.schedulers import Scheduler
from omegaconf import DictConfig, OmegaConf

from medsynth import ConfigError, MedsynthError, __version__
from medsynth.data import LabelledArrays
from medsynth.diffusion import Denoiser
from medsynth.diffusion.denoiser import default_output, network_channels, network_options
from medsynth.io import write_text
from medsynth.metrics.realism import orthogonal_slices
from medsynth.tracking import NullTracker, Tracker, flatten
from medsynth.train import file_sha256, load_checkpoint, save_checkpoint
from medsynth.train.encoder import FeatureEncoder, train_encoder

log = logging.getLogger("medsynth")

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
"""Absolute path of the ``conf/`` folder, so the stages compose the same config however they are started."""


def exit_on_user_error(stage: str, run: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Call ``run(cfg)``; a :class:`MedsynthError` ends the process with its message alone and status 2.

    Set ``MEDSYNTH_DEBUG=1`` to see the traceback instead.
    """
    try:
        return run(cfg)
    except MedsynthError as err:
        if os.environ.get("MEDSYNTH_DEBUG"):
            raise
        print(f"medsynth {stage}: error: {err}", file=sys.stderr)
        sys.exit(2)


def make_tracker(cfg: DictConfig) -> Tracker:
    """The MLflow tracker configured by ``cfg.mlflow``."""
    return Tracker(
        cfg.mlflow.tracking_uri, cfg.mlflow.experiment_name, artifact_location=cfg.mlflow.artifact_location
    )


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain, fully resolved Python containers."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def log_config(tracker: Tracker, run_id: str, cfg: DictConfig) -> None:
    """Log the flattened resolved config as params and the YAML as ``config.yaml``."""
    tracker.log_params(run_id, flatten(resolved(cfg)))
    path = Path(cfg.paths.output) / "config.yaml"
    write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    tracker.log_artifact(run_id, path)


@contextlib.contextmanager
def stage_run(
    cfg: DictConfig,
    stage: str,
    *,
    tracker: Tracker | NullTracker | None = None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
) -> Iterator[tuple[Tracker, str]]:
    """An MLflow run for one stage, nested under ``parent_run_id`` when the stage is part of ``run``.

    A top-level stage run logs the resolved config itself; a nested one leaves that to its parent.
    ``resume_run_id`` continues an earlier run of the stage (a resumed training) when the store has it.
    """
    tracker = tracker or make_tracker(cfg)
    tags = {"medsynth.stage": stage, "medsynth.version": __version__, "medsynth.output": str(Path(cfg.paths.output).resolve())}
    with tracker.run(stage, parent_run_id=parent_run_id, tags=tags, resume_run_id=resume_run_id) as run_id:
        if parent_run_id is None and run_id and run_id != resume_run_id:
            log_config(tracker, run_id, cfg)
        if run_id:
            log.info("%s: MLflow run %s", stage, run_id)
        yield tracker, run_id


def pick_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; other names are passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MedsynthError(f"device={name} was asked for, but no CUDA device is available")
    return device


def condition_vocabulary(model_cfg: DictConfig, attribute_values: dict[str, list[str]]) -> dict[str, list[str]]:
    """The attributes (and their values) a model is conditioned on, from the dataset's vocabulary.

    ``class`` uses ``model.class_key``; ``attributes`` uses ``model.attribute_keys`` (all the
    dataset's attributes when null); other modes use none.

    Raises:
        ConfigError: If a named attribute is not in the dataset.
    """
    mode = model_cfg.conditioning
    if mode == "class":
        keys = [model_cfg.class_key]
    elif mode == "attributes":
        keys = list(model_cfg.attribute_keys) if model_cfg.attribute_keys else sorted(attribute_values)
    else:
        return {}
    missing = [k for k in keys if k not in attribute_values]
    if missing:
        raise ConfigError(
            f"model.conditioning={mode} needs attribute(s) {missing}, but the dataset's records have "
            f"{sorted(attribute_values) or 'none'}; set model.class_key / model.attribute_keys or add attributes in preprocessing"
        )
    return {k: list(attribute_values[k]) for k in keys}


def build_denoiser(model_cfg: DictConfig, *, num_classes: int, vocabulary: dict[str, list[str]] | None = None) -> Denoiser:
    """Instantiate ``model_cfg.network`` with the channels and condition inputs its mode needs, as a :class:`Denoiser`.

    With ``model_cfg.autoencoder`` (latent diffusion) the autoencoder network is built too, with
    untrained weights: training fits it first, a checkpoint restores it.
    """
    vocabulary = vocabulary or {}
    autoencoder = hydra.utils.instantiate(model_cfg.autoencoder.network) if model_cfg.get("autoencoder") else None
    image_channels = model_cfg.autoencoder.network.latent_channels if autoencoder is not None else model_cfg.image_channels
    output = model_cfg.get("output") or default_output(model_cfg.conditioning)
    in_channels, out_channels = network_channels(conditioning=model_cfg.conditioning, output=output,
                                                 image_channels=image_channels, num_classes=num_classes)
    options = network_options(conditioning=model_cfg.conditioning, vocabulary=vocabulary, context_dim=model_cfg.context_dim)
    network = hydra.utils.instantiate(model_cfg.network, in_channels=in_channels, out_channels=out_channels, **options)
    return Denoiser(
        network, conditioning=model_cfg.conditioning, num_classes=num_classes, image_channels=image_channels,
        output=output, vocabulary=vocabulary, context_dim=model_cfg.context_dim,
        condition_dropout=model_cfg.condition_dropout, autoencoder=autoencoder,
        decode_tile=model_cfg.autoencoder.get("decode_tile") if autoencoder is not None else None,
    )


def load_ema_model(checkpoint: dict[str, Any], path: str | os.PathLike[str], *, num_classes: int) -> Denoiser:
    """The EMA weights of a training checkpoint in the network its own config describes, in eval mode.

    Raises:
        MedsynthError: If the weights do not fit that network (a foreign or damaged checkpoint).
    """
    try:
        model = build_denoiser(OmegaConf.create(checkpoint["config"]).model, num_classes=num_classes,
                               vocabulary=checkpoint.get("vocabulary"))
        model.load_state_dict(checkpoint["ema"]["shadow"])
    except (RuntimeError, KeyError, AttributeError, ConfigError) as err:  # omegaconf's missing keys are AttributeErrors
        raise MedsynthError(f"checkpoint {path} does not fit the model its config describes: {str(err)[:300]}") from None
    return model.eval()


def build_sampler(sampler_cfg: DictConfig | dict, scheduler_cfg: DictConfig | dict) -> Scheduler:
    """The sampling scheduler of ``sampler_cfg`` with the training schedule of ``scheduler_cfg``.

    The noise schedule and prediction type must match training, so the sampler takes every setting
    of the training scheduler that its class accepts; only ``_target_`` comes from ``sampler_cfg``.
    A rectified-flow model needs a rectified-flow sampler and a DDPM/DDIM model a DDPM/DDIM one.
    """
    sampler_target = str(sampler_cfg["_target_"])
    training = OmegaConf.to_container(scheduler_cfg, resolve=True) if isinstance(scheduler_cfg, DictConfig) else dict(scheduler_cfg)
    is_flow = [target.endswith("RFlowScheduler") for target in (sampler_target, str(training["_target_"]))]
    if is_flow[0] != is_flow[1]:
        raise ConfigError(
            f"generate.sampler {sampler_target} cannot sample a model trained with {training['_target_']}: "
            "use RFlowScheduler for rectified flow, DDIMScheduler or DDPMScheduler otherwise"
        )
    accepted = inspect.signature(hydra.utils.get_class(sampler_target).__init__).parameters
    settings = {k: v for k, v in training.items() if k != "_target_" and k in accepted}
    return hydra.utils.instantiate({"_target_": sampler_target}, **settings)


def dataset_encoder(cfg: DictConfig, train: LabelledArrays, *, spatial_dims: int, device: torch.device) -> FeatureEncoder:
    """The dataset's 2D feature encoder: loaded from ``data/encoder.pt`` when it was trained on this manifest, else trained and saved.

    For 3D datasets it learns from the axial slices of the training volumes (2.5D protocol).
    """
    e = cfg.evaluate.encoder
    path = Path(cfg.paths.data) / "encoder.pt"
    manifest_hash = file_sha256(Path(cfg.paths.data) / "manifest.json")
    settings = OmegaConf.to_container(e, resolve=True)
    if path.is_file():
        saved = load_checkpoint(path)
        if saved.get("manifest_sha256") == manifest_hash and saved.get("settings") == settings:
            encoder = FeatureEncoder(spatial_dims=2, channels=e.channels)
            encoder.load_state_dict(saved["state"])
            return encoder.eval()
    if spatial_dims == 3:
        axial = torch.as_tensor(orthogonal_slices(train.images.numpy())["axial"])
        train = LabelledArrays(axial, torch.zeros_like(axial, dtype=torch.long), [str(i) for i in range(len(axial))], [])
    log.info("training the feature encoder on %d real training images", len(train))
    encoder = train_encoder(
        train, spatial_dims=2, channels=e.channels, steps=e.steps, batch_size=e.batch_size, lr=e.lr,
        temperature=e.temperature, seed=cfg.evaluate.seed, device=device, progress=cfg.trainer.progress,
    )
    save_checkpoint(path, {"state": encoder.state_dict(), "manifest_sha256": manifest_hash, "settings": settings})
    return encoder
