"""Typed settings of every stage: the schema of ``conf/`` and the arguments of the Python API.

Each dataclass mirrors one config group key for key (``conf/<group>/*.yaml``), so
:func:`medsynth.config.schema.from_mapping` turns a composed config into these objects and
rejects unknown keys, wrong types and out-of-range values, naming the dotted key, before any
stage reads data. A notebook builds them directly: every field has the default of the demo preset.

The top level holds what all stages share (``name``, ``seed``, ``device``, ``progress``, ``paths``,
``mlflow``: :class:`RunSettings`); each stage reads only its own group and these.

The module is one piece because it is the config's schema: read beside ``conf/``, group by group,
it answers what every key means, what it accepts and which rules tie groups together.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Literal

from medsynth import ConfigError
from medsynth.config.modes import check_mode, default_output, parse_prompt
from medsynth.config.schema import check

NETWORKS: dict[str, str] = {
    "monai.networks.nets.DiffusionModelUNet": "the diffusion UNet",
}
"""Classes a ``model.network._target_`` may name (a checkpoint's config is data: nothing else is built)."""

AUTOENCODERS: dict[str, str] = {
    "monai.networks.nets.AutoencoderKL": "latent diffusion's first stage",
}
"""Classes a ``model.autoencoder.network._target_`` may name."""

SCHEDULERS: tuple[str, ...] = (
    "monai.networks.schedulers.DDPMScheduler",
    "monai.networks.schedulers.DDIMScheduler",
    "monai.networks.schedulers.RFlowScheduler",
)
"""Training noise schedules (``scheduler._target_``)."""

SAMPLERS: dict[str, str] = {
    "ddpm": "monai.networks.schedulers.DDPMScheduler",
    "ddim": "monai.networks.schedulers.DDIMScheduler",
    "rflow": "monai.networks.schedulers.RFlowScheduler",
}
"""Sampler names (``generate.sampler``, ``trainer.sampling.sampler``) and the MONAI scheduler each runs."""

OPTIMIZERS: tuple[str, ...] = ("torch.optim.AdamW", "torch.optim.Adam", "torch.optim.SGD")
"""Optimisers ``trainer.optimizer._target_`` may name."""

Sampler = Literal["auto", "ddim", "ddpm", "rflow"]
Split = Literal["train", "validation", "holdout"]
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def is_flow(target: str) -> bool:
    """Whether a scheduler or sampler class path is rectified flow."""
    return target.endswith("RFlowScheduler")


def sampler_target(sampler: str, scheduler_target: str, *, key: str) -> str:
    """The MONAI class a sampler name runs for a model trained with ``scheduler_target``.

    ``auto`` picks DDIM for DDPM/DDIM schedules and rectified flow for a rectified-flow schedule.

    Raises:
        ConfigError: If the sampler cannot sample that schedule; the message names ``key``.
    """
    if sampler == "auto":
        return SAMPLERS["rflow"] if is_flow(scheduler_target) else SAMPLERS["ddim"]
    check(sampler in SAMPLERS, key, f"one of auto, {', '.join(SAMPLERS)}", sampler)
    target = SAMPLERS[sampler]
    check(
        is_flow(target) == is_flow(scheduler_target),
        key,
        f"a sampler for {scheduler_target.rsplit('.', 1)[-1]} (rflow for rectified flow, ddim or ddpm otherwise)",
        sampler,
    )
    return target


# --------------------------------------------------------------------------------------------- run


@dataclass(kw_only=True)
class PathsSettings:
    """Where a run reads raw scans and writes everything else (``conf/paths``)."""

    input: str | None = None
    output: str = "outputs/demo"
    data: str = "outputs/demo/data"
    checkpoints: str = "outputs/demo/checkpoints"
    synthetic: str = "outputs/demo/synthetic"
    evaluation: str = "outputs/demo/evaluation"

    @classmethod
    def under(cls, output: str, *, input: str | None = None) -> PathsSettings:
        """Every stage folder under one output root, as ``conf/paths/default.yaml`` lays them out."""
        return cls(
            input=input,
            output=output,
            data=f"{output}/data",
            checkpoints=f"{output}/checkpoints",
            synthetic=f"{output}/synthetic",
            evaluation=f"{output}/evaluation",
        )


@dataclass(kw_only=True)
class MlflowSettings:
    """The MLflow store and model registry (``conf/mlflow``)."""

    tracking_uri: str = "sqlite:///mlflow.db"
    experiment_name: str = "medsynth"
    artifact_location: str | None = None
    register_model: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    retry_seconds: float = 30.0

    def __post_init__(self) -> None:
        check(self.retry_seconds > 0, "mlflow.retry_seconds", "a number of seconds > 0", self.retry_seconds)
        check_tracking_uri(self.tracking_uri)


def check_tracking_uri(uri: str) -> None:
    """Refuse a tracking URI that holds a password (``https://user:pw@host``, ``postgresql://user:pw@db/mlflow``).

    The config is logged with every run, so a password in it would land in MLflow itself. The
    message never repeats the URI.

    Raises:
        ConfigError: Saying where credentials go instead.
    """
    try:
        parts = urllib.parse.urlsplit(uri)
        password = parts.password
    except ValueError:
        return  # not a URL with a network location; MLflow judges it
    if password is not None:
        where = (
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or a netrc entry for the host"
            if parts.scheme in ("http", "https")
            else "the database's own password file (~/.pgpass for PostgreSQL), or run an mlflow server (docs/deploy.md)"
        )
        raise ConfigError(
            f"mlflow.tracking_uri must not hold a password (user:password@host): the config is logged with every run; use {where}"
        )


@dataclass(kw_only=True)
class RunSettings:
    """What every stage shares: the run's name, seed, device, progress display, folders and tracker."""

    name: str = "demo"
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    paths: PathsSettings = field(default_factory=PathsSettings)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)

    def __post_init__(self) -> None:
        check(bool(_DEVICE.match(self.device)), "device", "auto, cpu, cuda or cuda:N", self.device)


