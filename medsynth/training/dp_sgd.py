"""One DP-SGD step with the patient as the unit: Poisson-sample patients, take each sampled
patient's gradient (summed over its records) with ``torch.func``, clip it, sum, add Gaussian
noise, divide by the expected number of patients.

The per-patient gradients come from ``vmap(grad(...))`` over patients of a ``functional_call``
of the denoiser on that patient's records, so a patient's gradient never mixes with another's
(the model must not use batch normalisation: :func:`medsynth.training.privacy.check_private_model`).
All randomness (which patients, which of their records, flips, timesteps, noise) comes from
generators fixed by ``(seed, step)``, so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from monai.networks.schedulers import Scheduler
from torch import nn
from torch.func import functional_call, grad, vmap

from medsynth.data import LabelledArrays, step_generator
from medsynth.diffusion import Denoiser
from medsynth.diffusion.loss import prediction_target


@dataclasses.dataclass
class PatientBatch:
    """The records of one step's sampled patients, padded to the same count.

    Attributes:
        images: ``(P, K, C, *spatial)`` images in [0, 1].
        labels: ``(P, K, 1, *spatial)`` label maps.
        codes: ``(P, K, A)`` attribute codes.
        weights: ``(P, K)`` 1 for a record, 0 for padding.
    """

    images: torch.Tensor
    labels: torch.Tensor
    codes: torch.Tensor
    weights: torch.Tensor

    @property
    def num_patients(self) -> int:
        return int(self.weights.shape[0])

    @property
    def num_records(self) -> int:
        return int(self.weights.sum())


def sample_patients(num_patients: int, rate: float, *, generator: torch.Generator) -> list[int]:
    """Poisson sampling: each patient independently with probability ``rate`` (the batch may be empty)."""
    return torch.nonzero(torch.rand(num_patients, generator=generator) < rate).flatten().tolist()


def patient_batches(
    data: LabelledArrays,
    groups: Sequence[Sequence[int]],
    *,
    rate: float,
    records_per_patient: int | None,
    seed: int,
    flip_dims: Sequence[int] = (),
    start_step: int = 0,
) -> Iterator[PatientBatch]:
    """Yield the batch of every step from ``start_step + 1`` on, forever.

    Args:
        data: The training split.
        groups: Row indices of each patient (:func:`medsynth.training.privacy.patient_groups`).
        rate: Probability that a patient is in a step's batch.
        records_per_patient: Records of a sampled patient used per step, drawn at random without
            replacement (independently of the data); ``None``: all of them.
        seed: Seed of the stream.
        flip_dims: Spatial axes along which each record is flipped with probability 0.5.
        start_step: Steps already taken.

    Returns:
        An endless iterator of :class:`PatientBatch`.
    """
    step = start_step
    while True:
        step += 1
        chosen = sample_patients(len(groups), rate, generator=step_generator(seed, step, stream=5))
        picks = step_generator(seed, step, stream=7)
        rows = []
        for p in chosen:
            members = torch.as_tensor(list(groups[p]))
            if records_per_patient is not None and len(members) > records_per_patient:
                members = members[torch.randperm(len(members), generator=picks)[:records_per_patient]]
            rows.append(members)
        yield _pad(data, rows, flip_dims=flip_dims, generator=step_generator(seed, step, stream=2))


def _pad(data: LabelledArrays, rows: list[torch.Tensor], *, flip_dims: Sequence[int], generator: torch.Generator) -> PatientBatch:
    """Stack each patient's rows into ``(P, K, ...)`` with zero padding and per-record flips."""
    k = max((len(r) for r in rows), default=0)
    p = len(rows)
    images = data.images.new_zeros((p, k, *data.images.shape[1:]))
    labels = data.labels.new_zeros((p, k, *data.labels.shape[1:]))
    codes = data.codes.new_zeros((p, k, *data.codes.shape[1:]))
    weights = torch.zeros(p, k)
    for i, idx in enumerate(rows):
        image, label = data.images[idx], data.labels[idx]
        for axis in flip_dims:
            flip = (torch.rand(len(idx), generator=generator) < 0.5).view(-1, *([1] * (image.ndim - 1)))
            image = torch.where(flip, image.flip(axis + 2), image)
            label = torch.where(flip, label.flip(axis + 2), label)
        images[i, : len(idx)], labels[i, : len(idx)], codes[i, : len(idx)] = image, label, data.codes[idx]
        weights[i, : len(idx)] = 1.0
    return PatientBatch(images, labels, codes, weights)


