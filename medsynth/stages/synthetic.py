"""generate's output: per-sample files (NIfTI in nnU-Net v2's raw layout, DICOM image series and
SEG, PNG previews), ``manifest.csv`` listing exactly the complete samples, and ``dataset.json``.

The manifest records every file's SHA-256 beside its name (a DICOM series folder: one hash over
its files, :func:`medsynth.evaluation.provenance.folder_sha256`), so the audit and ``medsynth
verify`` can tell the files generate wrote from any others. It is rewritten after every batch, so
an interrupted run leaves a manifest of complete samples; a rerun with the same settings (the same
fingerprint in ``generate.json``) continues after those whose files are unchanged. A full disk
stops generation with the count of complete samples.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import io
import json
import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsynth import MedsynthError
from medsynth.config.settings import GenerateSettings
from medsynth.evaluation.provenance import FILE_COLUMNS, hash_column, path_sha256
from medsynth.io import colorize_labels, display_slice, load_nifti, picture_sheet, save_nifti, save_png, write_json, write_text
from medsynth.stages.candidates import Accepted, Candidate

log = logging.getLogger("medsynth")

_FILE_COLUMNS = FILE_COLUMNS  # image, label, dicom_series (a folder), dicom_seg, preview

DP_COLUMNS = (
    "dp_epsilon",
    "dp_delta",
    "dp_accountant",
    "dp_noise_multiplier",
    "dp_sample_rate",
    "dp_max_grad_norm",
    "dp_steps",
    "dp_unit",
)
"""The generator's differential-privacy record (empty for a generator trained without DP)."""

MANIFEST_COLUMNS = (
    "sample_id",
    *_FILE_COLUMNS,
    *(hash_column(c) for c in _FILE_COLUMNS),
    "seed",
    "label_source",
    "attributes",
    "checkpoint",
    "checkpoint_sha256",
    "train_run_id",
    "data_manifest_sha256",
    "sampler",
    "steps",
    "eta",
    "guidance_scale",
    "precision",
    "label_generator_sha256",
    "privacy_gate",
    "gate_pixel_nearness",
    "gate_feature_distance",
    "draws",
    "gate_method",
    *DP_COLUMNS,
    "medsynth_version",
)
"""Columns of ``synthetic/manifest.csv``, one row per sample."""

_SAMPLE_FOLDERS = ("imagesTr", "labelsTr", "dicom", "previews")
_SAMPLE_NAME = re.compile(r"^syn_\d{5}(?:_0000)?(?:\.nii\.gz|\.png)?$")
_MAX_PREVIEWS = 16