# -------------------------------------------------------------------------------------- preprocess


@dataclass(kw_only=True)
class IntensitySettings:
    mode: Literal["auto", "window", "percentile"] = "auto"
    lower: float = 0.5
    upper: float = 99.5
    window: list[float] = field(default_factory=lambda: [-1000.0, 1000.0])

    def __post_init__(self) -> None:
        check(
            0.0 <= self.lower < self.upper <= 100.0,
            "data.intensity.lower/upper",
            "percentiles with 0 <= lower < upper <= 100",
            [self.lower, self.upper],
        )
        check(
            len(self.window) == 2 and self.window[0] < self.window[1],
            "data.intensity.window",
            "[low, high] with low < high",
            self.window,
        )


@dataclass(kw_only=True)
class AttributesSettings:
    csv: str | None = None
    key: str | None = None
    match: Literal["PatientID", "StudyInstanceUID", "SeriesInstanceUID"] = "PatientID"
    columns: list[str] | None = None

    def __post_init__(self) -> None:
        check(not self.csv or bool(self.key), "data.attributes.key", "the CSV column that identifies each case", self.key)


@dataclass(kw_only=True)
class DeidSettings:
    salt_file: str | None = None  # default: <paths.output>/secret/salt
    hash_all_paths: bool = False


@dataclass(kw_only=True)
class SplitSettings:
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "validation": 0.1, "holdout": 0.2})
    block: int = 8
    gap: int = 2

    def __post_init__(self) -> None:
        check(
            set(self.fractions) == {"train", "validation", "holdout"},
            "data.splits.fractions",
            "shares for train, validation and holdout",
            self.fractions,
        )
        check(
            all(v >= 0 for v in self.fractions.values()) and sum(self.fractions.values()) > 0,
            "data.splits.fractions",
            "non-negative shares with a positive sum",
            self.fractions,
        )
        check(self.block >= 1, "data.splits.block", "an integer >= 1", self.block)
        check(self.gap >= 0, "data.splits.gap", "an integer >= 0", self.gap)


SHARD_FORMS = (
    "K/N with 1 <= K <= N (preprocess shard K of N), merge/N or merge (write the manifest from the N "
    "shards' results), or null (the whole input)"
)
"""What ``data.shard`` accepts, for its error message."""
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_MERGE = re.compile(r"^\s*merge\s*(?:/\s*(\d+)\s*)?$")


@dataclass(frozen=True)
class Shard:
    """A value of ``data.shard``: one shard of the input, or the merge of all shards' results.

    Attributes:
        index: The shard, 1 to ``count``; ``None`` for the merge.
        count: How many shards the input is cut into; ``None`` for a merge that takes the count from
            the shards' results.
    """

    index: int | None
    count: int | None

    @property
    def merge(self) -> bool:
        """Whether this is the merge step."""
        return self.index is None

    @property
    def label(self) -> str:
        """The value as a user writes it: ``2/8``, ``merge/8`` or ``merge``."""
        if self.index is not None:
            return f"{self.index}/{self.count}"
        return f"merge/{self.count}" if self.count is not None else "merge"

    @property
    def name(self) -> str:
        """The shard's name in file names: ``2-of-8``."""
        return f"{self.index}-of-{self.count}"


def parse_shard(value: str | None) -> Shard | None:
    """``data.shard`` as a :class:`Shard` (``None``: no sharding, the whole input in one run).

    Args:
        value: ``K/N`` (1 <= K <= N), ``merge``, ``merge/N`` (N >= 1) or ``None``.

    Returns:
        The shard, or ``None``.

    Raises:
        ConfigError: Naming ``data.shard`` and the forms it accepts.
    """
    if value is None:
        return None
    text = str(value)
    if (found := _SHARD.match(text)) is not None:
        index, count = int(found[1]), int(found[2])
        check(1 <= index <= count, "data.shard", SHARD_FORMS, value)
        return Shard(index, count)
    if (found := _MERGE.match(text)) is not None:
        merge_count = int(found[1]) if found[1] is not None else None
        check(merge_count is None or merge_count >= 1, "data.shard", SHARD_FORMS, value)
        return Shard(None, merge_count)
    check(False, "data.shard", SHARD_FORMS, value)
    return None


