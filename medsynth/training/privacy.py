"""Patient-level differential privacy: the accountant, the noise calibration, the record a
checkpoint carries, and the checks that refuse a run whose guarantee would not hold.

The unit of privacy is the patient (a record's ``case``): every record of one patient is one
unit, so the guarantee bounds what the trained weights reveal about any one patient however many
slices they contributed. The accounting is Opacus's Renyi-DP accountant for the subsampled
Gaussian mechanism (Poisson sampling of patients at rate ``q``, noise multiplier ``sigma``); the
gradients themselves are computed by :mod:`medsynth.training.dp_sgd`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from medsynth import ConfigError, MedsynthError
from medsynth.config.settings import ACCOUNTANTS, DifferentialPrivacySettings
from medsynth.training.checkpoint import check_number, check_plain

MECHANISM = "DP-SGD, patient-level, Poisson-sampled patients, Gaussian noise"
"""What :class:`PrivacyRecord` describes, as written into the outputs."""


@dataclasses.dataclass(frozen=True)
class PrivacyRecord:
    """The (epsilon, delta) guarantee of a DP-trained generator and how it was reached.

    Attributes:
        accountant: The accountant's name (``rdp``: Opacus's Renyi-DP accountant).
        epsilon: Privacy loss spent after ``steps`` steps, for ``delta``.
        delta: The guarantee's delta.
        target_epsilon: The epsilon the noise was calibrated to reach at ``max_steps``.
        noise_multiplier: Noise standard deviation as a multiple of ``max_grad_norm``.
        sample_rate: Probability that a patient is in a step's batch.
        max_grad_norm: Clipping norm of each patient's gradient.
        steps: Noised steps taken.
        max_steps: Steps the noise was calibrated for.
        train_patients: Patients in the training split.
        records_per_patient: Records of a sampled patient used per step (``None``: all).
        unit: The unit of privacy (``patient``).
    """

    accountant: str
    epsilon: float
    delta: float
    target_epsilon: float
    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    steps: int
    max_steps: int
    train_patients: int
    records_per_patient: int | None
    unit: str = "patient"

    def as_json(self) -> dict[str, Any]:
        """The record as plain values (a checkpoint's ``privacy`` entry, ``metrics.json``), with the mechanism named."""
        return {**dataclasses.asdict(self), "mechanism": MECHANISM}

    def describe(self) -> str:
        """One line for a reader: ``patient-level DP-SGD (epsilon=7.98, delta=1e-05, rdp)``."""
        return f"patient-level DP-SGD (epsilon={self.epsilon:.3g}, delta={self.delta:.3g}, {self.accountant})"


_INTEGERS = ("steps", "max_steps", "train_patients")
_POSITIVE = ("epsilon", "target_epsilon", "noise_multiplier", "max_grad_norm")


def read_privacy(value: Any, *, where: str) -> PrivacyRecord | None:
    """The ``privacy`` entry of a loaded checkpoint as a :class:`PrivacyRecord`; ``None`` when absent.

    A checkpoint is data: the entry must be a mapping of exactly the record's keys holding plain
    numbers and strings in range, nothing else.

    Args:
        value: What the checkpoint holds under ``privacy`` (``None`` when it has no entry).
        where: The checkpoint, for messages.

    Returns:
        The record, or ``None``.

    Raises:
        MedsynthError: One line naming the key at fault.
    """
    if value is None:
        return None
    at = f"checkpoint {where}: privacy"
    check_plain(value, where=at)
    keys = {f.name for f in dataclasses.fields(PrivacyRecord)} | {"mechanism"}
    if not isinstance(value, Mapping) or set(value) != keys:
        got = sorted(map(str, value)) if isinstance(value, Mapping) else type(value).__name__
        raise MedsynthError(f"{at} must be a mapping with keys {sorted(keys)}, got {got}")
    for key in ("accountant", "unit", "mechanism"):
        if not isinstance(value[key], str) or len(value[key]) > 200:
            raise MedsynthError(f"{at}.{key} must be a short string, got {type(value[key]).__name__}")
    if value["accountant"] not in ACCOUNTANTS or value["unit"] != "patient":
        raise MedsynthError(f"{at}: accountant must be rdp and unit patient, got {value['accountant']!r}, {value['unit']!r}")
    fields: dict[str, Any] = {"accountant": value["accountant"], "unit": value["unit"]}
    for key in _INTEGERS:
        fields[key] = int(check_number(value[key], where=f"{at}.{key}", integer=True, low=0))
    for key in _POSITIVE:
        fields[key] = float(check_number(value[key], where=f"{at}.{key}", low=0.0, high=1e9))
    fields["delta"] = float(check_number(value["delta"], where=f"{at}.delta", low=1e-300, high=0.999999))
    fields["sample_rate"] = float(check_number(value["sample_rate"], where=f"{at}.sample_rate", low=1e-12, high=1.0))
    cap = value["records_per_patient"]
    fields["records_per_patient"] = (
        None if cap is None else int(check_number(cap, where=f"{at}.records_per_patient", integer=True, low=1))
    )
    if not all(math.isfinite(v) for v in fields.values() if isinstance(v, float)):
        raise MedsynthError(f"{at} holds a value that is not finite")
    return PrivacyRecord(**fields)


def checkpoint_privacy(path: str | Path) -> PrivacyRecord | None:
    """The checked :class:`PrivacyRecord` of the checkpoint file at ``path``; ``None`` for one trained without DP.

    Raises:
        MedsynthError: If the file cannot be read or its ``privacy`` entry is not a well-formed record.
    """
    from medsynth.training.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    return read_privacy(state.get("privacy"), where=str(path))


class PatientAccountant:
    """Privacy spent by noised steps of a fixed noise multiplier and patient sample rate.

    Wraps Opacus's accountant; its whole state is the list of ``(noise_multiplier, sample_rate,
    steps)`` segments, which a checkpoint stores so a resumed run ends with the same epsilon.

    Args:
        noise_multiplier: Noise standard deviation over the clipping norm.
        sample_rate: Probability that a patient is in a step's batch.
        steps: Steps already taken (when resuming).
        accountant: ``rdp``.
    """

    def __init__(self, *, noise_multiplier: float, sample_rate: float, steps: int = 0, accountant: str = "rdp") -> None:
        from opacus.accountants import create_accountant

        self.name = accountant
        self.noise_multiplier, self.sample_rate = float(noise_multiplier), float(sample_rate)
        self._opacus = create_accountant(mechanism=accountant)
        if steps:
            self._opacus.history = [(self.noise_multiplier, self.sample_rate, int(steps))]

    @property
    def steps(self) -> int:
        """Noised steps accounted for."""
        return sum(int(n) for _, _, n in self._opacus.history)

    def step(self) -> None:
        """Account for one more noised step."""
        self._opacus.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far for ``delta`` (0 before the first step)."""
        if not self._opacus.history:
            return 0.0
        with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound holds, a little loose
            warnings.simplefilter("ignore", UserWarning)
            return float(self._opacus.get_epsilon(delta=delta))


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to Opacus's tolerance) whose ``steps`` steps spend at most ``target_epsilon``.

    Args:
        target_epsilon: The privacy budget of the whole run.
        delta: The guarantee's delta.
        sample_rate: Probability that a patient is in a step's batch.
        steps: Noised steps of the whole run (``trainer.max_steps``).
        accountant: ``rdp``.

    Returns:
        The noise multiplier.

    Raises:
        ConfigError: If no noise reaches the budget (Opacus gives up).
    """
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                    epsilon_tolerance=0.01,
                )
            )
    except ValueError as err:
        raise ConfigError(
            f"trainer.privacy.target_epsilon={target_epsilon} cannot be reached with delta={delta:g}, "
            f"sample rate {sample_rate:.4g} and {steps} steps: {err}"
        ) from None