@dataclasses.dataclass
class SyntheticWriter:
    """Writes accepted samples under ``out`` and keeps ``manifest.csv`` in step with them.

    Attributes:
        out: The synthetic dataset folder (``paths.synthetic``).
        settings: The generate settings (formats, DICOM options, first seed).
        label_names: The dataset's label names, background first.
        vocabulary: The model's attributes; only these are recorded (all, when empty).
        common: Columns every row shares (checkpoint, sampler, ...).
        previews_wanted: Whether PNG previews are written (2D samples with ``png`` among the formats).
        rows: The manifest rows of the complete samples.
        previews: Preview columns of the first samples, for ``samples.png``.
        privacy: The generator's DP guarantee in one line, written into DICOM files (``None``: trained without DP).
        uid_seed: The set's identity (the settings fingerprint :meth:`resume` records); each sample's DICOM
            UIDs are derived from it and the sample id, so the same set written again has the same UIDs.
    """

    out: Path
    settings: GenerateSettings
    label_names: list[str]
    vocabulary: Mapping[str, Sequence[str]]
    common: dict[str, Any]
    previews_wanted: bool
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    previews: list[list[np.ndarray]] = dataclasses.field(default_factory=list)
    privacy: str | None = None
    uid_seed: str | None = None

    @property
    def manifest(self) -> Path:
        return self.out / "manifest.csv"

    def resume(self, fingerprint: str, *, run_id: str = "") -> int:
        """Keep the complete, unchanged samples of an earlier run with the same ``fingerprint``, and
        record the fingerprint and this run in ``generate.json``.

        Args:
            fingerprint: :func:`medsynth.stages.generate.settings_fingerprint` of this run.
            run_id: This generate run's MLflow id (``""`` without tracking).

        Returns:
            How many samples are done already.
        """
        self.rows = done_rows(self.out, fingerprint)
        self.uid_seed = fingerprint
        if self.rows:
            log.info("generate: continuing after %d samples already in %s", len(self.rows), self.manifest)
            if self.previews_wanted:
                self.previews = self._kept_previews()
        write_json(self.out / "generate.json", {"fingerprint": fingerprint, "run_id": run_id})
        write_manifest(self.manifest, self.rows)  # from here on, manifest.csv lists exactly the complete samples
        return len(self.rows)

    def _kept_previews(self) -> list[list[np.ndarray]]:
        """The previews of the samples an earlier run completed, for ``samples.png``, read back from their
        NIfTI files (written losslessly); without NIfTI output, the sheet shows this run's samples only."""
        previews: list[list[np.ndarray]] = []
        for row in self.rows[:_MAX_PREVIEWS]:
            if not (row.get("image") or row.get("label")) or "nifti" not in self.settings.formats:
                break
            image = load_nifti(self.out / row["image"])[0] if row.get("image") else None
            label = load_nifti(self.out / row["label"], dtype=np.uint8)[0] if row.get("label") else None
            previews.append(_preview(image, label))
        return previews

    def write_batch(self, accepted: Sequence[Accepted]) -> None:
        """Write a batch of accepted samples, then the manifest listing them.

        Raises:
            MedsynthError: When the disk is full (the manifest then lists the complete samples before the batch).
        """
        done = len(self.rows)
        try:
            for cand, image, label, verdict in accepted:
                sample_id = f"syn_{len(self.rows):05d}"
                preview = _preview(image, label) if self.previews_wanted else None
                row = self._write_sample(sample_id, image, label, cand, preview=preview)
                self.rows.append({**self.common, **row, **verdict, "attributes": self._attributes(cand)})
                if preview is not None and len(self.previews) < _MAX_PREVIEWS:
                    self.previews.append(preview)
            write_manifest(self.manifest, self.rows)
        except OSError as err:
            del self.rows[done:]
            write_manifest(self.manifest, self.rows)
            if err.errno == errno.ENOSPC:
                raise MedsynthError(
                    f"disk full while writing to {self.out}: {done} complete samples are listed in manifest.csv; "
                    "free space and rerun to continue"
                ) from None
            raise

    def finish(self, *, modality: str) -> Path | None:
        """Write ``dataset.json`` (with NIfTI output) and ``samples.png`` (when previews were made).

        Returns:
            The path of ``samples.png``, or ``None``.
        """
        if "nifti" in self.settings.formats:
            write_dataset_json(self.out, label_names=self.label_names, num_training=len(self.rows), modality=modality)
        self._remove_stale()
        if not self.previews:
            return None
        return save_png(self.out / "samples.png", picture_sheet(self.previews, titles=["label", "synthetic"]))

    def _remove_stale(self) -> None:
        """Delete sample files an earlier run left here that the manifest does not list (a larger
        earlier run, other formats), so the folder holds exactly the listed set. Only generate's own
        sample names in its own subfolders are touched."""
        listed = {r[k] for r in self.rows for k in _FILE_COLUMNS if r.get(k)}
        stale = []
        for sub in _SAMPLE_FOLDERS:
            for path in sorted((self.out / sub).glob("*")) if (self.out / sub).is_dir() else []:
                relative = path.relative_to(self.out).as_posix()
                if _SAMPLE_NAME.match(path.name) and not any(
                    name == relative or name.startswith(relative + "/") for name in listed
                ):
                    stale.append(path)
        for path in stale:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        if "nifti" not in self.settings.formats and (self.out / "dataset.json").is_file():
            (self.out / "dataset.json").unlink()
            stale.append(self.out / "dataset.json")
        if not self.previews and (self.out / "samples.png").is_file():
            (self.out / "samples.png").unlink()
            stale.append(self.out / "samples.png")
        if stale:
            log.info("generate: removed %d files of an earlier run that %s does not list", len(stale), self.manifest)

    def _attributes(self, cand: Candidate) -> str:
        known = self.vocabulary
        return " ".join(f"{k}={v}" for k, v in sorted(cand.attributes.items()) if not known or k in known)

    def _write_sample(
        self,
        sample_id: str,
        image: np.ndarray | None,
        label: np.ndarray | None,
        cand: Candidate,
        *,
        preview: list[np.ndarray] | None,
    ) -> dict[str, Any]:
        """Write one sample in every requested format; returns its manifest row (files relative to ``out``)."""
        out, g = self.out, self.settings
        row: dict[str, Any] = {
            "sample_id": sample_id,
            "seed": cand.seed,
            "label_source": cand.label_source or ("generated" if label is not None else ""),
        }
        if "nifti" in g.formats:  # nnU-Net v2 raw layout
            if image is not None:
                row["image"] = (
                    save_nifti(out / "imagesTr" / f"{sample_id}_0000.nii.gz", image, cand.affine, dtype=np.float32)
                    .relative_to(out)
                    .as_posix()
                )
            if label is not None:
                row["label"] = (
                    save_nifti(out / "labelsTr" / f"{sample_id}.nii.gz", label, cand.affine, dtype=np.uint8)
                    .relative_to(out)
                    .as_posix()
                )
        if "dicom" in g.formats and image is not None:
            row.update(
                _write_dicom(
                    out,
                    sample_id,
                    image,
                    label,
                    cand,
                    settings=g,
                    label_names=self.label_names,
                    privacy=self.privacy,
                    uid_seed=f"{self.uid_seed}/{sample_id}" if self.uid_seed else None,
                )
            )
        if preview is not None:
            row["preview"] = save_png(out / "previews" / f"{sample_id}.png", picture_sheet([preview])).relative_to(out).as_posix()
        for column in _FILE_COLUMNS:
            if row.get(column):
                row[hash_column(column)] = path_sha256(out / row[column])
        return row


