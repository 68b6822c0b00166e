"""The chain of custody of a synthetic set: which files it is, what made them, and whether they changed.

generate records the SHA-256 of every file it writes in ``synthetic/manifest.csv`` (a DICOM series
folder gets one hash over its files' names and hashes, :func:`folder_sha256`). evaluate checks the
folder against that manifest before any work (:func:`check_synthetic_folder`: nothing missing,
nothing changed, nothing extra) and writes what it verified into ``evaluation/metrics.json``
(:func:`provenance_record`). :func:`verify` later re-checks the folder on disk against that audit
record, so a set can be checked again right before it leaves the hospital (``medsynth verify PATH``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medsynth import MedsynthError

GENERATE_FILES = ("manifest.csv", "generate.json", "dataset.json", "samples.png")
"""Files generate writes at the top of the synthetic folder besides the samples the manifest lists."""

FILE_COLUMNS = ("image", "label", "dicom_series", "dicom_seg", "preview")
"""Columns of ``manifest.csv`` that name a sample's files (``dicom_series`` names a folder)."""

LINEAGE = "medsynth.lineage."
"""Prefix of the MLflow tags that name a stage run's inputs (run ids and hashes)."""

LINEAGE_FILE = "lineage.json"
"""File in the data folder that names the preprocess run that wrote the dataset."""

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def hash_column(column: str) -> str:
    """The manifest column holding the SHA-256 of file column ``column`` (``image`` -> ``image_sha256``)."""
    return f"{column}_sha256"