def patient_groups(cases: Sequence[str]) -> list[list[int]]:
    """The row indices of each patient, patients in sorted order of their ids.

    Args:
        cases: The patient (``case``) id of each training row, in row order.

    Returns:
        One list of row indices per patient.
    """
    rows: dict[str, list[int]] = {}
    for i, case in enumerate(cases):
        rows.setdefault(str(case), []).append(i)
    return [rows[case] for case in sorted(rows)]


@dataclasses.dataclass(frozen=True)
class PrivatePlan:
    """What a DP training run is set to do: sample rate, noise and the delta it reports for."""

    settings: DifferentialPrivacySettings
    train_patients: int
    sample_rate: float
    noise_multiplier: float
    delta: float
    max_steps: int

    def record(self, accountant: PatientAccountant) -> PrivacyRecord:
        """The guarantee after the steps ``accountant`` has seen."""
        return PrivacyRecord(
            accountant=accountant.name,
            epsilon=accountant.epsilon(self.delta),
            delta=self.delta,
            target_epsilon=self.settings.target_epsilon,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            max_grad_norm=self.settings.max_grad_norm,
            steps=accountant.steps,
            max_steps=self.max_steps,
            train_patients=self.train_patients,
            records_per_patient=self.settings.records_per_patient,
        )


def private_plan(settings: DifferentialPrivacySettings, *, train_patients: int, max_steps: int) -> PrivatePlan:
    """Sample rate, delta and calibrated noise for DP training on ``train_patients`` patients.

    Args:
        settings: ``trainer.privacy``.
        train_patients: Patients in the training split.
        max_steps: ``trainer.max_steps``.

    Returns:
        The plan.

    Raises:
        ConfigError: For fewer patients than ``min_patients``, a batch larger than the patients,
            a delta not below 1 / patients, or a budget no noise reaches.
    """
    if train_patients < settings.min_patients:
        raise ConfigError(
            f"trainer.privacy.enabled=true needs at least trainer.privacy.min_patients="
            f"{settings.min_patients} training patients, the dataset has {train_patients}: on so few patients "
            "the noise that hides each one drowns what they share, and the samples stay noise-like (lower "
            "trainer.privacy.min_patients to train anyway; the demo cohort: data.subjects=30 leaves 21)"
        )
    rate = settings.expected_batch_patients / train_patients
    if rate > 1.0:
        raise ConfigError(
            f"trainer.privacy.expected_batch_patients must be at most the {train_patients} training "
            f"patients, got {settings.expected_batch_patients}"
        )
    delta = settings.delta if settings.delta is not None else 1.0 / (10 * train_patients)
    if delta >= 1.0 / train_patients:
        raise ConfigError(f"trainer.privacy.delta must be below 1 / training patients ({1.0 / train_patients:.3g}), got {delta}")
    noise = calibrate_noise(
        target_epsilon=settings.target_epsilon, delta=delta, sample_rate=rate, steps=max_steps, accountant=settings.accountant
    )
    return PrivatePlan(settings, train_patients, rate, noise, delta, max_steps)