def check_dicomweb_url(url: str | None, key: str, *, required: bool) -> None:
    """Refuse a DICOMweb URL that is not an http(s) base URL, or that holds credentials.

    Credentials in a URL would be logged with the config (to MLflow, among others); they come from
    the environment or a netrc file (docs/pacs.md). The message never repeats such a URL.

    Args:
        url: The configured URL.
        key: Its dotted config key.
        required: Whether it must be set.

    Raises:
        ConfigError: Naming ``key`` and what it accepts.
    """
    accepts = "the http(s) base URL of a DICOMweb service, e.g. https://research-pacs.example.org/dicom-web"
    if url is None or url == "":
        check(not required, key, f"{accepts} (docs/pacs.md)", url)
        return
    try:
        parts = urllib.parse.urlsplit(str(url))
        parts.port  # noqa: B018 (raises for a port that is not a number)
    except ValueError:
        raise ConfigError(f"{key} must be {accepts}; it cannot be parsed as a URL") from None
    if "@" in parts.netloc:
        raise ConfigError(
            f"{key} must not hold credentials (user:password@host): the config is logged; set "
            "MEDSYNTH_DICOMWEB_USER and MEDSYNTH_DICOMWEB_PASSWORD, or a netrc entry for the host "
            "(docs/pacs.md)"
        )
    if parts.query or parts.fragment:  # not repeated: a query may carry a token
        raise ConfigError(
            f"{key} must be {accepts}, without a query (?...) or fragment (#...); credentials come from "
            "the environment or a netrc entry (docs/pacs.md)"
        )
    check(parts.scheme in ("http", "https") and bool(parts.hostname), key, accepts, url)


_DICOM_DATE = re.compile(r"^(\d{8})?(-(\d{8})?)?$")


@dataclass(kw_only=True)
class DicomwebSourceSettings:
    """The DICOMweb server and search of ``data=dicomweb`` (``data.dicomweb``; docs/pacs.md)."""

    url: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    accession_list: str | None = None
    folder: str | None = None  # default: <paths.output>/dicomweb
    keep: bool = False
    timeout: float = 60.0

    def __post_init__(self) -> None:
        check_dicomweb_url(self.url, "data.dicomweb.url", required=False)
        if self.study_date is not None:
            date = str(self.study_date)
            check(
                bool(_DICOM_DATE.match(date)) and date not in ("", "-"),
                "data.dicomweb.study_date",
                "a date YYYYMMDD or a range YYYYMMDD-YYYYMMDD (one end may be left open)",
                self.study_date,
            )
        check(self.timeout > 0, "data.dicomweb.timeout", "a positive number of seconds", self.timeout)


@dataclass(kw_only=True)
class DataSettings:
    """What to read and how to cut it into records (``conf/data``)."""

    source: Literal["mni152", "mni152_cohort", "nifti", "dicom", "nnunet", "folder", "dicomweb"] = "mni152"
    image: str | None = None
    label: str | None = None
    case_id: str | None = "mni152"
    label_names: list[str] | None = field(default_factory=lambda: ["background", "other_brain", "grey_matter", "white_matter"])
    spatial_dims: Literal[2, 3] = 2
    modality: str | None = "MR"
    spacing: list[float] = field(default_factory=lambda: [2.8, 2.8, 1.0])
    size: list[int] = field(default_factory=lambda: [64, 64])
    slice_axis: Literal[0, 1, 2] = 2
    min_foreground: float = 0.05
    level_bands: int = 3
    margin: int = 2
    labels: Literal["auto", "seg", "body"] = "auto"
    channel: int | str | None = None
    intensity: IntensitySettings = field(default_factory=IntensitySettings)
    attributes: AttributesSettings = field(default_factory=AttributesSettings)
    deid: DeidSettings = field(default_factory=DeidSettings)
    splits: SplitSettings = field(default_factory=SplitSettings)
    workers: int = 0
    subjects: int = 12
    max_image_gb: float = 4.0  # largest image a case may declare, or need while it is resampled, in GB of float32
    shard: str | None = None  # K/N: preprocess only shard K of N (a SLURM array task); merge or merge/N: the merge
    dicomweb: DicomwebSourceSettings = field(default_factory=DicomwebSourceSettings)

    def __post_init__(self) -> None:
        parse_shard(self.shard)
        if self.source == "dicomweb":
            check_dicomweb_url(self.dicomweb.url, "data.dicomweb.url", required=True)
        check(
            self.subjects >= 3,
            "data.subjects",
            "an integer >= 3 (data=demo_cohort fills train, validation and holdout)",
            self.subjects,
        )
        if self.source == "nifti":
            for key in ("image", "label", "label_names"):
                check(getattr(self, key) is not None, f"data.{key}", "set for data=nifti (see conf/data/nifti.yaml)", None)
        check(
            len(self.spacing) == 3 and all(s > 0 for s in self.spacing), "data.spacing", "3 positive numbers (mm)", self.spacing
        )
        check(
            len(self.size) == self.spatial_dims and all(s >= 1 for s in self.size),
            "data.size",
            f"{self.spatial_dims} positive sizes for data.spatial_dims={self.spatial_dims}",
            self.size,
        )
        check(0.0 <= self.min_foreground <= 1.0, "data.min_foreground", "a fraction in [0, 1]", self.min_foreground)
        check(self.level_bands >= 0, "data.level_bands", "an integer >= 0", self.level_bands)
        check(self.margin >= 0, "data.margin", "an integer >= 0", self.margin)
        check(self.max_image_gb > 0, "data.max_image_gb", "a positive number of GB", self.max_image_gb)
        check(self.workers >= 0, "data.workers", "an integer >= 0", self.workers)
        check(
            self.label_names is None or len(self.label_names) >= 2,
            "data.label_names",
            "at least background and one label",
            self.label_names,
        )


