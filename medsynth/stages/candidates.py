"""What generate draws: each seed's condition and label map (planning), and the draws the privacy
gate accepts (replacing rejected candidates by draws with derived seeds).

Everything about a sample follows from its seed: the record its geometry and default attributes
come from, its class, its augmented or chosen label map, and its noise. So any one sample can be
regenerated alone from the seed its manifest row records.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth import MedsynthError
from medsynth.config.settings import GenerateSettings, LabelSourceSettings
from medsynth.data import LabelledArrays, Manifest
from medsynth.diffusion.denoiser import parse_prompt
from medsynth.diffusion.generator import Generator
from medsynth.evaluation.gate import PrivacyGate
from medsynth.io import load_nifti
from medsynth.transforms import label_augmentation

log = logging.getLogger("medsynth")

UserMaps = list[tuple[Path, torch.Tensor, np.ndarray]]
"""Label maps of ``generate.labels.folder``: (file, ``(1, *spatial)`` long tensor, affine)."""

Draw = Callable[[list[int]], tuple[list["Candidate"], torch.Tensor | None, torch.Tensor | None]]
"""``draw(seeds) -> (candidates, images, labels)``: one candidate and sample per seed."""

Accepted = tuple["Candidate", np.ndarray | None, np.ndarray | None, dict[str, Any]]
"""An accepted sample: its candidate, image, label map and gate columns."""


@dataclasses.dataclass
class Candidate:
    """One sample's inputs, all fixed by its seed."""

    seed: int
    attributes: dict[str, str]
    label: torch.Tensor | None  # given label map (mask models), (1, *spatial)
    affine: np.ndarray
    label_source: str


@dataclasses.dataclass
class Planner:
    """Plans each seed's candidate from the source split, the prompt and the class distribution.

    Attributes:
        settings: The generate settings (prompt, class distribution, label source).
        source: The records of ``generate.labels.split``.
        manifest: The dataset's manifest.
        conditioning: The generator's conditioning mode.
        class_key: The attribute ``generate.class_distribution`` sets.
        user_maps: The label maps of ``generate.labels.source=folder``.
    """

    settings: GenerateSettings
    source: LabelledArrays
    manifest: Manifest
    conditioning: str
    class_key: str = "class"
    user_maps: UserMaps | None = None

    def plan(self, seeds: Sequence[int]) -> list[Candidate]:
        """Each seed's condition and label map (before any label-map generator runs)."""
        g = self.settings
        prompt = parse_prompt(g.prompt)
        distribution = dict(g.class_distribution or {})
        records = self.manifest.split(g.labels.split)
        out = []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            pick = int(rng.integers(len(self.source)))  # a record of the source split: geometry, and its attributes by default
            attributes = dict(records[pick].attributes)
            if distribution:
                values, weights = list(distribution), np.asarray(list(distribution.values()), dtype=float)
                attributes[self.class_key] = str(values[int(rng.choice(len(values), p=weights / weights.sum()))])
            attributes.update(prompt)
            label, affine, label_source = None, self.source.affines[pick], ""
            if self.conditioning == "mask" and g.labels.source == "train":
                label = augmented_label(
                    self.source.labels[pick], seed=seed, augment=g.labels, spatial_dims=self.manifest.spatial_dims
                )
                label_source = self.source.ids[pick]
            elif self.conditioning == "mask" and g.labels.source == "folder":
                assert self.user_maps is not None
                path, label, affine = self.user_maps[int(rng.integers(len(self.user_maps)))]
                label_source = f"folder:{path.name}"
            out.append(Candidate(seed, attributes, label, affine, label_source))
        return out


def augmented_label(label: torch.Tensor, *, seed: int, augment: LabelSourceSettings, spatial_dims: int) -> torch.Tensor:
    """A randomly flipped and slightly warped copy of a ``(1, *spatial)`` label map, fixed by ``seed``."""
    chain = label_augmentation(
        flip_prob=augment.flip_prob,
        rotate_range=augment.rotate_range,
        scale_range=augment.scale_range,
        translate_range=augment.translate_range,
        spatial_dims=spatial_dims,
    )
    chain.set_random_state(seed=seed)
    out = chain({"label": label.float()})["label"]
    return torch.as_tensor(out).round().long()


