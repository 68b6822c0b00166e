"""A trained generator as one object: build it from settings or a checkpoint, then sample from seeds.

Every place that samples a trained model goes through :class:`Generator`: train's sample grid,
the generate stage and its privacy gate, the served MLflow model and the benchmarks. The caller
owns the noise: one seed per sample fixes its starting noise and the noise of every stochastic
step, so a sample does not depend on the batch it was drawn in and no caller needs a batching rule.

A checkpoint is data. Networks are rebuilt only from the classes in
:data:`medsynth.config.settings.NETWORKS` and :data:`~medsynth.config.settings.AUTOENCODERS`,
with plain keyword arguments checked by the settings schema and the class's signature; a
``_target_`` anywhere else in a checkpoint's config is refused (:func:`check_targets`). The plain
facts a checkpoint carries are checked before use (:func:`read_generator_state`), and its EMA
weights must be exactly the tensors of the network its config describes
(:func:`medsynth.training.checkpoint.check_state_dict`): the network is first built on the
``meta`` device, so a config that does not fit its weights is refused before any memory is spent.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from monai.networks.schedulers import Scheduler
from torch import nn

from medsynth import ConfigError, MedsynthError
from medsynth.compute import autocast, layout, resolve_precision
from medsynth.config.schema import from_mapping, to_mapping
from medsynth.config.settings import (
    AUTOENCODERS,
    NETWORKS,
    OPTIMIZERS,
    SAMPLERS,
    SCHEDULERS,
    ModelSettings,
    SamplingSettings,
    SchedulerSettings,
    sampler_target,
)
from medsynth.diffusion.denoiser import GUIDED_MODES, Denoiser, default_output, network_channels, network_options
from medsynth.diffusion.sampling import sample


def _allowed_class(target: str, allowed: Mapping[str, str] | Sequence[str], *, key: str) -> type:
    """The class ``target`` names, if it is on the allow-list."""
    if target not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {target!r}")
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _plain_kwargs(options: Mapping[str, Any], *, key: str) -> dict[str, Any]:
    """Constructor arguments without ``_target_``; a nested ``_target_`` anywhere is refused."""

    def walk(value: Any, where: str) -> None:
        if isinstance(value, Mapping):
            if "_target_" in value:
                raise ConfigError(f"{where}._target_: nested objects are not built from configs or checkpoints")
            for k, v in value.items():
                walk(v, f"{where}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        elif value is not None and not isinstance(value, (bool, int, float, str)):
            raise ConfigError(f"{where} must be a plain value, got {type(value).__name__}")

    kwargs = {k: v for k, v in options.items() if k not in ("_target_", "_partial_")}
    walk(kwargs, key)
    return kwargs


TARGETS: dict[str, Sequence[str]] = {
    "model.network": list(NETWORKS),
    "model.autoencoder.network": list(AUTOENCODERS),
    "scheduler": list(SCHEDULERS),
    "trainer.optimizer": list(OPTIMIZERS),
}
"""The only places of a config (or a checkpoint's config) that may hold a ``_target_``, and the
classes each may name."""


def check_targets(config: Any, *, key: str = "", depth: int = 0) -> None:
    """Refuse a config that names a class anywhere but :data:`TARGETS`, or one off their allow-lists,
    or holds anything but plain values (numbers, strings, booleans, ``None``, lists, mappings).

    Args:
        config: A config section, e.g. a checkpoint's ``config``; ``key`` is its dotted place.
        key: Dotted prefix, ``""`` for the whole config.

    Raises:
        ConfigError: Naming the dotted key at fault.
    """
    where = key or "config"
    if depth > 32:
        raise ConfigError(f"{where} nests deeper than 32 levels")
    if isinstance(config, Mapping):
        if "_target_" in config:
            allowed = TARGETS.get(key)
            if allowed is None:
                raise ConfigError(f"{where}._target_: nested objects are not built from configs or checkpoints")
            if config["_target_"] not in allowed:
                raise ConfigError(f"{where}._target_ must be one of {', '.join(allowed)}, got {config['_target_']!r}")
        for name, value in config.items():
            if not isinstance(name, str):
                raise ConfigError(f"{where} has a key that is not a name: {name!r}")
            check_targets(value, key=f"{key}.{name}" if key else name, depth=depth + 1)
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            check_targets(value, key=f"{where}[{i}]", depth=depth + 1)
    elif config is not None and not isinstance(config, (bool, int, float, str)):
        raise ConfigError(f"{where} must be a plain value, got {type(config).__name__}")


def build_network(options: Mapping[str, Any], *, key: str = "model.network", **extra: Any) -> nn.Module:
    """An allow-listed network (``options["_target_"]``) built with its plain options and ``extra``.

    Args:
        options: ``_target_`` and the constructor's keyword arguments (plain values only).
        key: The dotted config key of ``options``, for messages.
        extra: Arguments medsynth sets from the model's mode (channels, condition inputs).

    Returns:
        The network.

    Raises:
        ConfigError: For a class off the allow-list, a nested ``_target_``, an argument the class
            does not take, or one that medsynth sets itself.
    """
    allowed = AUTOENCODERS if "autoencoder" in key else NETWORKS
    cls = _allowed_class(str(options.get("_target_")), allowed, key=f"{key}._target_")
    kwargs = _plain_kwargs(options, key=key)
    accepted = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    for name in kwargs:
        if name in extra:
            raise ConfigError(f"{key}.{name} is set by medsynth from the model's mode and labels; leave it out")
        if not takes_any and (name not in accepted or name == "self"):
            raise ConfigError(f"{key}.{name} is not an argument of {cls.__name__}")
    return cls(**kwargs, **extra)


def build_denoiser(model: ModelSettings, *, num_classes: int, vocabulary: Mapping[str, Sequence[str]] | None = None) -> Denoiser:
    """The network of ``model`` with the channels and condition inputs its mode needs, as a :class:`Denoiser`.

    With ``model.autoencoder`` (latent diffusion) the autoencoder is built too, untrained: training
    fits it first, a checkpoint restores it.

    Args:
        model: The model settings.
        num_classes: Label values including background.
        vocabulary: Attribute name -> values, for ``class`` and ``attributes`` models.

    Returns:
        The denoiser, in training mode, on the CPU.
    """
    vocabulary = {k: list(v) for k, v in (vocabulary or {}).items()}
    autoencoder = build_network(model.autoencoder.network, key="model.autoencoder.network") if model.autoencoder else None
    image_channels = int(model.autoencoder.network["latent_channels"]) if model.autoencoder else model.image_channels
    output = model.output or default_output(model.conditioning)
    in_channels, out_channels = network_channels(
        conditioning=model.conditioning, output=output, image_channels=image_channels, num_classes=num_classes
    )
    options = network_options(conditioning=model.conditioning, vocabulary=vocabulary, context_dim=model.context_dim)
    network = build_network(model.network, in_channels=in_channels, out_channels=out_channels, **options)
    return Denoiser(
        network,
        conditioning=model.conditioning,
        num_classes=num_classes,
        image_channels=image_channels,
        output=output,
        vocabulary=vocabulary,
        context_dim=model.context_dim,
        condition_dropout=model.condition_dropout,
        autoencoder=autoencoder,
        decode_tile=model.autoencoder.decode_tile if model.autoencoder else None,
    )


def build_scheduler(scheduler: SchedulerSettings) -> Scheduler:
    """The training noise schedule ``scheduler`` describes."""
    cls = _allowed_class(scheduler._target_, SCHEDULERS, key="scheduler._target_")
    return cls(**scheduler.options())


def build_sampler(sampler: str, scheduler: SchedulerSettings, *, key: str = "generate.sampler") -> Scheduler:
    """The sampler ``sampler`` (``auto``, ``ddim``, ``ddpm``, ``rflow``) on the training schedule ``scheduler``.

    The noise schedule and prediction type must match training, so the sampler takes every
    setting of the training schedule its class accepts.

    Raises:
        ConfigError: If the sampler cannot sample that schedule (rflow for rectified flow only).
    """
    import inspect

    target = sampler_target(sampler, scheduler._target_, key=key)
    cls = _allowed_class(target, list(SAMPLERS.values()), key=key)
    accepted = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in scheduler.options().items() if k in accepted})


@dataclasses.dataclass
class Samples:
    """What :meth:`Generator.sample` returns, on the CPU: ``(N, C, *spatial)`` images in [0, 1]
    (``None`` for a label-map generator) and ``(N, 1, *spatial)`` label maps (generated, or the
    given ones of a ``mask`` model; ``None`` for an image-only model without given maps)."""

    images: torch.Tensor | None
    labels: torch.Tensor | None


@dataclasses.dataclass
class Generator:
    """A trained denoiser with its sampler and what its checkpoint says about it.

    Build one with :meth:`from_checkpoint` (a file, an MLflow run id or a registered model), or
    directly around a model in memory (train's sample grid).

    Attributes:
        model: The EMA denoiser, in eval mode.
        scheduler: The training schedule the model was trained with.
        label_names: Names of the label values, background first.
        image_size: Spatial size of one sample.
        sampling: Default sampler, steps, eta and guidance scale (stored in the checkpoint).
        source: Where it was loaded from (``""`` for a model in memory).
        checkpoint: The local checkpoint file (``None`` for a model in memory).
        info: The checkpoint's other plain facts: ``run_id``, ``step``, ``val_loss``.
        settings: The model settings it was built from (``None`` for a model in memory built elsewhere).
    """

    model: Denoiser
    scheduler: SchedulerSettings
    label_names: list[str]
    image_size: tuple[int, ...]
    sampling: SamplingSettings = dataclasses.field(default_factory=SamplingSettings)
    source: str = ""
    checkpoint: Path | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    settings: ModelSettings | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def conditioning(self) -> str:
        return self.model.conditioning

    @property
    def guided(self) -> bool:
        """Whether the model takes attribute codes (and so classifier-free guidance)."""
        return self.model.conditioning in GUIDED_MODES

    @property
    def spatial_dims(self) -> int:
        return len(self.image_size)

    @classmethod
    def from_checkpoint(
        cls,
        source: str | os.PathLike[str],
        *,
        device: torch.device | str = "cpu",
        tracking_uri: str | None = None,
        download_dir: str | os.PathLike[str] | None = None,
    ) -> Generator:
        """Load the EMA generator of a training checkpoint.

        Args:
            source: A checkpoint file; with ``tracking_uri`` also an MLflow run id, ``runs:/<id>``
                or ``models:/<name>/<version>`` (``@<alias>``).
            device: Where to sample.
            tracking_uri: The MLflow store to resolve run ids and registered models in.
            download_dir: Where a checkpoint resolved through MLflow is downloaded (default: a
                temporary folder).

        Returns:
            The generator, in eval mode on ``device``.

        Raises:
            MedsynthError: For a missing or unreadable checkpoint, one whose config names a class
                off the allow-list, or weights that do not fit the network its config describes.
        """
        from medsynth.training.checkpoint import load_checkpoint

        path = Path(source)
        if not path.is_file() and tracking_uri:
            import tempfile

            from medsynth.tracking.registry import resolve_checkpoint

            folder = download_dir or tempfile.mkdtemp(prefix="medsynth-checkpoint-")
            path = resolve_checkpoint(str(source), tracking_uri=tracking_uri, download_dir=folder)
        state = load_checkpoint(path)
        generator = cls.from_state(state, where=str(path) if str(path) == str(source) else f"{source} ({path})")
        generator.model.to(device)
        generator.source, generator.checkpoint = str(source), path
        return generator

    @classmethod
    def from_state(cls, state: Mapping[str, Any], *, where: str) -> Generator:
        """The generator of a loaded checkpoint dict (see :meth:`from_checkpoint`), on the CPU.

        Its plain facts are checked first (:func:`read_generator_state`), then the network its
        config describes is built on the ``meta`` device and the EMA weights are checked against
        it (:func:`~medsynth.training.checkpoint.check_state_dict`); only then is it built for real.

        Args:
            state: The loaded checkpoint.
            where: The checkpoint file (or source), for messages.

        Returns:
            The generator, in eval mode on the CPU.

        Raises:
            MedsynthError: One line naming ``where`` and the key at fault.
        """
        from medsynth.training.checkpoint import check_state_dict

        facts = read_generator_state(state, where=where)

        def build() -> Denoiser:
            try:
                return build_denoiser(facts.model, num_classes=len(facts.label_names), vocabulary=facts.vocabulary)
            except ConfigError as err:
                raise MedsynthError(f"checkpoint {where}: {err}") from None
            except (TypeError, ValueError, AttributeError, RuntimeError, AssertionError) as err:
                raise MedsynthError(
                    f"checkpoint {where}: its model config does not build a network: {' '.join(str(err).split())[:300]}"
                ) from None

        with torch.device("meta"):
            shape_of = build()
        shadow = check_state_dict(shape_of, state["ema"]["shadow"], where=f"checkpoint {where}: ema.shadow")
        model = build()
        model.load_state_dict(shadow)
        # sampling and the audit's passes run fastest in the layout of compute.layout (NHWC in 2D)
        model.to(memory_format=layout(len(facts.image_size)))  # type: ignore[call-overload]  # torch's stubs lack the keyword
        return cls(
            model.eval(),
            facts.scheduler,
            facts.label_names,
            facts.image_size,
            facts.sampling,
            info=facts.info,
            settings=facts.model,
        )

    def sampler(self, name: str | None = None) -> Scheduler:
        """A fresh sampler (``name``, default the checkpoint's) on this model's training schedule."""
        return build_sampler(name or self.sampling.sampler, self.scheduler)

    def codes(self, attributes: Sequence[Mapping[str, str]]) -> torch.Tensor | None:
        """Each sample's attributes as the model's codes; attributes the model does not know are left out."""
        if not self.guided:
            return None
        known = self.model.vocabulary
        return torch.cat([self.model.encode_attributes({k: v for k, v in a.items() if k in known}) for a in attributes])

    @torch.no_grad()
    def sample(
        self,
        seeds: Sequence[int],
        *,
        labels: torch.Tensor | None = None,
        codes: torch.Tensor | None = None,
        attributes: Sequence[Mapping[str, str]] | None = None,
        steps: int | None = None,
        eta: float | None = None,
        guidance_scale: float | None = None,
        sampler: str | Scheduler | None = None,
        precision: str = "fp32",
    ) -> Samples:
        """One sample per seed.

        Args:
            seeds: One seed per sample: it fixes the sample's noise, so a sample is the same
                alone or in any batch.
            labels: ``(N, 1, *spatial)`` label maps, required by ``mask`` models.
            codes: ``(N, A)`` attribute codes of ``class`` / ``attributes`` models (or give ``attributes``).
            attributes: Per-sample attribute values, turned into codes (unknown keys left out).
            steps: Sampler steps (default: the checkpoint's).
            eta: DDIM stochasticity (default: the checkpoint's).
            guidance_scale: Classifier-free guidance of ``class`` / ``attributes`` models (default:
                the checkpoint's); other models ignore it.
            sampler: A sampler name or a MONAI scheduler instance (default: the checkpoint's).
            precision: ``fp32``, ``bf16`` to run the network (and a latent decoder) under bf16
                autocast, or ``auto``: bf16 where the device computes it natively
                (:func:`medsynth.compute.resolve_precision`); the samples come back in float32 either way.

        Returns:
            Images and label maps on the CPU.

        Raises:
            MedsynthError: For a missing label map on a ``mask`` model or a count mismatch.
        """
        n = len(seeds)
        if self.conditioning == "mask":
            if labels is None or labels.shape[0] != n:
                raise MedsynthError(f"a {self.conditioning!r} model needs one label map per seed ({n})")
        if self.guided and codes is None:
            codes = self.codes(attributes if attributes is not None else [{}] * n)
        device = self.device
        try:
            precision = resolve_precision(precision, device)
        except ValueError as err:
            raise MedsynthError(str(err)) from None
        scheduler = sampler if isinstance(sampler, Scheduler) else self.sampler(sampler)
        # plain tensors: a MONAI MetaTensor (a label map from a transform) would carry its metadata
        # through every operation of every step, and torch.compile cannot trace it
        labels, codes = (x.as_subclass(torch.Tensor).to(device) if x is not None else None for x in (labels, codes))
        condition = self.model.condition(labels, codes)
        with autocast(precision, device):
            x = sample(
                self.model,
                scheduler,
                condition,
                seeds=list(seeds),
                shape=self.model.sample_shape(self.image_size),
                steps=steps or self.sampling.steps,
                eta=self.sampling.eta if eta is None else eta,
                device=device,
                guidance_scale=(self.sampling.guidance_scale if guidance_scale is None else guidance_scale)
                if self.guided
                else 1.0,
            )
            images, generated = self.model.split(x)
        shown = generated if generated is not None else labels
        return Samples(images.float().cpu() if images is not None else None, shown.cpu() if shown is not None else None)

    def compile(self, **options: Any) -> Generator:
        """Compile the denoising network with ``torch.compile`` for the many identical calls of sampling."""
        self.model.network = cast(nn.Module, torch.compile(self.model.network, **options))
        return self

    def describe(self) -> dict[str, Any]:
        """Plain facts for manifests and model metadata."""
        return {
            "conditioning": self.conditioning,
            "label_names": list(self.label_names),
            "vocabulary": dict(self.model.vocabulary),
            "image_size": list(self.image_size),
            "sampling": to_mapping(self.sampling),
            **self.info,
        }


@dataclasses.dataclass(frozen=True)
class GeneratorFacts:
    """The checked plain facts of a generator checkpoint (all but its weights); see :func:`read_generator_state`."""

    model: ModelSettings
    scheduler: SchedulerSettings
    sampling: SamplingSettings
    label_names: list[str]
    vocabulary: dict[str, list[str]]
    image_size: tuple[int, ...]
    info: dict[str, Any]


def check_checkpoint_config(config: Any, *, where: str) -> tuple[ModelSettings, SchedulerSettings]:
    """The model and noise schedule a checkpoint's ``config`` describes, checked.

    Every ``_target_`` must sit where :data:`TARGETS` allows and name an allow-listed class, every
    value must be plain, and the ``model`` and ``scheduler`` sections must pass the settings schema.

    Args:
        config: The checkpoint's ``config``.
        where: The checkpoint file, for messages.

    Returns:
        The model and scheduler settings.

    Raises:
        MedsynthError: One line naming the checkpoint and the key at fault.
    """
    if not isinstance(config, Mapping) or not all(isinstance(config.get(k), Mapping) for k in ("model", "scheduler")):
        raise MedsynthError(
            f"checkpoint {where} is not a medsynth checkpoint: its config must hold the model and scheduler sections"
        )
    try:
        check_targets(config)
        return (
            from_mapping(ModelSettings, config["model"], key="model"),
            from_mapping(SchedulerSettings, config["scheduler"], key="scheduler"),
        )
    except ConfigError as err:
        raise MedsynthError(f"checkpoint {where}: {err}") from None


GENERATOR_KEYS: tuple[str, ...] = ("config", "ema", "label_names", "image_size")
"""What a checkpoint must hold to be loaded as a generator."""


def read_generator_state(state: Any, *, where: str, required: Sequence[str] = GENERATOR_KEYS) -> GeneratorFacts:
    """Check the plain facts a generator checkpoint carries, before any of them is used.

    ``config`` as :func:`check_checkpoint_config` checks it; ``label_names`` a non-empty list of
    distinct names; ``vocabulary`` a mapping of attribute names to lists of values; ``image_size``
    a list of positive integers, one per spatial dimension of the network (and ``spatial_dims``,
    when stored, the same count); ``sampling`` as the settings schema checks it; ``ema`` a mapping
    with ``shadow`` (the weights are checked by :meth:`Generator.from_state`); ``run_id`` a string,
    ``step`` a non-negative integer, ``val_loss`` a number.

    Args:
        state: A loaded checkpoint.
        where: The checkpoint file, for messages.
        required: The keys it must hold (``config`` always); the others are checked when present
            (a training checkpoint being resumed, say).

    Returns:
        The checked facts (``label_names`` and ``image_size`` empty when absent).

    Raises:
        MedsynthError: One line naming the checkpoint and the key at fault.
    """
    if not isinstance(state, Mapping):
        raise MedsynthError(f"checkpoint {where} is not a medsynth generator checkpoint: it holds a {type(state).__name__}")
    missing = [k for k in dict.fromkeys(["config", *required]) if k not in state]
    if missing:
        raise MedsynthError(f"checkpoint {where} is not a medsynth generator checkpoint: it lacks {missing}")
    model, scheduler = check_checkpoint_config(state["config"], where=where)

    def fail(key: str, expected: str, value: Any) -> MedsynthError:
        shown = " ".join(repr(value).split())
        return MedsynthError(f"checkpoint {where}: {key} must be {expected}, got {shown[:120]}")

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    names = state.get("label_names", [])
    if (
        not isinstance(names, (list, tuple))
        or ("label_names" in state and not names)
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise fail("label_names", "a non-empty list of distinct label names (strings)", names)
    vocabulary = {} if state.get("vocabulary") is None else state["vocabulary"]
    if not isinstance(vocabulary, Mapping) or not all(
        isinstance(k, str) and isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v) for k, v in vocabulary.items()
    ):
        raise fail("vocabulary", "a mapping of attribute names to lists of values (strings)", vocabulary)
    size = state.get("image_size", [1] * model.spatial_dims)
    if not isinstance(size, (list, tuple)) or len(size) != model.spatial_dims or not all(is_int(s) and s >= 1 for s in size):
        raise fail(
            "image_size",
            f"a list of {model.spatial_dims} positive integers (model.network.spatial_dims={model.spatial_dims})",
            size,
        )
    if "spatial_dims" in state and state["spatial_dims"] != model.spatial_dims:
        raise fail("spatial_dims", f"{model.spatial_dims}, as model.network.spatial_dims", state["spatial_dims"])
    sampling = {} if state.get("sampling") is None else state["sampling"]
    try:
        sampling_settings = from_mapping(SamplingSettings, sampling, key="sampling")
        sampler_target(sampling_settings.sampler, scheduler._target_, key="sampling.sampler")
    except ConfigError as err:
        raise MedsynthError(f"checkpoint {where}: {err}") from None
    ema = state.get("ema", {"shadow": {}})
    if not isinstance(ema, Mapping) or "shadow" not in ema:
        raise fail("ema", "a mapping with the EMA weights under shadow", type(ema).__name__)
    checks = {
        "run_id": (lambda v: isinstance(v, str), "a string"),
        "step": (lambda v: is_int(v) and v >= 0, "a non-negative integer"),
        "val_loss": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    }
    info = {}
    for key, (ok, expected) in checks.items():
        if key in state:
            if not ok(state[key]):
                raise fail(key, expected, state[key])
            info[key] = state[key]
    return GeneratorFacts(
        model,
        scheduler,
        sampling_settings,
        list(names),
        {k: list(v) for k, v in vocabulary.items()},
        tuple(size) if "image_size" in state else (),
        info,
    )


def generator_state(model: ModelSettings, scheduler: SchedulerSettings, sampling: SamplingSettings) -> dict[str, Any]:
    """The plain description a checkpoint stores so :meth:`Generator.from_state` can rebuild it."""
    return {"config": {"model": to_mapping(model), "scheduler": to_mapping(scheduler)}, "sampling": to_mapping(sampling)}