# ------------------------------------------------------------------------------------------- train


@dataclass(kw_only=True)
class AutoencoderModelSettings:
    network: dict[str, Any]
    decode_tile: list[int] | None = None

    def __post_init__(self) -> None:
        target = self.network.get("_target_")
        check(target in AUTOENCODERS, "model.autoencoder.network._target_", f"one of {', '.join(AUTOENCODERS)}", target)


def _demo_network() -> dict[str, Any]:
    return {
        "_target_": "monai.networks.nets.DiffusionModelUNet",
        "spatial_dims": 2,
        "channels": [32, 64, 64],
        "attention_levels": [False, False, True],
        "num_res_blocks": 1,
        "num_head_channels": 32,
        "norm_num_groups": 16,
    }


@dataclass(kw_only=True)
class ModelSettings:
    """The denoiser: its conditioning, output and network (``conf/model``)."""

    conditioning: Literal["mask", "joint", "class", "attributes", "none"] = "joint"
    output: Literal["image", "label", "pair"] | None = None
    image_channels: int = 1
    class_key: str = "class"
    attribute_keys: list[str] | None = None
    context_dim: int = 64
    condition_dropout: float = 0.1
    autoencoder: AutoencoderModelSettings | None = None
    network: dict[str, Any] = field(default_factory=_demo_network)

    def __post_init__(self) -> None:
        check_mode(self.conditioning, self.output or default_output(self.conditioning))
        target = self.network.get("_target_")
        check(target in NETWORKS, "model.network._target_", f"one of {', '.join(NETWORKS)}", target)
        check(self.image_channels >= 1, "model.image_channels", "an integer >= 1", self.image_channels)
        check(self.context_dim >= 1, "model.context_dim", "an integer >= 1", self.context_dim)
        check(0.0 <= self.condition_dropout < 1.0, "model.condition_dropout", "a probability in [0, 1)", self.condition_dropout)
        check(
            self.autoencoder is None or self.conditioning != "joint",
            "model.conditioning",
            "mask, class, attributes or none for latent diffusion (joint needs pixel space)",
            self.conditioning,
        )

    @property
    def spatial_dims(self) -> int:
        return int(self.network.get("spatial_dims", 2))