def user_label_maps(folder: Path, *, shape: tuple[int, ...], num_classes: int) -> UserMaps:
    """The NIfTI label maps in ``folder``, checked against the model's grid and label values.

    Args:
        folder: ``generate.labels.folder``.
        shape: The spatial size the model generates.
        num_classes: Label values including background.

    Returns:
        Per file: its path, the map as a ``(1, *spatial)`` long tensor, and its affine.

    Raises:
        MedsynthError: For an empty folder, or a map of another shape or with unknown label values.
    """
    files = sorted([*folder.glob("*.nii"), *folder.glob("*.nii.gz")]) if folder.is_dir() else []
    if not files:
        raise MedsynthError(f"generate.labels.folder: no .nii/.nii.gz label maps in {folder}")
    maps = []
    for path in files:
        array, affine = load_nifti(path)
        array = np.squeeze(array) if array.ndim > len(shape) else array
        if tuple(array.shape) != tuple(shape):
            raise MedsynthError(f"label map {path} has shape {tuple(array.shape)}; the model generates {tuple(shape)}")
        if np.any(array < 0) or np.any(array >= num_classes) or not np.allclose(array, np.round(array)):
            bad = sorted({float(v) for v in np.unique(array) if v < 0 or v >= num_classes or v != round(v)})[:5]
            raise MedsynthError(f"label map {path} holds value(s) {bad}; the model knows labels 0..{num_classes - 1}")
        maps.append((path, torch.from_numpy(np.rint(array).astype(np.int64))[None], affine))
    return maps