def resumed_accountant(plan: PrivatePlan, saved: Mapping[str, Any] | None, *, where: str) -> PatientAccountant:
    """The accountant of a DP run: fresh, or continued from the checkpoint it resumes.

    Args:
        plan: The run's sample rate and noise.
        saved: The loaded checkpoint it resumes (``None`` for a fresh start).
        where: The checkpoint, for messages.

    Returns:
        The accountant, at the checkpoint's step.

    Raises:
        MedsynthError: For a checkpoint trained without DP (its weights would enter the private
            run unaccounted), or one whose noise or sample rate differ from this run's.
    """
    fresh = PatientAccountant(
        noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, accountant=plan.settings.accountant
    )
    if saved is None:
        return fresh
    record = read_privacy(saved.get("privacy"), where=where)
    if record is None:
        raise MedsynthError(
            f"cannot resume DP training from {where}: it was trained without trainer.privacy, and its "
            "weights (and their EMA) would carry non-private training into the private run"
        )
    same = (
        math.isclose(record.noise_multiplier, plan.noise_multiplier, rel_tol=1e-9)
        and math.isclose(record.sample_rate, plan.sample_rate, rel_tol=1e-9)
        and math.isclose(record.delta, plan.delta, rel_tol=1e-9)
        and record.max_steps == plan.max_steps
    )
    if not same:
        raise MedsynthError(
            f"cannot resume DP training from {where}: it was calibrated for noise "
            f"{record.noise_multiplier:.4g}, sample rate {record.sample_rate:.4g}, delta {record.delta:.3g} "
            f"and {record.max_steps} steps, this run for {plan.noise_multiplier:.4g}, "
            f"{plan.sample_rate:.4g}, {plan.delta:.3g} and {plan.max_steps}: keep trainer.privacy, "
            "trainer.max_steps and the dataset as they were"
        )
    return PatientAccountant(
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=record.steps,
        accountant=plan.settings.accountant,
    )


_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def check_private_model(model: nn.Module) -> None:
    """Refuse a model with batch normalisation: it mixes the records of different patients in one
    forward pass, so a patient's gradient would depend on the others.

    Raises:
        ConfigError: Naming the first batch-norm layer.
    """
    for name, module in model.named_modules():
        if isinstance(module, _BATCH_NORMS):
            raise ConfigError(
                f"trainer.privacy.enabled=true cannot train a model with batch normalisation "
                f"({name}: {type(module).__name__}); use group normalisation"
            )


def check_private_run(*, distributed: bool) -> None:
    """Refuse a distributed (DDP) DP run: each rank would sample and noise on its own.

    Raises:
        ConfigError: When ``distributed``.
    """
    if distributed:
        raise ConfigError(
            "trainer.privacy.enabled=true runs on one process: launch without torchrun (each rank would "
            "sample patients and add noise on its own, which the accountant does not cover)"
        )