@dataclass(kw_only=True)
class SchedulerSettings:
    """The training noise schedule and prediction target (``conf/scheduler``).

    ``schedule``, ``prediction_type`` and ``clip_sample`` apply to DDPM and DDIM; rectified flow
    predicts the velocity and takes only ``num_train_timesteps``.
    """

    _target_: str = "monai.networks.schedulers.DDPMScheduler"
    num_train_timesteps: int = 1000
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"] | None = (
        None  # DDPM/DDIM default: linear_beta
    )
    prediction_type: Literal["epsilon", "sample", "v_prediction"] | None = None  # DDPM/DDIM default: sample
    clip_sample: bool | None = None  # DDPM/DDIM default: true

    def __post_init__(self) -> None:
        check(self._target_ in SCHEDULERS, "scheduler._target_", f"one of {', '.join(SCHEDULERS)}", self._target_)
        check(self.num_train_timesteps >= 2, "scheduler.num_train_timesteps", "an integer >= 2", self.num_train_timesteps)
        defaults = {"schedule": "linear_beta", "prediction_type": "sample", "clip_sample": True}
        for key, default in defaults.items():
            if is_flow(self._target_):
                check(
                    getattr(self, key) is None,
                    f"scheduler.{key}",
                    "unset for rectified flow (it predicts velocity)",
                    getattr(self, key),
                )
            elif getattr(self, key) is None:
                setattr(self, key, default)

    @property
    def is_flow(self) -> bool:
        return is_flow(self._target_)

    def options(self) -> dict[str, Any]:
        """The scheduler's constructor arguments (unset ones left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "_target_" and v is not None}


@dataclass(kw_only=True)
class ValidationSettings:
    timestep_fractions: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    max_records: int | None = 256  # validation loss on at most this many records, evenly spaced (null: all)

    def __post_init__(self) -> None:
        check(
            bool(self.timestep_fractions) and all(0.0 <= f <= 1.0 for f in self.timestep_fractions),
            "trainer.validation.timestep_fractions",
            "fractions in [0, 1]",
            self.timestep_fractions,
        )
        check(
            self.max_records is None or self.max_records >= 1,
            "trainer.validation.max_records",
            "an integer >= 1 or null (all records)",
            self.max_records,
        )


@dataclass(kw_only=True)
class SamplingSettings:
    """How the trained generator samples unless told otherwise: the sample grid, and the defaults
    stored in the checkpoint for the served model."""

    sampler: Sampler = "auto"
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 3.0

    def __post_init__(self) -> None:
        check(self.steps >= 1, "trainer.sampling.steps", "an integer >= 1", self.steps)
        check(self.eta >= 0.0, "trainer.sampling.eta", "a number >= 0", self.eta)
        check(self.guidance_scale >= 0.0, "trainer.sampling.guidance_scale", "a number >= 0", self.guidance_scale)


@dataclass(kw_only=True)
class GridSettings:
    num: int = 8
    every_checkpoint: bool = True
    steps: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        check(self.num >= 0, "trainer.grid.num", "an integer >= 0", self.num)
        check(self.steps >= 1, "trainer.grid.steps", "an integer >= 1", self.steps)


@dataclass(kw_only=True)
class AutoencoderTrainingSettings:
    max_steps: int = 1000
    batch_size: int = 4
    lr: float = 1.0e-4
    kl_weight: float = 1.0e-6
    adversarial_weight: float = 0.0
    flip_dims: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        check(self.max_steps >= 1, "trainer.autoencoder.max_steps", "an integer >= 1", self.max_steps)
        check(self.batch_size >= 1, "trainer.autoencoder.batch_size", "an integer >= 1", self.batch_size)
        check(self.lr > 0, "trainer.autoencoder.lr", "a number > 0", self.lr)
        check(self.kl_weight >= 0, "trainer.autoencoder.kl_weight", "a number >= 0", self.kl_weight)
        check(self.adversarial_weight >= 0, "trainer.autoencoder.adversarial_weight", "a number >= 0", self.adversarial_weight)


ACCOUNTANTS: tuple[str, ...] = ("rdp",)
"""Privacy accountants ``trainer.privacy.accountant`` may name (Opacus's Renyi-DP accountant)."""


@dataclass(kw_only=True)
class DifferentialPrivacySettings:
    """Patient-level DP-SGD (``trainer.privacy``); off unless ``enabled``.

    Each step samples every training patient with probability ``expected_batch_patients / n``,
    clips each sampled patient's gradient (summed over up to ``records_per_patient`` of its
    records) to ``max_grad_norm``, adds Gaussian noise calibrated so that ``target_epsilon`` is
    spent at ``trainer.max_steps`` for ``delta`` (default: ``1 / (10 n)``).
    """

    enabled: bool = False
    target_epsilon: float = 8.0
    delta: float | None = None
    max_grad_norm: float = 1.0
    expected_batch_patients: float = 8.0
    records_per_patient: int | None = 8
    min_patients: int = 20
    accountant: str = "rdp"
    patients_per_pass: int | None = None

    def __post_init__(self) -> None:
        check(self.target_epsilon > 0, "trainer.privacy.target_epsilon", "a number > 0", self.target_epsilon)
        check(
            self.delta is None or 0.0 < self.delta < 1.0,
            "trainer.privacy.delta",
            "null (1 / (10 x training patients)) or a number in (0, 1)",
            self.delta,
        )
        check(self.max_grad_norm > 0, "trainer.privacy.max_grad_norm", "a number > 0", self.max_grad_norm)
        check(
            self.expected_batch_patients > 0,
            "trainer.privacy.expected_batch_patients",
            "a number > 0",
            self.expected_batch_patients,
        )
        check(
            self.records_per_patient is None or self.records_per_patient >= 1,
            "trainer.privacy.records_per_patient",
            "null (all of a patient's records) or an integer >= 1",
            self.records_per_patient,
        )
        check(self.min_patients >= 2, "trainer.privacy.min_patients", "an integer >= 2", self.min_patients)
        check(self.accountant in ACCOUNTANTS, "trainer.privacy.accountant", f"one of {', '.join(ACCOUNTANTS)}", self.accountant)
        check(
            self.patients_per_pass is None or self.patients_per_pass >= 1,
            "trainer.privacy.patients_per_pass",
            "null (all sampled patients at once) or an integer >= 1",
            self.patients_per_pass,
        )


def _adamw() -> dict[str, Any]:
    return {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1.0e-3, "weight_decay": 0.0}


@dataclass(kw_only=True)
class TrainerSettings:
    """The training loop (``conf/trainer``)."""

    max_steps: int = 400
    batch_size: int = 16
    optimizer: dict[str, Any] = field(default_factory=_adamw)
    warmup_steps: int = 20
    min_lr_factor: float = 0.1
    ema_decay: float = 0.995
    grad_clip: float | None = 1.0
    accumulate: int = 1
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    flip_dims: list[int] = field(default_factory=lambda: [0])
    resume: str | None = None
    checkpoint_every: int = 100
    keep_last: int = 3
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    grid: GridSettings = field(default_factory=GridSettings)
    gradient_checkpointing: bool = False
    compile: bool = False
    compile_options: dict[str, Any] = field(default_factory=dict)
    latent_cache: bool = True
    autoencoder: AutoencoderTrainingSettings = field(default_factory=AutoencoderTrainingSettings)
    privacy: DifferentialPrivacySettings | Literal["dp", "off"] = field(default_factory=DifferentialPrivacySettings)

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "accumulate", "checkpoint_every", "keep_last"):
            check(getattr(self, key) >= 1, f"trainer.{key}", "an integer >= 1", getattr(self, key))
        check(self.warmup_steps >= 0, "trainer.warmup_steps", "an integer >= 0", self.warmup_steps)
        check(0.0 <= self.min_lr_factor <= 1.0, "trainer.min_lr_factor", "a fraction in [0, 1]", self.min_lr_factor)
        check(0.0 <= self.ema_decay < 1.0, "trainer.ema_decay", "a number in [0, 1)", self.ema_decay)
        check(self.grad_clip is None or self.grad_clip > 0, "trainer.grad_clip", "a number > 0 or null", self.grad_clip)
        target = self.optimizer.get("_target_")
        check(target in OPTIMIZERS, "trainer.optimizer._target_", f"one of {', '.join(OPTIMIZERS)}", target)
        check(
            self.resume in (None, "", "auto") or self.resume.endswith(".pt"),
            "trainer.resume",
            "null, auto or the path of a .pt checkpoint",
            self.resume,
        )
        if isinstance(self.privacy, str):  # trainer.privacy=dp: DP-SGD with the default settings
            self.privacy = DifferentialPrivacySettings(enabled=self.privacy == "dp")
        if self.privacy.enabled:
            self._check_private()

    def _check_private(self) -> None:
        """Refuse the options that would break patient-level DP-SGD's guarantee (see docs/how-it-works.md)."""
        dp = "with trainer.privacy.enabled=true"
        check(self.accumulate == 1, "trainer.accumulate", f"1 {dp} (each step already samples its own patients)", self.accumulate)
        check(
            self.precision != "fp16",
            "trainer.precision",
            f"fp32 or bf16 {dp} (the fp16 gradient scaler skips and rescales noised steps)",
            self.precision,
        )
        check(
            not self.gradient_checkpointing,
            "trainer.gradient_checkpointing",
            f"false {dp} (per-patient gradients are computed with torch.func)",
            self.gradient_checkpointing,
        )
        check(
            not self.compile, "trainer.compile", f"false {dp} (per-patient gradients are computed with torch.func)", self.compile
        )