def _write_dicom(
    out: Path,
    sample_id: str,
    image: np.ndarray,
    label: np.ndarray | None,
    cand: Candidate,
    *,
    settings: GenerateSettings,
    label_names: list[str],
    privacy: str | None = None,
    uid_seed: str | None = None,
) -> dict[str, str]:
    """One sample as a DICOM image series (and a SEG of its label map); returns its manifest columns.
    With ``uid_seed`` (the set's identity and the sample id) the UIDs are derived from it, else random."""
    from medsynth.io.dicom_write import new_study, write_image_series, write_segmentation

    modality = settings.dicom.modality
    folder = out / "dicom" / sample_id
    files = write_image_series(
        image,
        cand.affine,
        folder / "image",
        sample_id=sample_id,
        modality=modality,
        study=new_study(sample_id, uid_seed=uid_seed),
        seed=cand.seed,
        series_description=f"medsynth synthetic {modality} {sample_id}",
        intensity_range=(float(settings.dicom.intensity_range[0]), float(settings.dicom.intensity_range[1]))
        if settings.dicom.intensity_range
        else None,
        privacy=privacy,
    )
    row = {"dicom_series": (folder / "image").relative_to(out).as_posix()}
    if label is not None:
        row["dicom_seg"] = (
            write_segmentation(label, files, folder / "seg.dcm", label_names=label_names, uid_seed=uid_seed)
            .relative_to(out)
            .as_posix()
        )
    return row


def _preview(image: np.ndarray | None, label: np.ndarray | None) -> list[np.ndarray]:
    """The label map (coloured) and the image of a 2D sample, a blank where one is missing."""
    blank = np.zeros((image if image is not None else label).shape, dtype=np.float32)  # type: ignore[union-attr]
    return [
        colorize_labels(display_slice(label if label is not None else blank.astype(np.uint8))),
        display_slice(image if image is not None else blank),
    ]