@dataclasses.dataclass
class NoisedInputs:
    """What the network sees and must predict for each record, ``(P, K, ...)``; a ``mask`` model's
    condition is already one-hot (``(P, K, classes, *spatial)``)."""

    x_t: torch.Tensor
    t: torch.Tensor
    condition: torch.Tensor | None
    target: torch.Tensor
    weights: torch.Tensor


def noised_inputs(
    model: Denoiser, scheduler: Scheduler, batch: PatientBatch, *, seed: int, draw: int, device: torch.device
) -> NoisedInputs:
    """Noise every record of ``batch`` as :func:`medsynth.diffusion.diffusion_loss` does, outside the vectorised pass.

    Args:
        model: The denoiser (its condition and sample transforms).
        scheduler: The training noise schedule.
        batch: The step's patients.
        seed: The run's seed.
        draw: The step (fixes condition dropout, timesteps and noise).
        device: Where the model is.

    Returns:
        The inputs, shaped ``(P, K, ...)``.
    """
    p, k = batch.weights.shape
    flat = lambda x: x.reshape(p * k, *x.shape[2:]).to(device)  # noqa: E731
    images, labels = flat(batch.images), flat(batch.labels)
    # classifier-free guidance: drop conditions at the configured rate, fixed by the draw
    condition = model.drop_condition(model.condition(labels, flat(batch.codes)), generator=step_generator(seed, draw, stream=4))
    if model.conditioning == "mask":  # one-hot here: its range check cannot run under torch.func.grad
        condition = F.one_hot(labels[:, 0].long(), model.num_classes).movedim(-1, 1).float()
    x0 = model.to_sample(images, labels)
    noise = step_generator(seed, draw, stream=3)
    # t ~ U{0, ..., T-1} and eps ~ N(0, I), one per record
    t = torch.randint(0, scheduler.num_train_timesteps, (p * k,), generator=noise).to(device)
    eps = torch.randn(x0.shape, generator=noise, dtype=x0.dtype).to(device)
    # x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, and the target the network regresses
    x_t = scheduler.add_noise(original_samples=x0, noise=eps, timesteps=t)
    target = prediction_target(scheduler, x0, eps, t)
    unflat = lambda x: x.reshape(p, k, *x.shape[1:])  # noqa: E731
    return NoisedInputs(
        unflat(x_t), unflat(t), None if condition is None else unflat(condition), unflat(target), batch.weights.to(device)
    )


class _Forward(nn.Module):
    """The denoiser's forward pass on inputs from :func:`noised_inputs`: a ``mask`` model's one-hot
    condition is concatenated to the noisy sample as :meth:`Denoiser.forward` does (pixel space:
    latent models are refused with DP); other conditions go through the denoiser itself."""

    def __init__(self, model: Denoiser) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        if self.model.conditioning == "mask" and condition is not None:
            return self.model.network(torch.cat([x, condition.to(x.dtype)], dim=1), t)
        return self.model(x, t, condition)