def sample_candidates(
    candidates: list[Candidate],
    generator: Generator,
    settings: GenerateSettings,
    *,
    label_generator: Generator | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Draw the candidates' samples: label maps from ``label_generator`` first (if given), then images.

    Every draw is seeded by the candidate's seed, with ``generate``'s sampler, steps, eta and guidance.

    Returns:
        Images and label maps (generated ones for joint / label models, the given ones for mask models).
    """
    seeds = [c.seed for c in candidates]
    attributes = [c.attributes for c in candidates]
    options: dict[str, Any] = {
        "steps": settings.steps,
        "eta": settings.eta,
        "guidance_scale": settings.guidance_scale,
        "sampler": settings.sampler,
        "precision": settings.precision,
    }
    if label_generator is not None:
        maps = label_generator.sample(seeds, attributes=attributes, **options).labels
        assert maps is not None
        for cand, label in zip(candidates, maps):
            cand.label, cand.label_source = label, "generator"
    given = torch.stack([c.label for c in candidates if c.label is not None]) if generator.conditioning == "mask" else None
    drawn = generator.sample(seeds, labels=given, attributes=attributes, **options)
    return drawn.images, drawn.labels


def redraw_seed(seed: int, draw: int) -> int:
    """The seed of replacement ``draw`` (1, 2, ...) of the sample with ``seed``: a fixed function, so
    a replacement can be regenerated alone from the seed the manifest records."""
    return int(np.random.SeedSequence([seed, draw]).generate_state(1, dtype=np.uint32)[0])


def _broken_rules(check: Any, k: int) -> str:
    """`` (last: memorised, too_close_pixel)``: the rules candidate ``k`` broke, when the check says."""
    flags = {"memorised": "memorised", "too_close_pixel": "pixel_too_close", "too_close_feature": "feature_too_close"}
    broken = [rule for rule, field in flags.items() if getattr(check, field, None) is not None and bool(getattr(check, field)[k])]
    return f" (last: {', '.join(broken)})" if broken else ""


class GateRefused(MedsynthError):
    """The privacy gate rejected a sample and all its replacements.

    Attributes:
        accepted: The accepted samples of the batch's leading seeds (before the refused one), so the
            caller can keep them.
    """

    def __init__(self, message: str, *, accepted: list[Accepted]) -> None:
        super().__init__(message)
        self.accepted = accepted


def gated_draws(
    seeds: list[int], draw: Draw, gate: PrivacyGate | None, *, max_redraws: int, so_far: int = 0
) -> tuple[list[Accepted], int]:
    """Draw one sample per seed; candidates the privacy gate rejects (any per-sample privacy rule
    broken, :mod:`medsynth.evaluation.rules`) are replaced by new draws.

    Every round of draws with rejections logs one line on the stage logger: how many were rejected,
    the running count, the samples still waiting and the nearest rejected candidate against the
    thresholds, so a gate that rejects everything is seen at once rather than after the last redraw.

    Args:
        seeds: Seeds of the samples, in order.
        draw: ``draw(seeds) -> (candidates, images, labels)``.
        gate: The privacy gate, or ``None``.
        max_redraws: Replacement draws per sample before generation stops with an error.
        so_far: Candidates rejected earlier in the run, for the running count.

    Returns:
        Per seed ``(candidate, image, label, gate columns)`` and the number of rejected candidates.

    Raises:
        GateRefused: If a sample is still rejected after ``max_redraws`` replacements (a
            :class:`MedsynthError` carrying the batch's accepted leading samples).
    """
    result: dict[int, Accepted] = {}
    attempts = {s: 0 for s in seeds}
    rejected = 0
    pending = list(seeds)
    while pending:
        candidates, images, labels = draw([s if attempts[s] == 0 else redraw_seed(s, attempts[s]) for s in pending])
        check = gate.check(images) if gate is not None and images is not None else None
        retry = []
        for k, (seed, cand) in enumerate(zip(pending, candidates)):
            if check is not None and not check.accepted[k]:
                rejected += 1
                attempts[seed] += 1
                if attempts[seed] > max_redraws:
                    raise GateRefused(
                        f"the privacy gate rejected sample seed {seed} and all {max_redraws} replacements"
                        f"{_broken_rules(check, k)}: the model reproduces training images; generate from other "
                        "conditions, train a less memorising model, or raise generate.privacy_gate.max_redraws",
                        accepted=_leading(seeds, result),
                    )
                retry.append(seed)
                continue
            verdict = {
                "privacy_gate": "accepted" if check is not None else "off",
                "draws": attempts[seed] + 1,
                "gate_pixel_nearness": f"{check.pixel[k]:.6g}" if check is not None else "",
                "gate_feature_distance": f"{check.feature[k]:.6g}" if check is not None and check.feature is not None else "",
            }
            result[seed] = (
                cand,
                images[k, 0].numpy() if images is not None else None,
                labels[k, 0].numpy() if labels is not None else None,
                verdict,
            )
        if retry:
            _log_rejections(
                check,
                gate,
                rejected=len(retry),
                drawn=len(pending),
                total=so_far + rejected,
                redraw=max(attempts[s] for s in retry),
                max_redraws=max_redraws,
            )
        pending = retry
    return [result[s] for s in seeds], rejected


def _leading(seeds: Sequence[int], result: dict[int, Accepted]) -> list[Accepted]:
    """The accepted samples of the leading seeds, up to the first seed without one."""
    out = []
    for seed in seeds:
        if seed not in result:
            break
        out.append(result[seed])
    return out


def _log_rejections(check: Any, gate: Any, *, rejected: int, drawn: int, total: int, redraw: int, max_redraws: int) -> None:
    """One line for a round of draws in which the gate rejected candidates."""
    nearest = gate.explain(check) if isinstance(gate, PrivacyGate) else ""
    log.info(
        "generate: the privacy gate rejected %d of %d candidate(s) (%d so far); redrawing them (replacement %d of at most %d)%s",
        rejected,
        drawn,
        total,
        redraw,
        max_redraws,
        f": {nearest}" if nearest else "",
    )