def done_rows(out: Path, fingerprint: str) -> list[dict[str, Any]]:
    """The leading rows of an earlier run with the same settings whose files all exist with their
    recorded SHA-256; ``[]`` otherwise. Generation continues after the last of them."""
    state, manifest = out / "generate.json", out / "manifest.csv"
    if not (state.is_file() and manifest.is_file()):
        return []
    try:
        if json.loads(state.read_text()).get("fingerprint") != fingerprint:
            return []
    except (ValueError, AttributeError):
        return []
    complete = []
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
            return []  # written by another medsynth version
        for row in reader:
            if not all(_unchanged(out, row[k], row.get(hash_column(k)) or "") for k in _FILE_COLUMNS if row.get(k)):
                break
            complete.append(row)
    return complete


def _unchanged(out: Path, name: str, sha256: str) -> bool:
    """Whether the file (or series folder) ``name`` under ``out`` exists with SHA-256 ``sha256``."""
    path = out / name
    return bool(sha256) and path.exists() and path_sha256(path) == sha256


def write_manifest(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``manifest.csv`` (:data:`MANIFEST_COLUMNS`) atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def write_dataset_json(out: Path, *, label_names: list[str], num_training: int, modality: str) -> Path:
    """nnU-Net v2's ``dataset.json`` for the ``imagesTr`` / ``labelsTr`` folders."""
    return write_json(
        out / "dataset.json",
        {
            "channel_names": {"0": modality},
            "labels": {name: value for value, name in enumerate(label_names)},
            "numTraining": num_training,
            "file_ending": ".nii.gz",
            "description": "medsynth synthetic dataset; synthetic/manifest.csv holds each sample's provenance",
        },
    )


def sample_bytes(
    formats: Sequence[str], *, image_size: Sequence[int], num_classes: int, image: bool, label: bool
) -> dict[str, int]:
    """The least disk space one sample takes in each format, for generate's free-space check.

    Lower bounds, so that a refusal is never wrong: DICOM is written uncompressed (16-bit pixels, a
    header per slice; a SEG holds at least one bit per voxel); gzip is assumed to shrink float32
    NIfTI images at most 4 times and label maps at most 64 times; PNG previews at most 4 times.

    Args:
        formats: ``generate.formats``.
        image_size: The generator's spatial size.
        num_classes: Label values including background.
        image: The sample has an image (not a label-map model).
        label: The sample has a label map (given or generated).

    Returns:
        ``{format: bytes}`` for each format that writes something for this sample.
    """
    voxels = int(np.prod([int(s) for s in image_size]))
    slices = int(image_size[-1]) if len(image_size) == 3 else 1
    header = 352  # a NIfTI-1 header; DICOM headers are larger
    out: dict[str, int] = {}
    if "nifti" in formats:
        out["nifti"] = (header + voxels if image else 0) + (header + voxels // 64 if label else 0)
    if "dicom" in formats and image:
        out["dicom"] = 2 * voxels + 1024 * slices + ((voxels * max(1, num_classes - 1)) // 8 + 1024 if label else 0)
    if "png" in formats and len(image_size) == 2:
        out["png"] = voxels // 4
    return {k: v for k, v in out.items() if v > 0}


def listed_samples(out: Path) -> int:
    """How many samples ``manifest.csv`` under ``out`` lists (0 without a readable one); read without hashing."""
    try:
        with (out / "manifest.csv").open(newline="") as fh:
            return sum(1 for _ in csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError):
        return 0


def dp_columns(record: Any) -> dict[str, Any]:
    """The manifest's DP columns for a generator's :class:`~medsynth.training.privacy.PrivacyRecord`
    (all empty for ``None``)."""
    if record is None:
        return {column: "" for column in DP_COLUMNS}
    return {
        "dp_epsilon": f"{record.epsilon:.6g}",
        "dp_delta": f"{record.delta:.6g}",
        "dp_accountant": record.accountant,
        "dp_noise_multiplier": f"{record.noise_multiplier:.6g}",
        "dp_sample_rate": f"{record.sample_rate:.6g}",
        "dp_max_grad_norm": f"{record.max_grad_norm:.6g}",
        "dp_steps": record.steps,
        "dp_unit": record.unit,
    }