# ---------------------------------------------------------------------------------------- generate


@dataclass(kw_only=True)
class LabelSourceSettings:
    source: Literal["train", "generator", "folder"] | None = None
    split: Split = "train"
    generator: str | None = None
    folder: str | None = None
    flip_prob: float = 0.5
    rotate_range: float = 0.1
    scale_range: float = 0.05
    translate_range: float = 2.0

    def __post_init__(self) -> None:
        if self.source == "generator":
            check(
                bool(self.generator),
                "generate.labels.generator",
                "the checkpoint of a label-map model for generate.labels.source=generator",
                self.generator,
            )
        if self.source == "folder":
            check(
                bool(self.folder),
                "generate.labels.folder",
                "a folder of NIfTI label maps for generate.labels.source=folder",
                self.folder,
            )
        check(0.0 <= self.flip_prob <= 1.0, "generate.labels.flip_prob", "a probability in [0, 1]", self.flip_prob)
        for key in ("rotate_range", "scale_range", "translate_range"):
            check(getattr(self, key) >= 0, f"generate.labels.{key}", "a number >= 0", getattr(self, key))


def require_label_source(conditioning: str, labels: LabelSourceSettings) -> None:
    """Refuse to generate with a mask model when nobody chose where its label maps come from.

    Reusing (augmented) training label maps puts every synthetic image near a training patient's,
    so it is never a silent default.

    Raises:
        ConfigError: For ``conditioning == "mask"`` with ``generate.labels.source`` unset.
    """
    check(
        conditioning != "mask" or labels.source is not None,
        "generate.labels.source",
        "a choice for a model that draws images for given label maps (model.conditioning=mask): generator "
        "(a label-map model: generate.labels.generator=CHECKPOINT), folder (your NIfTI label maps: "
        "generate.labels.folder=DIR) or train (augmented training maps: each image then sits near a training "
        "patient's, and the privacy gate may reject many; docs/own-data.md)",
        labels.source,
    )


@dataclass(kw_only=True)
class DicomOutputSettings:
    modality: Literal["MR", "CT"] = "MR"
    intensity_range: list[float] | None = None

    def __post_init__(self) -> None:
        check(
            self.intensity_range is None
            or (len(self.intensity_range) == 2 and self.intensity_range[0] < self.intensity_range[1]),
            "generate.dicom.intensity_range",
            "null or [low, high] with low < high",
            self.intensity_range,
        )


@dataclass(kw_only=True)
class DicomwebTargetSettings:
    """The DICOMweb server ``generate.push=dicomweb`` stores the synthetic set on (``generate.dicomweb``)."""

    url: str | None = None
    timeout: float = 60.0

    def __post_init__(self) -> None:
        check_dicomweb_url(self.url, "generate.dicomweb.url", required=False)
        check(self.timeout > 0, "generate.dicomweb.timeout", "a positive number of seconds", self.timeout)


@dataclass(kw_only=True)
class PrivacyGateSettings:
    """Whether generate enforces the per-sample privacy rules (``privacy``) on every candidate."""

    enabled: bool = True
    max_redraws: int = 10

    def __post_init__(self) -> None:
        check(self.max_redraws >= 0, "generate.privacy_gate.max_redraws", "an integer >= 0", self.max_redraws)