def patient_gradients(
    model: Denoiser, inputs: NoisedInputs, *, chunk: int | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each patient's gradient of its records' summed loss, and every record's loss.

    Args:
        model: The denoiser; its trainable parameters are differentiated.
        inputs: The step's noised records, ``(P, K, ...)``.
        chunk: Patients per vectorised pass (``None``: all at once).

    Returns:
        ``{name: (P, *param.shape)}`` gradients keyed by ``model``'s parameter names, and ``(P, K)``
        per-record mean squared errors.
    """
    module = _Forward(model)
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    frozen = {**{n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}, **dict(module.named_buffers())}

    def patient_loss(
        weights_: dict[str, torch.Tensor],
        x_t: torch.Tensor,
        t: torch.Tensor,
        condition: torch.Tensor | None,
        target: torch.Tensor,
        weight: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        prediction = functional_call(module, (weights_, frozen), (x_t, t, condition))
        errors = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        return (errors * weight).sum(), errors

    in_dims = (None, 0, 0, None if inputs.condition is None else 0, 0, 0)
    grads, errors = vmap(grad(patient_loss, has_aux=True), in_dims=in_dims, chunk_size=chunk)(
        params, inputs.x_t, inputs.t, inputs.condition, inputs.target, inputs.weights
    )
    return {name.removeprefix("model."): g for name, g in grads.items()}, errors


def clip_and_sum(grads: dict[str, torch.Tensor], *, max_grad_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clip each patient's gradient to ``max_grad_norm`` and sum over patients.

    Args:
        grads: ``{name: (P, *shape)}`` per-patient gradients.
        max_grad_norm: The clipping norm ``C``.

    Returns:
        ``{name: shape}`` sum of ``g_p * min(1, C / |g_p|)``, and the ``(P,)`` norms before clipping.
    """
    flat = [g.flatten(1) for g in grads.values()]
    norms = torch.cat(flat, dim=1).norm(dim=1) if flat else torch.zeros(0)
    # |g_p| <= C after scaling (the small constant keeps a zero gradient zero)
    scale = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    summed = {n: torch.einsum("p,p...->...", scale.to(g.dtype), g) for n, g in grads.items()}
    return summed, norms


def private_gradient(
    model: Denoiser,
    scheduler: Scheduler,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_patients: float,
    seed: int,
    device: torch.device,
    chunk: int | None = None,
    on_noised: Callable[[], None] | None = None,
) -> Callable[[nn.Module, PatientBatch, int], tuple[float, int]]:
    """The gradient step of patient-level DP-SGD, as :func:`medsynth.training.train` calls it.

    It sets every trainable parameter's ``.grad`` to
    ``(sum_p clip(g_p) + N(0, (noise_multiplier * max_grad_norm)^2 I)) / expected_patients``.

    Args:
        model: The denoiser being trained.
        scheduler: The training noise schedule.
        noise_multiplier: ``sigma``: noise standard deviation over ``max_grad_norm``.
        max_grad_norm: Clipping norm of each patient's gradient.
        expected_patients: ``q * n``, the expected number of patients per step.
        seed: The run's seed (the Gaussian noise of step ``k`` is fixed by ``(seed, k)``).
        device: Where the model is.
        chunk: Patients per vectorised pass.
        on_noised: Called after each noised step (the accountant counts it).

    Returns:
        ``gradient_fn(module, batch, step)`` returning the mean loss of the step's records (NaN
        when no patient was sampled) and the number of records.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def gradient_fn(module: nn.Module, batch: PatientBatch, step: int) -> tuple[float, int]:
        if batch.num_patients:
            inputs = noised_inputs(model, scheduler, batch, seed=seed, draw=step, device=device)
            grads, errors = patient_gradients(model, inputs, chunk=chunk)
            summed, _ = clip_and_sum(grads, max_grad_norm=max_grad_norm)
            loss = float((errors * inputs.weights).sum() / inputs.weights.sum())
        else:
            summed, loss = {n: torch.zeros_like(p) for n, p in params.items()}, float("nan")
        noise = step_generator(seed, step, stream=6)
        for name, p in params.items():
            # Gaussian noise of std sigma * C on the clipped sum, then the average over the expected patients
            z = torch.randn(p.shape, generator=noise, dtype=torch.float32).to(device=device, dtype=p.dtype)
            p.grad = (summed[name].to(p.dtype) + noise_multiplier * max_grad_norm * z) / expected_patients
        if on_noised is not None:
            on_noised()
        return loss, batch.num_records

    return gradient_fn
