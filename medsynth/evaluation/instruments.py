"""The measuring instruments of the audit and of generate's privacy gate, each written once.

- the dataset's feature encoder (:func:`dataset_encoder`, :func:`saved_encoder`) and the features
  it gives (:func:`features`): 2D images are encoded whole, 3D volumes either by a 3D encoder or,
  with the dataset's 2D encoder, slice by slice (the 2.5D protocol: per-plane slice features, and
  per volume the mean slice feature of each plane, concatenated);
- the segmenters of the label-consistency and utility figures (:func:`train_segmenters`,
  :func:`holdout_dice`);
- the membership attacks' scores (:func:`membership_errors`): the denoising-error (``loss``) attack
  and PIA (:func:`pia_errors`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.networks.schedulers import RFlowScheduler, Scheduler
from torch import nn

from medsynth.compute import autocast
from medsynth.config.settings import EncoderSettings, SegmenterSettings
from medsynth.data import LabelledArrays, Record
from medsynth.data.dataset import attribute_codes
from medsynth.diffusion import Denoiser, denoising_errors
from medsynth.diffusion.generator import Generator, build_scheduler
from medsynth.metrics.realism import orthogonal_slices
from medsynth.metrics.segmentation import mean_dice
from medsynth.progress import progress_bar
from medsynth.training import file_sha256, load_checkpoint, save_checkpoint
from medsynth.training.encoder import FeatureEncoder, encode, train_encoder
from medsynth.training.segmenter import segment, train_segmenter

log = logging.getLogger("medsynth")

FEATURE_SPACES = ("2d", "2.5d", "3d")
"""``2d``: a 2D encoder on 2D images; ``2.5d``: a 2D encoder on the orthogonal slices of volumes;
``3d``: a 3D encoder on whole volumes."""

SEGMENTER_SETS = ("real", "synthetic", "real+synthetic")
"""What the utility segmenters are trained on, in the order :func:`train_segmenters` returns them."""

MEMBERSHIP_ATTACKS = ("loss", "pia")
"""The membership-inference attacks: ``loss``, the denoising error at fixed timesteps and noise
(Carlini et al. 2023); ``pia``, proximal initialisation (Kong et al. 2023, :func:`pia_errors`).
The audit runs all of them unless told otherwise (``evaluate.membership.attacks``)."""

PIA_NORM = 4
"""Order ``p`` of the ℓp norm PIA measures its error with (a high order weighs the few pixels a
model gets badly wrong, which is where unseen images differ)."""


# ------------------------------------------------------------------------------------ the encoder


def dataset_encoder(
    settings: EncoderSettings,
    data_dir: str | Path,
    train: LabelledArrays,
    *,
    spatial_dims: int,
    device: torch.device,
    seed: int = 0,
    progress: bool = False,
) -> FeatureEncoder:
    """The dataset's 2D feature encoder: ``data/encoder.pt`` when it was trained on this manifest
    with these settings, else trained on ``train`` and saved there.

    For 3D datasets it learns from the axial slices of the training volumes (2.5D protocol).

    Args:
        settings: The encoder's settings (``conf/encoder``).
        data_dir: The preprocessed dataset folder (holds ``manifest.json``).
        train: The training split.
        spatial_dims: 2 or 3, the dataset's records.
        device: Where to train it.
        seed: Seed of its training.
        progress: Show a progress bar.

    Returns:
        The encoder in eval mode, on the CPU.
    """
    encoder = saved_encoder(data_dir, settings=settings)
    if encoder is not None:
        return encoder
    if spatial_dims == 3:
        axial = torch.as_tensor(orthogonal_slices(train.images.numpy())["axial"])
        train = LabelledArrays(axial, torch.zeros_like(axial, dtype=torch.long), [str(i) for i in range(len(axial))], [])
    log.info("training the feature encoder on %d real training images", len(train))
    encoder = train_encoder(
        train,
        spatial_dims=2,
        channels=settings.channels,
        steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        temperature=settings.temperature,
        seed=seed,
        device=device,
        progress=progress,
    )
    save_checkpoint(
        Path(data_dir) / "encoder.pt",
        {
            "state": encoder.state_dict(),
            "settings": dataclasses.asdict(settings),
            "manifest_sha256": file_sha256(Path(data_dir) / "manifest.json"),
        },
    )
    return encoder.cpu().eval()


def saved_encoder(data_dir: str | Path, *, settings: EncoderSettings | None = None) -> FeatureEncoder | None:
    """The encoder kept in ``data/encoder.pt``, if it was trained on the dataset's current manifest.

    Args:
        data_dir: The preprocessed dataset folder.
        settings: Also require that it was trained with these settings (default: any).

    Returns:
        The encoder in eval mode on the CPU, or ``None`` when there is none or it is out of date.

    Raises:
        MedsynthError: One line naming the file and the key, for a file that is not a medsynth
            feature encoder: settings the schema refuses, or weights that are not exactly the
            tensors of the encoder those settings build (checked against it built on the ``meta``
            device first, so nothing is allocated for a file that does not fit).
    """
    from medsynth import ConfigError, MedsynthError
    from medsynth.config.schema import from_mapping
    from medsynth.training.checkpoint import check_state_dict

    path, manifest = Path(data_dir) / "encoder.pt", Path(data_dir) / "manifest.json"
    if not path.is_file() or not manifest.is_file():
        return None
    saved = load_checkpoint(path)  # a file of data: every part is checked before use
    if not {"state", "settings", "manifest_sha256"} <= set(saved) or not isinstance(saved["manifest_sha256"], str):
        raise MedsynthError(
            f"{path} is not a medsynth feature encoder (state, settings, manifest_sha256): delete it to train the encoder again"
        )
    try:
        stored = from_mapping(EncoderSettings, saved["settings"], key="encoder")
    except ConfigError as err:
        raise MedsynthError(f"checkpoint {path}: settings: {err}") from None
    if saved["manifest_sha256"] != file_sha256(manifest):
        return None
    if settings is not None and dataclasses.asdict(stored) != dataclasses.asdict(settings):
        return None
    with torch.device("meta"):
        shape_of = FeatureEncoder(spatial_dims=2, channels=stored.channels)
    weights = check_state_dict(shape_of, saved["state"], where=f"checkpoint {path}: state")
    encoder = FeatureEncoder(spatial_dims=2, channels=stored.channels)
    encoder.load_state_dict(weights)
    return encoder.eval()


# ----------------------------------------------------------------------------------- the features


@dataclasses.dataclass(frozen=True, eq=False)
class Features:
    """Encoder features of a set of images.

    Attributes:
        items: ``(N, D)`` one feature vector per image or volume (2.5D: the mean slice feature of
            each plane, concatenated, so ``D`` is three times the encoder's width).
        planes: 2.5D only: ``{plane: (N * slices, D)}`` the features of every ``sagittal``,
            ``coronal`` and ``axial`` slice; empty otherwise.
        space: One of :data:`FEATURE_SPACES`.
    """

    items: np.ndarray
    planes: dict[str, np.ndarray]
    space: str


def feature_space(encoder: nn.Module, *, spatial_dims: int) -> str:
    """How ``encoder`` measures images with ``spatial_dims`` dimensions: ``2d``, ``2.5d`` or ``3d``.

    Args:
        encoder: A feature encoder.
        spatial_dims: 2 or 3.

    Returns:
        ``2d`` for images; for volumes ``3d`` when the encoder has 3D convolutions, else ``2.5d``.
    """
    if spatial_dims == 2:
        return "2d"
    return "3d" if any(isinstance(m, nn.Conv3d) for m in encoder.modules()) else "2.5d"


def features(encoder: nn.Module, images: torch.Tensor | np.ndarray, *, batch_size: int = 256) -> Features:
    """Encoder features of ``(N, C, *spatial)`` images or volumes, as the audit and the gate use them.

    Args:
        encoder: The feature encoder (it runs where its weights are; images are moved there batch
            by batch).
        images: ``(N, C, H, W)`` images or ``(N, C, X, Y, Z)`` volumes.
        batch_size: Images (2.5D: slices) per encoder batch.

    Returns:
        Per-item features and, for the 2.5D protocol, per-plane slice features, all float32 on the CPU.
    """
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    space = feature_space(encoder, spatial_dims=x.ndim - 2)
    if space != "2.5d":
        return Features(encode(encoder, x, batch_size=batch_size).numpy(), {}, space)
    n = x.shape[0]
    planes = {
        name: encode(encoder, torch.as_tensor(cut), batch_size=batch_size)
        for name, cut in orthogonal_slices(x.cpu().numpy()).items()
    }
    per_volume = torch.cat([f.reshape(n, -1, f.shape[1]).mean(dim=1) for f in planes.values()], dim=1)
    return Features(per_volume.numpy(), {name: f.numpy() for name, f in planes.items()}, space)


# --------------------------------------------------------------------------------- the segmenters


def train_segmenters(
    settings: SegmenterSettings,
    *,
    real: LabelledArrays,
    synthetic: LabelledArrays,
    num_classes: int,
    spatial_dims: int,
    seed: int,
    device: torch.device | str,
    precision: str = "fp32",
    progress: bool = False,
) -> dict[str, nn.Module]:
    """Segmenters trained on the real training split, the synthetic set, and both together.

    The real one also judges label consistency (do synthetic images and their label maps agree);
    their Dice on the real holdout gives the utility figures.

    Args:
        settings: The segmenter's settings (``evaluate.segmenter``).
        real: The real training split.
        synthetic: The synthetic set.
        num_classes: Label values including background.
        spatial_dims: 2 or 3.
        seed: Seed of each training.
        device: Where to train.
        precision: ``fp32``, or ``bf16`` autocast for the forward passes (:func:`train_segmenter`).
        progress: Show progress bars.

    Returns:
        ``{name: segmenter}`` for each of :data:`SEGMENTER_SETS`, in eval mode on the CPU.
    """
    both = LabelledArrays(
        torch.cat([real.images, synthetic.images]), torch.cat([real.labels, synthetic.labels]), real.ids + synthetic.ids, []
    )
    sets = dict(zip(SEGMENTER_SETS, (real, synthetic, both)))
    return {
        name: train_segmenter(
            data,
            num_classes=num_classes,
            spatial_dims=spatial_dims,
            channels=settings.channels,
            steps=settings.steps,
            batch_size=settings.batch_size,
            lr=settings.lr,
            seed=seed,
            device=device,
            precision=precision,
            progress=progress,
            desc=f"segmenter ({name})",
        )
        for name, data in sets.items()
    }


def holdout_dice(segmenter: nn.Module, holdout: LabelledArrays, *, num_classes: int) -> float:
    """Mean Dice of ``segmenter``'s label maps on real images against their own (higher = better).

    Args:
        segmenter: A trained segmenter.
        holdout: Real images and label maps it never saw.
        num_classes: Label values including background.

    Returns:
        The mean Dice over foreground classes, pooled over the set.
    """
    return mean_dice(segment(segmenter, holdout.images), holdout.labels.numpy(), num_classes=num_classes)


# --------------------------------------------------------------------------- the membership attacks


def attack_sample(
    data: LabelledArrays, records: Sequence[Record], *, max_records: int | None, seed: int
) -> tuple[LabelledArrays, list[Record]]:
    """At most ``max_records`` of a split's rows and records for the membership attacks, drawn by ``seed``.

    The attacks' AUC is read from members against non-members; scoring a few hundred of each
    estimates it about as well as scoring thousands, at a fraction of the model passes. The rows
    keep their order, so the same seed draws the same rows in every run.
    """
    if max_records is None or len(data) <= max_records:
        return data, list(records)
    rows = np.sort(np.random.default_rng(seed).choice(len(data), size=max_records, replace=False))
    index = torch.as_tensor(rows)
    return (
        LabelledArrays(
            data.images[index],
            data.labels[index],
            [data.ids[i] for i in rows],
            [data.affines[i] for i in rows] if data.affines else [],
            data.codes[index],
        ),
        [records[i] for i in rows],
    )


def membership_errors(
    generator: Generator,
    data: LabelledArrays,
    records: Sequence[Record],
    *,
    timesteps: Sequence[int],
    seed: int,
    attacks: Sequence[str] = MEMBERSHIP_ATTACKS,
    batch_size: int = 16,
    precision: str = "fp32",
    progress: bool = False,
    desc: str = "membership attacks",
) -> dict[str, np.ndarray]:
    """Each membership attack's score of each record (lower = more likely trained on).

    Args:
        generator: The audited generator.
        data: Images and label maps of ``records``.
        records: The records, for their attributes (the model's condition codes).
        timesteps: Timesteps each attack averages over.
        seed: Seed of the ``loss`` attack's fixed noise draws (the same for every set, so sets are
            comparable); PIA draws no noise.
        attacks: Names from :data:`MEMBERSHIP_ATTACKS`.
        batch_size: Records per network pass.
        precision: ``fp32``, or ``bf16`` autocast for the network passes (the errors are reduced
            in float32 either way).
        progress: Show a progress bar (records times attacks).
        desc: The progress bar's label.

    Returns:
        ``{attack: (N,) errors}`` in the order of ``attacks``: the ``loss`` attack's mean squared
        denoising error, PIA's mean ℓp error (:func:`pia_errors`).

    Raises:
        ValueError: For an unknown attack, or PIA on a schedule it cannot invert
            (:func:`pia_errors`).
    """
    unknown = sorted(set(attacks) - set(MEMBERSHIP_ATTACKS))
    if unknown or not attacks:
        raise ValueError(f"membership attacks must be some of {list(MEMBERSHIP_ATTACKS)}, got {list(attacks)}")
    codes = attribute_codes(records, generator.model.vocabulary)
    scheduler = build_scheduler(generator.scheduler)
    out: dict[str, np.ndarray] = {}
    bar = progress_bar(total=len(attacks) * len(data.images), desc=desc, unit="record", enabled=progress)
    with autocast(precision, generator.device):
        for attack in attacks:
            if attack == "loss":
                errors = denoising_errors(
                    generator.model,
                    data.images,
                    data.labels,
                    scheduler,
                    timesteps=list(timesteps),
                    codes=codes,
                    seed=seed,
                    batch_size=batch_size,
                    on_batch=bar.update,
                )
            else:
                errors = pia_errors(
                    generator.model,
                    data.images,
                    data.labels,
                    scheduler,
                    timesteps=timesteps,
                    codes=codes,
                    batch_size=batch_size,
                    on_batch=bar.update,
                )
            out[attack] = errors.numpy()  # summed in float32 by the attack
    bar.close()
    return out


@torch.no_grad()
def pia_errors(
    model: Denoiser,
    images: torch.Tensor,
    labels: torch.Tensor,
    scheduler: Scheduler,
    *,
    timesteps: Sequence[int],
    codes: torch.Tensor | None = None,
    batch_size: int = 64,
    norm: int = PIA_NORM,
    on_batch: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """PIA, the proximal-initialisation membership attack (Kong et al. 2023, arXiv 2305.18355).

    The ``loss`` attack asks how well the model removes *random* noise. PIA removes the randomness:
    it asks the model, given the clean image at ``t = 0``, which noise it sees in it
    (``eps0``), puts exactly that noise back at timestep ``t`` the deterministic (DDIM) way,
    ``x_t = a_t x0 + b_t eps0``, and measures how far the model's noise estimate at ``t`` strays
    from ``eps0``. On an image it was trained on, a model's trajectory is consistent and the error
    is small. Every prediction type medsynth trains is read as a noise estimate
    (:func:`noise_estimate`). Cost: ``1 + len(timesteps)`` model evaluations per record.

    Args:
        model: The trained denoiser (EMA weights); conditioned models get their own condition.
        images: ``(N, C, *spatial)`` images in [0, 1].
        labels: ``(N, 1, *spatial)`` their label maps.
        scheduler: The training schedule (DDPM or DDIM with any prediction type, or rectified flow).
        timesteps: Timesteps ``t`` the error is averaged over.
        codes: ``(N, A)`` attribute codes for ``class`` / ``attributes`` models.
        batch_size: Records per forward pass.
        on_batch: Called with the number of records after each batch (a progress bar's ``update``).
        norm: Order ``p`` of the error's ℓp norm (taken as a mean over elements, so sizes compare).

    Returns:
        ``(N,)`` error of each record, averaged over ``timesteps`` (lower = more likely a member).

    Raises:
        ValueError: For a prediction type the noise cannot be recovered from.
    """
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(images.shape[0])
    for start in range(0, images.shape[0], batch_size):
        label = labels[start : start + batch_size].to(device)
        code = codes[start : start + batch_size].to(device) if codes is not None else None
        condition = model.condition(label, code)
        x0 = model.to_sample(images[start : start + batch_size].to(device), label)
        eps0 = _model_noise(model, scheduler, x0, 0, condition)  # the noise the model sees in the clean image
        for step in timesteps:
            a, b = diffusion_coefficients(scheduler, int(step))
            error = _model_noise(model, scheduler, a * x0 + b * eps0, int(step), condition) - eps0
            total[start : start + batch_size] += error.abs().pow(norm).flatten(1).mean(dim=1).pow(1.0 / norm).cpu()
        if on_batch is not None:
            on_batch(len(x0))
    return total / len(timesteps)


def _model_noise(
    model: Denoiser, scheduler: Scheduler, x_t: torch.Tensor, step: int, condition: torch.Tensor | None
) -> torch.Tensor:
    """The model's noise estimate at ``x_t``, timestep ``step``."""
    t = torch.full((x_t.shape[0],), step, device=x_t.device, dtype=torch.long)
    return noise_estimate(scheduler, model(x_t, t, condition).float(), x_t.float(), step)


def diffusion_coefficients(scheduler: Scheduler, step: int) -> tuple[float, float]:
    """``(a, b)`` with ``x_t = a x0 + b eps`` at timestep ``step``: what ``scheduler.add_noise`` does.

    Args:
        scheduler: A MONAI DDPM, DDIM or RFlow scheduler.
        step: An integer timestep in ``[0, num_train_timesteps)``.

    Returns:
        ``(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t))``, or ``(1 - t/T, t/T)`` for rectified flow.
    """
    if isinstance(scheduler, RFlowScheduler):
        s = step / scheduler.num_train_timesteps
        return 1.0 - s, s
    alpha_bar = float(scheduler.alphas_cumprod[step])
    return alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5


def noise_estimate(scheduler: Scheduler, prediction: torch.Tensor, x_t: torch.Tensor, step: int) -> torch.Tensor:
    """The noise ``eps`` a prediction of the scheduler's target implies, given ``x_t = a x0 + b eps``.

    Every target medsynth trains is ``c_x x0 + c_e eps`` (:func:`medsynth.diffusion.prediction_target`):
    ``epsilon`` (0, 1), ``sample`` (1, 0), ``v_prediction`` (``-b``, ``a``) and rectified flow's
    velocity ``x0 - eps`` (1, -1); with ``x_t`` that is two linear equations in ``x0`` and ``eps``.

    Args:
        scheduler: The training schedule.
        prediction: The model's output at ``x_t``.
        x_t: The noisy input.
        step: Its timestep.

    Returns:
        The implied noise, shaped like ``x_t``.

    Raises:
        ValueError: For another prediction type, or one that leaves the noise undetermined at
            ``step`` (``sample`` at a timestep without noise).
    """
    a, b = diffusion_coefficients(scheduler, step)
    kind = "flow" if isinstance(scheduler, RFlowScheduler) else str(scheduler.prediction_type)
    targets = {"epsilon": (0.0, 1.0), "sample": (1.0, 0.0), "v_prediction": (-b, a), "flow": (1.0, -1.0)}
    if kind not in targets:
        raise ValueError(
            f"PIA cannot read a noise estimate from prediction_type {kind!r}; "
            f"it knows {', '.join(targets)}: leave pia out of evaluate.membership.attacks"
        )
    c_x, c_e = targets[kind]
    det = a * c_e - b * c_x
    if abs(det) < 1e-12:
        raise ValueError(f"prediction_type {kind!r} determines no noise at timestep {step} (x_t carries none)")
    return (a * prediction - c_x * x_t) / det
