"""Stage 3: a trained model in, a labelled synthetic dataset and ``synthetic/manifest.csv`` out.

Every sample has its own seed, and everything about it (its condition, its label map, its noise)
follows from that seed, so any one sample can be regenerated alone. Samples are written in
batches and the manifest is rewritten after each batch, so an interrupted run leaves a manifest
that lists exactly the complete samples; a rerun with the same settings continues after them.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import io
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from medsynth import ConfigError, MedsynthError, __version__
from medsynth.data import LabelledArrays, Manifest, load_split, read_manifest
from medsynth.diffusion import Denoiser, sample
from medsynth.diffusion.denoiser import GUIDED_MODES, parse_prompt
from medsynth.evaluation.gate import PrivacyGate, build_privacy_gate
from medsynth.io import colorize_labels, display_slice, load_nifti, picture_sheet, save_nifti, save_png, write_json, write_text
from medsynth.tracking import Tracker
from medsynth.tracking.model import resolve_checkpoint
from medsynth.train import file_sha256, load_checkpoint
from medsynth.transforms import label_augmentation
from pipelines.common import (
    CONFIG_DIR, build_sampler, dataset_encoder, exit_on_user_error, load_ema_model, pick_device, stage_run,
)

log = logging.getLogger("medsynth")

FORMATS = ("nifti", "dicom", "png")
LABEL_SOURCES = ("train", "generator", "folder")
MANIFEST_COLUMNS = (
    "sample_id", "image", "label", "dicom_series", "dicom_seg", "preview", "seed", "label_source", "attributes",
    "checkpoint", "checkpoint_sha256", "train_run_id", "sampler", "steps", "eta", "guidance_scale",
    "label_generator_sha256", "privacy_gate", "gate_pixel_nearness", "gate_feature_distance", "draws", "gate_method",
    "medsynth_version",
)


@dataclasses.dataclass
class Candidate:
    """One sample's inputs, all fixed by its seed."""

    seed: int
    attributes: dict[str, str]
    label: torch.Tensor | None  # given label map (mask models), (1, *spatial)
    affine: np.ndarray
    label_source: str


def codes_for(model: Denoiser, attributes: list[dict[str, str]]) -> torch.Tensor | None:
    """Each sample's attributes as ``model``'s codes (attributes it does not know are left out)."""
    if model.conditioning not in GUIDED_MODES:
        return None
    return torch.cat([model.encode_attributes({k: v for k, v in a.items() if k in model.vocabulary}) for a in attributes])


def augmented_label(label: torch.Tensor, *, seed: int, augment: DictConfig, spatial_dims: int) -> torch.Tensor:
    """A randomly flipped and slightly warped copy of a ``(1, *spatial)`` label map, fixed by ``seed``."""
    chain = label_augmentation(
        flip_prob=augment.flip_prob, rotate_range=augment.rotate_range, scale_range=augment.scale_range,
        translate_range=augment.translate_range, spatial_dims=spatial_dims,
    )
    chain.set_random_state(seed=seed)
    out = chain({"label": label.float()})["label"]
    return torch.as_tensor(out).round().long()


def user_label_maps(folder: Path, *, shape: tuple[int, ...], num_classes: int) -> list[tuple[Path, torch.Tensor, np.ndarray]]:
    """The NIfTI label maps in ``folder``, checked against the model's grid and label values.

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


def plan_candidates(
    seeds: list[int], *, g: DictConfig, source: LabelledArrays, manifest: Manifest, model: Denoiser,
    user_maps: list[tuple[Path, torch.Tensor, np.ndarray]] | None, class_key: str | None,
) -> list[Candidate]:
    """Each seed's condition and label map (before any label-map generator runs)."""
    prompt = parse_prompt(g.prompt)
    distribution = dict(g.class_distribution or {})
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        pick = int(rng.integers(len(source)))  # a record of the source split: geometry, and its attributes by default
        record = manifest.split(g.labels.split)[pick]
        attributes = dict(record.attributes)
        if distribution:
            values, weights = list(distribution), np.asarray(list(distribution.values()), dtype=float)
            attributes[class_key or "class"] = str(values[int(rng.choice(len(values), p=weights / weights.sum()))])
        attributes.update(prompt)
        label, affine, label_source = None, source.affines[pick], ""
        if model.conditioning == "mask" and g.labels.source == "train":
            label = augmented_label(source.labels[pick], seed=seed, augment=g.labels, spatial_dims=manifest.spatial_dims)
            label_source = source.ids[pick]
        elif model.conditioning == "mask" and g.labels.source == "folder":
            path, label, affine = user_maps[int(rng.integers(len(user_maps)))]
            label_source = f"folder:{path.name}"
        out.append(Candidate(seed, attributes, label, affine, label_source))
    return out