@dataclass(kw_only=True)
class GenerateSettings:
    """What to generate and how (``conf/generate``)."""

    checkpoint: str | None = None  # default: <paths.checkpoints>/last.pt
    num_samples: int = 32
    batch_size: int = 16
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 3.0
    seed: int = 1000
    formats: list[Literal["nifti", "dicom", "png"]] = field(default_factory=lambda: ["nifti", "png"])
    prompt: str | None = None
    class_distribution: dict[str, float] | None = None
    sampler: Sampler = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the device computes it natively
    compile: bool = False
    labels: LabelSourceSettings = field(default_factory=LabelSourceSettings)
    dicom: DicomOutputSettings = field(default_factory=DicomOutputSettings)
    privacy_gate: PrivacyGateSettings = field(default_factory=PrivacyGateSettings)
    require_audited: bool = False  # refuse a generator that is not a registered version with a PASS audit
    push: Literal["dicomweb"] | None = None  # dicomweb: store the DICOM series and SEGs on generate.dicomweb.url
    dicomweb: DicomwebTargetSettings = field(default_factory=DicomwebTargetSettings)

    def __post_init__(self) -> None:
        for key in ("num_samples", "batch_size", "steps"):
            check(getattr(self, key) >= 1, f"generate.{key}", "an integer >= 1", getattr(self, key))
        if self.push == "dicomweb":
            check(
                "dicom" in self.formats,
                "generate.formats",
                "a list with dicom for generate.push=dicomweb (the DICOM series and SEGs are what is stored)",
                self.formats,
            )
            check_dicomweb_url(self.dicomweb.url, "generate.dicomweb.url", required=True)
        check(self.eta >= 0.0, "generate.eta", "a number >= 0", self.eta)
        check(self.guidance_scale >= 0.0, "generate.guidance_scale", "a number >= 0", self.guidance_scale)
        check(self.seed >= 0, "generate.seed", "an integer >= 0", self.seed)
        check(bool(self.formats), "generate.formats", "a non-empty list of nifti, dicom, png", self.formats)
        if self.class_distribution is not None:
            weights = list(self.class_distribution.values())
            check(
                all(w >= 0 for w in weights) and sum(weights) > 0,
                "generate.class_distribution",
                "non-negative weights with a positive sum",
                self.class_distribution,
            )
        if self.prompt:
            parse_prompt(self.prompt)


# ----------------------------------------------------------------------------------------- privacy


@dataclass(kw_only=True)
class PrivacySettings:
    """The per-sample privacy rules (``conf/privacy``): one definition that generate's gate enforces
    on every candidate and evaluate's audit checks on every exported sample, with the same
    features and thresholds."""

    memorisation_threshold: float = 0.95
    holdout_quantile: float = 0.01
    metric: Literal["rms", "correlation"] = "rms"
    features: bool = True

    def __post_init__(self) -> None:
        check(
            0.0 < self.memorisation_threshold <= 1.0,
            "privacy.memorisation_threshold",
            "a number in (0, 1]",
            self.memorisation_threshold,
        )
        check(
            0.0 < self.holdout_quantile <= 0.5,
            "privacy.holdout_quantile",
            "a fraction in (0, 0.5] (the share of real holdout images counted as too close)",
            self.holdout_quantile,
        )
        check(self.metric in ("rms", "correlation"), "privacy.metric", "rms or correlation", self.metric)


# ---------------------------------------------------------------------------------------- evaluate


@dataclass(kw_only=True)
class EncoderSettings:
    """The dataset's feature encoder, shared by generate's privacy gate and evaluate (``conf/encoder``)."""

    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    steps: int = 150
    batch_size: int = 32
    lr: float = 1.0e-3
    temperature: float = 0.2

    def __post_init__(self) -> None:
        check(
            bool(self.channels) and all(c >= 1 for c in self.channels),
            "encoder.channels",
            "a list of positive widths",
            self.channels,
        )
        check(
            self.steps >= 1 and self.batch_size >= 2,
            "encoder.steps/batch_size",
            "steps >= 1 and batch_size >= 2",
            [self.steps, self.batch_size],
        )
        check(self.lr > 0 and self.temperature > 0, "encoder.lr/temperature", "positive numbers", [self.lr, self.temperature])


@dataclass(kw_only=True)
class SegmenterSettings:
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    steps: int = 150
    batch_size: int = 16
    lr: float = 2.0e-3

    def __post_init__(self) -> None:
        check(
            bool(self.channels) and all(c >= 1 for c in self.channels),
            "evaluate.segmenter.channels",
            "a list of positive widths",
            self.channels,
        )
        check(
            self.steps >= 1 and self.batch_size >= 1 and self.lr > 0,
            "evaluate.segmenter.steps/batch_size/lr",
            "positive values",
            [self.steps, self.batch_size, self.lr],
        )


@dataclass(kw_only=True)
class MembershipSettings:
    timesteps: list[int] = field(default_factory=lambda: [50, 200, 500])
    attacks: list[str] = field(default_factory=lambda: ["loss", "pia"])
    max_records: int | None = 128
    batch_size: int = 16

    def __post_init__(self) -> None:
        check(
            bool(self.timesteps) and all(t >= 0 for t in self.timesteps),
            "evaluate.membership.timesteps",
            "a list of timesteps >= 0",
            self.timesteps,
        )
        check(
            self.max_records is None or self.max_records >= 2,
            "evaluate.membership.max_records",
            "an integer >= 2 or null",
            self.max_records,
        )
        check(self.batch_size >= 1, "evaluate.membership.batch_size", "an integer >= 1", self.batch_size)
        check(
            bool(self.attacks) and set(self.attacks) <= {"loss", "pia"} and len(set(self.attacks)) == len(self.attacks),
            "evaluate.membership.attacks",
            "a non-empty list of loss, pia without repeats",
            self.attacks,
        )