def file_sha256(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes.

    Args:
        path: The file.
        chunk: Bytes read at a time.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def combined_sha256(entries: Mapping[str, str]) -> str:
    """One SHA-256 over ``{relative name: sha256}`` pairs, in name order (a folder's hash)."""
    digest = hashlib.sha256()
    for name in sorted(entries):
        digest.update(f"{name}\t{entries[name]}\n".encode())
    return digest.hexdigest()


def folder_sha256(folder: str | os.PathLike[str]) -> str:
    """SHA-256 of a folder: of its files' relative names and SHA-256s, in name order.

    Args:
        folder: The folder (a DICOM series, for instance); files in subfolders count too.

    Returns:
        The hex digest.
    """
    folder = Path(folder)
    return combined_sha256({p.relative_to(folder).as_posix(): file_sha256(p) for p in _files_under(folder)})


def path_sha256(path: str | os.PathLike[str]) -> str:
    """:func:`file_sha256` of a file, :func:`folder_sha256` of a folder."""
    return folder_sha256(path) if Path(path).is_dir() else file_sha256(path)


def _files_under(folder: Path) -> list[Path]:
    """Every file (and link) below ``folder``, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _hash_all(folder: Path) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every file below ``folder``."""
    found = {}
    for path in _files_under(folder):
        try:
            found[path.relative_to(folder).as_posix()] = file_sha256(path)
        except OSError as err:
            raise MedsynthError(f"cannot read {path}: {err.strerror or err}") from None
    return found


def read_rows(manifest: Path) -> list[dict[str, str]]:
    """The rows of a synthetic ``manifest.csv``.

    Raises:
        MedsynthError: If there is no manifest.
    """
    if not manifest.is_file():
        raise MedsynthError(f"no synthetic manifest at {manifest}: run `medsynth generate` first")
    with open(manifest, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def shared_value(rows: Sequence[Mapping[str, str]], column: str, *, manifest: Path, what: str) -> str:
    """The one value every row has in ``column``.

    Args:
        rows: The manifest rows.
        column: The column.
        manifest: The manifest's path, for messages.
        what: What the column decides, for messages ("the generator to audit").

    Returns:
        The value.

    Raises:
        MedsynthError: If a row lacks it or the rows disagree.
    """
    values = {row.get(column) or "" for row in rows}
    if not rows or "" in values:
        raise MedsynthError(
            f"{manifest} has no {column} column for every sample, so {what} is unknown: "
            "generate the set again with `medsynth generate`"
        )
    if len(values) > 1:
        raise MedsynthError(
            f"{manifest} lists samples of {len(values)} different generators ({column}: "
            f"{sorted(values)[:3]}); audit one generator's set at a time"
        )
    return values.pop()


@dataclasses.dataclass(frozen=True)
class Custody:
    """A synthetic folder checked against its manifest.

    Attributes:
        folder: The synthetic folder.
        manifest_sha256: SHA-256 of its ``manifest.csv``.
        files: ``{path relative to folder: sha256}`` of every file in it (manifest included).
        rows: The manifest's rows.
    """

    folder: Path
    manifest_sha256: str
    files: dict[str, str]
    rows: list[dict[str, str]]

    @property
    def manifest(self) -> Path:
        return self.folder / "manifest.csv"


def check_synthetic_folder(folder: str | os.PathLike[str]) -> Custody:
    """Check that ``folder`` holds exactly the files its ``manifest.csv`` lists, unchanged.

    Every file column of every row must name a file (or DICOM series folder) inside the folder
    whose SHA-256 is the one recorded beside it; every other file in the folder must be one that
    generate writes itself (:data:`GENERATE_FILES`).

    Args:
        folder: The synthetic folder (``paths.synthetic``).

    Returns:
        The checked folder with every file's hash.

    Raises:
        MedsynthError: One line naming the first missing, changed, unrecorded or extra file.
    """
    folder = Path(folder)
    manifest = folder / "manifest.csv"
    rows = read_rows(manifest)
    if not rows:
        raise MedsynthError(f"{manifest} lists no samples")
    on_disk = _hash_all(folder)
    listed: set[str] = set()
    folders: list[str] = []
    for row in rows:
        for column in FILE_COLUMNS:
            name = row.get(column) or ""
            if not name:
                continue
            where = f"{manifest} (sample {row.get('sample_id', '?')}, {column})"
            relative = _inside(folder, name, where=where)
            recorded = row.get(hash_column(column)) or ""
            if not _SHA256.match(recorded):
                raise MedsynthError(
                    f"{where} lists {name} without its SHA-256 ({hash_column(column)}): the set predates "
                    "file hashes or the manifest was edited; generate the set again"
                )
            path = folder / relative
            if not path.exists():
                raise MedsynthError(f"missing file: {path} is listed in {manifest} but not on disk")
            if path.is_dir():
                inside = {k[len(relative) + 1 :]: v for k, v in on_disk.items() if k.startswith(relative + "/")}
                actual = combined_sha256(inside)
                listed.update(f"{relative}/{k}" for k in inside)
                folders.append(relative)
            else:
                actual = on_disk.get(relative) or file_sha256(path)
                listed.add(relative)
            if actual != recorded:
                raise MedsynthError(
                    f"changed file: {path} has SHA-256 {actual[:16]}..., but {manifest} records "
                    f"{recorded[:16]}... for it: it was modified after generation"
                )
    for relative in on_disk:
        if relative not in listed and relative not in GENERATE_FILES:
            raise MedsynthError(
                f"extra file: {folder / relative} is not listed in {manifest}: remove it, or generate "
                "the set again into an empty folder"
            )
    return Custody(folder, on_disk["manifest.csv"], on_disk, rows)


def _inside(folder: Path, name: str, *, where: str) -> str:
    """``name`` as a normalised relative path inside ``folder``; refuses absolute paths and ``..``."""
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or not parts:
        raise MedsynthError(f"{where} names {name!r}, which is not a path inside {folder}")
    return Path(*parts).as_posix()


def provenance_record(
    custody: Custody,
    *,
    checkpoint_source: str,
    checkpoint_path: str | os.PathLike[str],
    checkpoint_sha256: str,
    data_manifest: str | os.PathLike[str],
    data_manifest_sha256: str,
    runs: Mapping[str, str],
    output: str | os.PathLike[str],
    audit_file: str | os.PathLike[str],
    registered_model: str = "",
) -> dict[str, Any]:
    """The ``provenance`` block of ``evaluation/metrics.json``: every hash the audit verified.

    Args:
        custody: The checked synthetic folder.
        checkpoint_source: The generator as the synthetic manifest names it (path, run id or ``models:/``).
        checkpoint_path: The local checkpoint file that was verified.
        checkpoint_sha256: Its SHA-256.
        data_manifest: Path of the dataset manifest the generator was trained on.
        data_manifest_sha256: Its SHA-256.
        runs: MLflow run ids by stage (``preprocess``, ``train``, ``generate``, ``evaluate``; unknown ones empty).
        output: The run's output folder (``paths.output``), so :func:`verify` finds the files in a moved copy.
        audit_file: Where this record is written (``evaluation/metrics.json``).
        registered_model: ``models:/NAME/VERSION`` of the audited generator, when it is a registered version.

    Returns:
        A JSON-ready mapping.
    """
    return {
        "checkpoint": {
            "source": checkpoint_source,
            "path": str(Path(checkpoint_path).resolve()),
            "sha256": checkpoint_sha256,
            "registered_model": registered_model,
        },
        "data_manifest": {"path": str(Path(data_manifest).resolve()), "sha256": data_manifest_sha256},
        "synthetic_folder": str(custody.folder.resolve()),
        "output": str(Path(output).resolve()),
        "audit_file": str(Path(audit_file).resolve()),
        "synthetic_manifest_sha256": custody.manifest_sha256,
        "runs": dict(runs),
        "files": dict(sorted(custody.files.items())),
    }


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """What :func:`verify` found.

    Attributes:
        passed: Whether the files on disk are the audited ones and the audit passed.
        reason: One line: why it failed, or what was checked.
        folder: The synthetic folder checked.
        audit: The ``metrics.json`` it was checked against.
    """

    passed: bool
    reason: str
    folder: Path
    audit: Path

    def __str__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}: {self.reason}"


def find_audit(path: str | os.PathLike[str], *, audit: str | os.PathLike[str] | None = None) -> tuple[Path, Path, dict[str, Any]]:
    """The synthetic folder and audit record that ``path`` (and ``audit``) name.

    Args:
        path: A run's output folder (holding ``synthetic/`` and ``evaluation/metrics.json``) or a
            synthetic folder (holding ``manifest.csv``; its audit is ``../evaluation/metrics.json``).
        audit: The audit's ``metrics.json``, when it is not where ``path`` implies.

    Returns:
        ``(synthetic folder, metrics.json, its provenance block)``.

    Raises:
        MedsynthError: If no audit with a provenance record is found.
    """
    path = Path(path)
    if not path.is_dir():
        raise MedsynthError(f"{path} is not a folder: give a run's output folder or its synthetic folder")
    if (path / "manifest.csv").is_file():
        folder, default = path, path.parent / "evaluation" / "metrics.json"
    else:
        folder, default = path / "synthetic", path / "evaluation" / "metrics.json"
    metrics = Path(audit) if audit is not None else default
    if not metrics.is_file():
        raise MedsynthError(
            f"no audit found for {path}: {metrics} does not exist; run `medsynth evaluate` first "
            "(or name the audit with --audit FILE)"
        )
    try:
        body = json.loads(metrics.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MedsynthError(f"cannot read the audit {metrics}: {err}") from None
    record = body.get("provenance") if isinstance(body, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict) or not record.get("synthetic_manifest_sha256"):
        raise MedsynthError(f"{metrics} has no provenance record (an audit from before file hashes): evaluate the set again")
    if not (folder / "manifest.csv").is_file() and Path(str(record.get("synthetic_folder", ""))).is_dir():
        folder = Path(record["synthetic_folder"])
    if not (folder / "manifest.csv").is_file():
        raise MedsynthError(
            f"no synthetic manifest at {folder / 'manifest.csv'}: give the synthetic folder that {metrics} audited"
        )
    return folder, metrics, body


def verify(path: str | os.PathLike[str], *, audit: str | os.PathLike[str] | None = None) -> VerifyResult:
    """Is the synthetic set at ``path`` exactly the one its audit checked, and did the audit pass?

    Re-hashes every file in the synthetic folder and compares with the audit's record in
    ``evaluation/metrics.json``: the manifest's hash, every recorded file's hash, and no file
    that the audit did not see. The generator's checkpoint and the dataset manifest are checked
    too where they are on this machine (in the run's folder, also after it was moved). Then it
    reads the audit's verdict: a set whose audit failed fails.

    Args:
        path: A run's output folder or its synthetic folder (see :func:`find_audit`).
        audit: The audit's ``metrics.json``, when it is not where ``path`` implies.

    Returns:
        The result; ``str(result)`` is ``PASS: ...`` or ``FAIL: <why, naming the file>``.

    Raises:
        MedsynthError: If no audit with a provenance record is found (a usage error, not a FAIL).
    """
    folder, metrics, body = find_audit(path, audit=audit)
    record = body["provenance"]
    recorded: dict[str, str] = {str(k): str(v) for k, v in record["files"].items()}

    def fail(reason: str) -> VerifyResult:
        return VerifyResult(False, reason, folder, metrics)

    manifest_sha = file_sha256(folder / "manifest.csv")
    if manifest_sha != record["synthetic_manifest_sha256"]:
        return fail(
            f"{folder / 'manifest.csv'} changed since the audit {metrics} (SHA-256 {manifest_sha[:16]}..., "
            f"audited {str(record['synthetic_manifest_sha256'])[:16]}...)"
        )
    on_disk = _hash_all(folder)
    for name, sha in recorded.items():
        if name not in on_disk:
            return fail(f"missing file: {folder / name} was audited but is not on disk")
        if on_disk[name] != sha:
            return fail(
                f"changed file: {folder / name} has SHA-256 {on_disk[name][:16]}..., the audit {metrics} recorded {sha[:16]}..."
            )
    for name in on_disk:
        if name not in recorded:
            return fail(f"extra file: {folder / name} was not in the audited set ({metrics})")
    unchecked: list[str] = []
    for what, key in (("checkpoint", "checkpoint"), ("dataset manifest", "data_manifest")):
        entry = record.get(key) if isinstance(record.get(key), dict) else {}
        assert entry is not None
        found = _relocated(str(entry.get("path", "")), record, metrics)
        if found is None:
            unchecked.append(what)
            continue
        actual = file_sha256(found)
        if actual != entry.get("sha256"):
            return fail(
                f"changed file: {found} (the audited {what}) has SHA-256 {actual[:16]}..., the audit "
                f"{metrics} recorded {str(entry.get('sha256'))[:16]}..."
            )
    verdict = body.get("verdict") if isinstance(body.get("verdict"), dict) else {}
    assert verdict is not None
    if verdict.get("passed") is not True:
        reasons = "; ".join(str(r) for r in verdict.get("reasons") or []) or "no passing verdict recorded"
        return fail(
            f"audit verdict was FAIL ({metrics}: {reasons}); the {len(recorded)} files are the audited ones, "
            "but this set must not be released"
        )
    note = f"; {' and '.join(unchecked)} not on this machine, not re-checked" if unchecked else ""
    return VerifyResult(
        True, f"{len(recorded)} files in {folder} are exactly the set audited in {metrics} (verdict PASS){note}", folder, metrics
    )


def _relocated(recorded: str, record: Mapping[str, Any], metrics: Path) -> Path | None:
    """Where a file the audit recorded (an absolute path) is now: at the same place relative to the
    run's output folder when the run folder was moved or copied, else where it was; ``None`` if neither exists."""
    if not recorded:
        return None
    path, output, audit_file = Path(recorded), str(record.get("output", "")), str(record.get("audit_file", ""))
    if output and audit_file:
        inside: Path | None
        audit_inside: Path | None
        try:
            inside, audit_inside = path.relative_to(output), Path(audit_file).relative_to(output)
        except ValueError:
            inside = audit_inside = None
        here = metrics.resolve()
        if inside is not None and audit_inside is not None and here.parts[-len(audit_inside.parts) :] == audit_inside.parts:
            moved = here.parents[len(audit_inside.parts) - 1] / inside
            if moved.is_file():
                return moved
    return path if path.is_file() else None


def write_data_lineage(data_dir: str | os.PathLike[str], *, preprocess_run_id: str, data_manifest_sha256: str) -> Path:
    """Record which preprocess run wrote the dataset (``data/lineage.json``), for train to read.

    Args:
        data_dir: The data folder.
        preprocess_run_id: The preprocess stage's MLflow run id (``""`` without tracking).
        data_manifest_sha256: SHA-256 of the ``manifest.json`` that run wrote.

    Returns:
        The file written.
    """
    from medsynth.io import write_json

    return write_json(
        Path(data_dir) / LINEAGE_FILE, {"preprocess_run_id": preprocess_run_id, "data_manifest_sha256": data_manifest_sha256}
    )


def preprocess_run_id(data_dir: str | os.PathLike[str], *, data_manifest_sha256: str) -> str:
    """The preprocess run that wrote the dataset, if ``data/lineage.json`` is about this manifest; else ``""``.

    Args:
        data_dir: The data folder.
        data_manifest_sha256: SHA-256 of its ``manifest.json`` now.

    Returns:
        The run id, or ``""`` when unknown.
    """
    path = Path(data_dir) / LINEAGE_FILE
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    if not isinstance(body, dict) or body.get("data_manifest_sha256") != data_manifest_sha256:
        return ""
    run_id = body.get("preprocess_run_id")
    return run_id if isinstance(run_id, str) and re.fullmatch(r"[0-9a-f]{32}", run_id) else ""


def checkpoint_facts(generator: Any) -> dict[str, str]:
    """What a loaded generator's checkpoint says about its inputs: ``run_id``, ``data_manifest_sha256``,
    ``preprocess_run_id`` (each ``""`` when the checkpoint does not say).

    A checkpoint is data: only plain strings of the expected form are taken.

    Args:
        generator: A :class:`medsynth.diffusion.generator.Generator` loaded from a checkpoint.

    Returns:
        The facts.
    """
    info: Mapping[str, Any] = dict(getattr(generator, "info", None) or {})
    if "data_manifest_sha256" not in info and getattr(generator, "checkpoint", None) is not None:
        import torch

        try:
            state = torch.load(generator.checkpoint, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # an old-format file cannot be mapped; read it whole
            state = torch.load(generator.checkpoint, map_location="cpu", weights_only=True)
        info = {**info, **{k: state[k] for k in ("run_id", "data_manifest_sha256", "lineage") if k in state}}
    lineage = info.get("lineage") if isinstance(info.get("lineage"), Mapping) else {}
    assert lineage is not None
    run_id, data_sha = info.get("run_id"), info.get("data_manifest_sha256")
    preprocess = lineage.get("preprocess_run_id")
    return {
        "run_id": run_id if isinstance(run_id, str) and re.fullmatch(r"[0-9a-f]{32}", run_id) else "",
        "data_manifest_sha256": data_sha if isinstance(data_sha, str) and _SHA256.match(data_sha) else "",
        "preprocess_run_id": preprocess if isinstance(preprocess, str) and re.fullmatch(r"[0-9a-f]{32}", preprocess) else "",
    }


__all__ = [
    "FILE_COLUMNS",
    "GENERATE_FILES",
    "LINEAGE",
    "Custody",
    "VerifyResult",
    "check_synthetic_folder",
    "checkpoint_facts",
    "combined_sha256",
    "file_sha256",
    "find_audit",
    "folder_sha256",
    "hash_column",
    "path_sha256",
    "preprocess_run_id",
    "provenance_record",
    "read_rows",
    "shared_value",
    "verify",
    "write_data_lineage",
]