def settings_fingerprint(cfg: DictConfig, checkpoint_hash: str, extra: Mapping[str, Any]) -> str:
    """Hash of everything that decides the samples, so a rerun continues only an identical run."""
    g = OmegaConf.to_container(cfg.generate, resolve=True)
    for key in ("num_samples", "batch_size", "device", "formats", "checkpoint"):
        g.pop(key, None)
    body = json.dumps({"generate": g, "checkpoint": checkpoint_hash, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def done_rows(out: Path, fingerprint: str) -> list[dict]:
    """Rows of an earlier run with the same settings whose files all exist; ``[]`` otherwise."""
    state, manifest = out / "generate.json", out / "manifest.csv"
    if not (state.is_file() and manifest.is_file()):
        return []
    if json.loads(state.read_text()).get("fingerprint") != fingerprint:
        return []
    complete = []
    for row in csv.DictReader(manifest.open(newline="")):
        if not all((out / row[k]).exists() for k in ("image", "label", "dicom_seg", "preview") if row.get(k)):
            break
        complete.append(row)
    return complete


def _write_manifest(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def write_dataset_json(out: Path, *, label_names: list[str], num_training: int, modality: str) -> Path:
    """nnU-Net v2's ``dataset.json`` for the ``imagesTr`` / ``labelsTr`` folders."""
    return write_json(out / "dataset.json", {
        "channel_names": {"0": modality}, "labels": {name: value for value, name in enumerate(label_names)},
        "numTraining": num_training, "file_ending": ".nii.gz",
        "description": "medsynth synthetic dataset; synthetic/manifest.csv holds each sample's provenance",
    })


def run(cfg: DictConfig, *, tracker: Tracker | None = None, parent_run_id: str | None = None) -> Path:
    """Generate ``generate.num_samples`` labelled synthetic samples.

    Args:
        cfg: The composed config.
        tracker: Tracker to log to (default: from ``cfg.mlflow``).
        parent_run_id: Pipeline run to nest under.

    Returns:
        Path of ``synthetic/manifest.csv``.
    """
    g = cfg.generate
    unknown = sorted(set(g.formats) - set(FORMATS))
    if unknown:
        raise ConfigError(f"generate.formats: unknown format(s) {unknown}; choose from {list(FORMATS)}")
    if g.num_samples < 1:
        raise ConfigError(f"generate.num_samples must be >= 1, got {g.num_samples}")
    if g.labels.source not in LABEL_SOURCES:
        raise ConfigError(f"generate.labels.source must be one of {LABEL_SOURCES}, got {g.labels.source!r}")
    with stage_run(cfg, "generate", tracker=tracker, parent_run_id=parent_run_id) as (tracker, run_id):
        device = pick_device(g.device)
        manifest = read_manifest(cfg.paths.data)
        checkpoint_path, ckpt, model = _load_model(
            resolve_checkpoint(str(g.checkpoint), tracking_uri=cfg.mlflow.tracking_uri,
                               download_dir=Path(cfg.paths.output) / "downloads"), manifest, device)
        train_cfg = OmegaConf.create(ckpt["config"])
        sampler = build_sampler(g.sampler, train_cfg.scheduler)
        checkpoint_hash = file_sha256(checkpoint_path)
        source = load_split(manifest, g.labels.split)
        grid = tuple(source.images.shape[2:])
        label_model, label_sampler, label_hash = None, None, ""
        if model.conditioning == "mask" and g.labels.source == "generator":
            if not g.labels.generator:
                raise ConfigError("generate.labels.source=generator needs generate.labels.generator=<checkpoint of a label-map model>")
            _, label_ckpt, label_model = _load_model(Path(g.labels.generator), manifest, device)
            if label_model.output != "label":
                raise MedsynthError(f"{g.labels.generator} is not a label-map generator (model.output={label_model.output})")
            label_sampler = build_sampler(g.sampler, OmegaConf.create(label_ckpt["config"]).scheduler)
            label_hash = file_sha256(Path(g.labels.generator))
        user_maps = (user_label_maps(Path(g.labels.folder), shape=grid, num_classes=manifest.num_classes)
                     if model.conditioning == "mask" and g.labels.source == "folder" else None)
        guided = model.conditioning in GUIDED_MODES
        modality = str(g.dicom.modality)
        gate = _privacy_gate(cfg, manifest, model, device,
                             train_split=source if g.labels.split == "train" else None)
        gate_method = gate.describe()["method"] if gate is not None else "off"

        out = Path(cfg.paths.synthetic)
        fingerprint = settings_fingerprint(cfg, checkpoint_hash, {"label_generator": label_hash, "gate": gate_method})
        rows = done_rows(out, fingerprint)
        if rows:
            log.info("generate: continuing after %d samples already in %s", len(rows), out / "manifest.csv")
        write_json(out / "generate.json", {"fingerprint": fingerprint})
        common = {
            "checkpoint": str(g.checkpoint), "checkpoint_sha256": checkpoint_hash, "train_run_id": ckpt.get("run_id", ""),
            "sampler": g.sampler._target_.rsplit(".", 1)[-1], "steps": g.steps, "eta": g.eta,
            "guidance_scale": g.guidance_scale if guided else "", "label_generator_sha256": label_hash,
            "gate_method": gate_method, "medsynth_version": __version__,
        }
        previews: list[list[np.ndarray]] = []
        total_rejected = 0
        bar = tqdm(total=g.num_samples, initial=len(rows), desc="generate", unit="sample", disable=not cfg.trainer.progress)
        def draw(seeds: list[int]) -> tuple[list[Candidate], torch.Tensor | None, torch.Tensor | None]:
            candidates = plan_candidates(seeds, g=g, source=source, manifest=manifest, model=model, user_maps=user_maps,
                                         class_key=train_cfg.model.get("class_key"))
            if label_model is not None:
                _generate_label_maps(candidates, label_model, label_sampler, g, grid, device)
            return (candidates, *_sample_batch(model, sampler, candidates, g, grid, device))

        for start in range(len(rows), g.num_samples, g.batch_size):
            seeds = [g.seed + i for i in range(start, min(start + g.batch_size, g.num_samples))]
            batch, rejected = gated_draws(seeds, draw, gate, max_redraws=g.privacy_gate.max_redraws)
            total_rejected += rejected
            try:
                for index, (cand, image, label, verdict) in zip(seeds, batch):
                    preview = _preview(image, label) if "png" in g.formats and manifest.spatial_dims == 2 else None
                    row = _write_sample(out, f"syn_{index - g.seed:05d}", image, label, cand, g=g,
                                        label_names=manifest.label_names, modality=modality, preview=preview)
                    rows.append({**common, **row, **verdict, "attributes": " ".join(
                        f"{k}={v}" for k, v in sorted(cand.attributes.items()) if not model.vocabulary or k in model.vocabulary)})
                    if preview is not None and len(previews) < 16:
                        previews.append(preview)
                _write_manifest(out / "manifest.csv", rows)
            except OSError as err:
                _write_manifest(out / "manifest.csv", rows[: start])
                if err.errno == errno.ENOSPC:
                    raise MedsynthError(
                        f"disk full while writing to {out}: {start} complete samples are listed in manifest.csv; "
                        "free space and rerun to continue"
                    ) from None
                raise
            bar.update(len(seeds))
        bar.close()
        if "nifti" in g.formats:
            write_dataset_json(out, label_names=manifest.label_names, num_training=len(rows), modality=modality)
        tracker.log_params(run_id, {"checkpoint_sha256": checkpoint_hash, "num_samples": g.num_samples,
                                    "label_source": g.labels.source if model.conditioning == "mask" else "none",
                                    **{f"privacy_gate_{k}": v for k, v in (gate.describe() if gate else {"method": "off"}).items()}})
        tracker.log_metrics(run_id, {"privacy_gate_rejected": total_rejected})
        if total_rejected:
            log.info("generate: the privacy gate rejected %d candidates and drew replacements", total_rejected)
        tracker.log_artifact(run_id, out / "manifest.csv", artifact_path="synthetic")
        if previews:
            grid_png = save_png(out / "samples.png", picture_sheet(previews, titles=["label", "synthetic"]))
            tracker.log_artifact(run_id, grid_png, artifact_path="synthetic")
        log.info("generate: %d samples -> %s", len(rows), out / "manifest.csv")
        return out / "manifest.csv"


def redraw_seed(seed: int, draw: int) -> int:
    """The seed of replacement ``draw`` (1, 2, ...) of the sample with ``seed``: a fixed function, so
    a replacement can be regenerated alone from the seed the manifest records."""
    return int(np.random.SeedSequence([seed, draw]).generate_state(1, dtype=np.uint32)[0])


def gated_draws(
    seeds: list[int], draw: Any, gate: PrivacyGate | None, *, max_redraws: int,
) -> tuple[list[tuple[Candidate, np.ndarray | None, np.ndarray | None, dict[str, Any]]], int]:
    """Draw one sample per seed; candidates the privacy gate rejects are replaced by new draws.

    Args:
        seeds: Seeds of the samples, in order.
        draw: ``draw(seeds) -> (candidates, images, labels)``.
        gate: The privacy gate, or ``None``.
        max_redraws: Replacement draws per sample before generation stops with an error.

    Returns:
        Per seed ``(candidate, image, label, gate columns)`` and the number of rejected candidates.

    Raises:
        MedsynthError: If a sample is still rejected after ``max_redraws`` replacements.
    """
    result: dict[int, tuple] = {}
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
                    raise MedsynthError(
                        f"the privacy gate rejected sample seed {seed} and all {max_redraws} replacements: the model "
                        "reproduces training images; generate from other conditions, train a less memorising model, "
                        "or raise generate.privacy_gate.max_redraws"
                    )
                retry.append(seed)
                continue
            verdict = {"privacy_gate": "accepted" if check is not None else "off", "draws": attempts[seed] + 1,
                       "gate_pixel_nearness": f"{check.pixel[k]:.6g}" if check is not None else "",
                       "gate_feature_distance": f"{check.feature[k]:.6g}" if check is not None and check.feature is not None else ""}
            result[seed] = (cand, images[k, 0].numpy() if images is not None else None,
                            labels[k, 0].numpy() if labels is not None else None, verdict)
        pending = retry
    return [result[s] for s in seeds], rejected


def _privacy_gate(cfg: DictConfig, manifest: Manifest, model: Denoiser, device: torch.device, *,
                  train_split: LabelledArrays | None = None) -> PrivacyGate | None:
    """The gate of ``generate.privacy_gate`` calibrated on this dataset, or ``None`` when off or not applicable.

    ``train_split`` is the training split when the caller has it loaded already.
    """
    p = cfg.generate.privacy_gate
    if not p.enabled:
        log.warning("generate: the privacy gate is off; synthetic images are not checked against the training records")
        return None
    if model.output == "label":
        log.info("generate: a label-map model makes no images; the privacy gate does not apply")
        return None
    train_split = train_split if train_split is not None else load_split(manifest, "train")
    holdout = load_split(manifest, "holdout")
    encoder = dataset_encoder(cfg, train_split, spatial_dims=manifest.spatial_dims, device=device) if p.features else None
    return build_privacy_gate(train_split.images, holdout.images, encoder=encoder, quantile=p.quantile, metric=p.metric,
                              device=device)


def _load_model(path: Path, manifest: Manifest, device: torch.device) -> tuple[Path, dict, Denoiser]:
    ckpt = load_checkpoint(path)
    if list(ckpt["label_names"]) != manifest.label_names:
        raise MedsynthError(
            f"checkpoint {path} was trained on labels {ckpt['label_names']}, but the dataset at {manifest.root} has {manifest.label_names}"
        )
    return path, ckpt, load_ema_model(ckpt, path, num_classes=manifest.num_classes).to(device)


def _generate_label_maps(candidates: list[Candidate], model: Denoiser, sampler: Any, g: DictConfig,
                         grid: tuple[int, ...], device: torch.device) -> None:
    """Fill each candidate's label map from the label-map generator, seeded by the candidate's seed."""
    codes = codes_for(model, [c.attributes for c in candidates])
    x = sample(model, sampler, codes.to(device) if codes is not None else None, seeds=[c.seed for c in candidates],
               shape=model.sample_shape(grid), steps=g.steps, eta=g.eta, device=device,
               guidance_scale=g.guidance_scale if codes is not None else 1.0)
    for cand, label in zip(candidates, model.split(x)[1].cpu()):
        cand.label, cand.label_source = label, "generator"


def _sample_batch(model: Denoiser, sampler: Any, candidates: list[Candidate], g: DictConfig, grid: tuple[int, ...],
                  device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Images and label maps of a batch: generated labels for joint / label models, the given ones for mask models."""
    given = torch.stack([c.label for c in candidates]) if model.conditioning == "mask" else None
    condition = model.condition(given, codes_for(model, [c.attributes for c in candidates]))
    guided = model.conditioning in GUIDED_MODES
    x = sample(model, sampler, condition.to(device) if condition is not None else None, seeds=[c.seed for c in candidates],
               shape=model.sample_shape(grid), steps=g.steps, eta=g.eta, device=device,
               guidance_scale=g.guidance_scale if guided else 1.0)
    images, generated = model.split(x)
    labels = generated if generated is not None else given
    return (images.cpu() if images is not None else None), (labels.cpu() if labels is not None else None)


def _write_sample(out: Path, sample_id: str, image: np.ndarray | None, label: np.ndarray | None, cand: Candidate, *,
                  g: DictConfig, label_names: list[str], modality: str, preview: list[np.ndarray] | None) -> dict[str, Any]:
    """Write one sample in every requested format (``preview``: its PNG columns, if one is wanted);
    returns its manifest row (files relative to ``out``)."""
    row: dict[str, Any] = {"sample_id": sample_id, "seed": cand.seed, "label_source": cand.label_source or
                           ("generated" if label is not None else "")}
    if "nifti" in g.formats:  # nnU-Net v2 raw layout
        if image is not None:
            row["image"] = save_nifti(out / "imagesTr" / f"{sample_id}_0000.nii.gz", image, cand.affine,
                                      dtype=np.float32).relative_to(out).as_posix()
        if label is not None:
            row["label"] = save_nifti(out / "labelsTr" / f"{sample_id}.nii.gz", label, cand.affine,
                                      dtype=np.uint8).relative_to(out).as_posix()
    if "dicom" in g.formats and image is not None:
        from medsynth.io.dicom_write import new_study, write_image_series, write_segmentation

        folder = out / "dicom" / sample_id
        study = new_study(sample_id)
        files = write_image_series(
            image, cand.affine, folder / "image", sample_id=sample_id, modality=modality, study=study, seed=cand.seed,
            series_description=f"medsynth synthetic {modality} {sample_id}",
            intensity_range=tuple(g.dicom.intensity_range) if g.dicom.intensity_range else None,
        )
        row["dicom_series"] = (folder / "image").relative_to(out).as_posix()
        if label is not None:
            row["dicom_seg"] = write_segmentation(label, files, folder / "seg.dcm", label_names=label_names).relative_to(out).as_posix()
    if preview is not None:
        row["preview"] = save_png(out / "previews" / f"{sample_id}.png", picture_sheet([preview])).relative_to(out).as_posix()
    return row


def _preview(image: np.ndarray | None, label: np.ndarray | None) -> list[np.ndarray]:
    """The label map (coloured) and the image of a 2D sample, a blank where one is missing."""
    blank = np.zeros((image if image is not None else label).shape, dtype=np.float32)
    return [colorize_labels(display_slice(label if label is not None else blank.astype(np.uint8))),
            display_slice(image if image is not None else blank)]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    exit_on_user_error("generate", run, cfg)


if __name__ == "__main__":
    main()