@dataclass(kw_only=True)
class LimitSettings:
    min: float | None = None
    max: float | None = None


VERDICT_GROUPS: tuple[str, ...] = ("privacy", "realism", "utility")
"""The verdict's groups: a limit belongs to the group its figure's name starts with (``<group>/...``)."""


def _default_limits() -> dict[str, LimitSettings | None]:
    return {
        "privacy/rule_violations_count": LimitSettings(max=0),
        "privacy/memorised_count": LimitSettings(max=0),
        "privacy/membership_auc": LimitSettings(max=0.75),
        "privacy/closer_to_train_fraction_feature": LimitSettings(max=0.75),
        "realism/fid_features_ratio": LimitSettings(max=4.0),
        "realism/label_consistency_dice_ratio": LimitSettings(min=0.7),
        "utility/dice_synthetic_only_ratio": LimitSettings(min=0.5),
    }


@dataclass(kw_only=True)
class EvaluateSettings:
    """The audit (``conf/evaluate``)."""

    sheet_rows: int = 8
    max_ssim_pairs: int = 2000
    seed: int = 0
    min_reference_dice: float = 0.3
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # the attacks' and segmenters' networks; auto as in generate
    segmenter: SegmenterSettings = field(default_factory=SegmenterSettings)
    membership: MembershipSettings = field(default_factory=MembershipSettings)
    limits: dict[str, LimitSettings | None] = field(default_factory=_default_limits)

    def __post_init__(self) -> None:
        check(self.sheet_rows >= 0, "evaluate.sheet_rows", "an integer >= 0", self.sheet_rows)
        check(self.max_ssim_pairs >= 1, "evaluate.max_ssim_pairs", "an integer >= 1", self.max_ssim_pairs)
        check(0.0 <= self.min_reference_dice < 1.0, "evaluate.min_reference_dice", "a Dice in [0, 1)", self.min_reference_dice)
        for name, lim in self.limits.items():
            check(
                name.split("/", 1)[0] in VERDICT_GROUPS and "/" in name,
                f"evaluate.limits.{name}",
                f"a figure named <group>/<figure> with group one of {list(VERDICT_GROUPS)}",
                name,
            )
            check(
                lim is None or lim.min is not None or lim.max is not None,
                f"evaluate.limits.{name}",
                "null, {min: x}, {max: x} or both",
                None if lim is None else dataclasses.asdict(lim),
            )

    def limit_table(self) -> dict[str, dict[str, float]]:
        """The verdict's limits as ``{figure: {"min"|"max": value}}``, disabled (null) ones left out."""
        return {
            name: {k: v for k, v in (("min", lim.min), ("max", lim.max)) if v is not None}
            for name, lim in self.limits.items()
            if lim is not None
        }


# ------------------------------------------------------------------------------------------- whole


def check_training(model: ModelSettings, scheduler: SchedulerSettings, trainer: TrainerSettings, *, spatial_dims: int) -> None:
    """Check the training settings that must agree across groups (the train stage calls it too,
    for callers that build settings without :class:`PipelineSettings`).

    Args:
        model: The model settings.
        scheduler: The training noise schedule.
        trainer: The training loop settings.
        spatial_dims: The dataset's spatial dimensions (``data.spatial_dims``, or the manifest's).

    Raises:
        ConfigError: Naming the key that does not fit.
    """
    check(
        model.spatial_dims == spatial_dims,
        "model.network.spatial_dims",
        f"the dataset's spatial_dims ({spatial_dims})",
        model.spatial_dims,
    )
    check(
        model.autoencoder is None or not (isinstance(trainer.privacy, DifferentialPrivacySettings) and trainer.privacy.enabled),
        "model.autoencoder",
        "null with trainer.privacy.enabled=true (latent diffusion's autoencoder and latent scale are fitted to the "
        "training set without privacy)",
        "set",
    )
    check(
        model.autoencoder is None or not scheduler.clip_sample,
        "scheduler.clip_sample",
        "false for latent diffusion (latents are not confined to [-1, 1])",
        scheduler.clip_sample,
    )
    sampler_target(trainer.sampling.sampler, scheduler._target_, key="trainer.sampling.sampler")


@dataclass(kw_only=True)
class PipelineSettings(RunSettings):
    """The whole composed config (``conf/config.yaml``): the shared settings at the top level (this
    class extends :class:`RunSettings`) and one group per stage, checked across groups too."""

    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    encoder: EncoderSettings = field(default_factory=EncoderSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_training(self.model, self.scheduler, self.trainer, spatial_dims=self.data.spatial_dims)
        sampler_target(self.generate.sampler, self.scheduler._target_, key="generate.sampler")
        T = self.scheduler.num_train_timesteps
        check(
            all(t < T for t in self.evaluate.membership.timesteps),
            "evaluate.membership.timesteps",
            f"timesteps below scheduler.num_train_timesteps ({T})",
            self.evaluate.membership.timesteps,
        )

    @property
    def run(self) -> RunSettings:
        """The options all stages share."""
        return RunSettings(
            name=self.name, seed=self.seed, device=self.device, progress=self.progress, paths=self.paths, mlflow=self.mlflow
        )
