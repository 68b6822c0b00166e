"""Cases in, dataset out: the per-case cache, worker processes, patient splits, the manifest and the quarantine.

:func:`build_dataset` is the one path from a :class:`~medsynth.data.discovery.Discovery` (any
source) to ``manifest.json``, ``quarantine.json`` and the cached records.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsynth import ConfigError, MedsynthError
from medsynth.data.case import VolumeSettings, process_case
from medsynth.data.discovery import CaseSpec, Discovery, quarantine_entry
from medsynth.data.manifest import Manifest, Record, array_hash
from medsynth.data.parallel import process_pool, progress_bar
from medsynth.data.splits import block_splits, patient_splits
from medsynth.io import write_json

log = logging.getLogger("medsynth")


def _fingerprint(spec: CaseSpec, settings: VolumeSettings) -> str:
    """Hash of the case's input files (size, mtime), settings and attributes."""
    digest = hashlib.sha256()
    for path in (*spec.files, *([spec.label] if spec.label else [])):
        stat = os.stat(path)
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    digest.update(json.dumps([settings.as_dict(), dict(spec.attributes), dict(spec.source), spec.channel,
                              sorted(spec.segment_names.items()), spec.modality], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _cached(out_dir: Path, spec: CaseSpec, fingerprint: str) -> dict[str, Any] | None:
    """The result of an earlier run of this case if its fingerprint matches: its records if every
    record file still verifies, or the reason it was quarantined."""
    path = out_dir / "cases" / f"{spec.key}.json"
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if body.get("fingerprint") != fingerprint:
        return None
    if body.get("error"):
        return {"records": [], "error": body["error"], "file": body.get("file")}
    if not body.get("records"):
        return None
    for record in body["records"]:
        try:
            with np.load(out_dir / record["file"]) as npz:
                if array_hash(npz["image"], npz["label"]) != record["sha256"]:
                    return None
        except (OSError, KeyError, ValueError):
            return None
    return {"records": list(body["records"]), "error": None}


def assign_splits(records: Sequence[Record], *, spatial_dims: int, fractions: Mapping[str, float], block: int,
                  gap: int) -> list[Record]:
    """Give every record its split: whole patients per split, so no patient is in two splits.

    With few patients of unequal record counts, patients are placed so that each split's share of
    *records* nears its fraction (:func:`medsynth.data.splits.balance_records`), not only its share
    of patients. With fewer patients (with records) than splits that have a positive share: 3D
    records all go to train; 2D records are split in blocks of slices within each case, as the
    single-volume demo is (the splits then share patients, which is logged as a warning because
    privacy figures become optimistic). Gap slices are left out.

    Args:
        records: Records of every case, split still empty.
        spatial_dims: 2 or 3.
        fractions: Split shares.
        block: Slices per block in the fallback.
        gap: Slices dropped between blocks in the fallback.

    Returns:
        The records that stay, with their split.

    Raises:
        ConfigError: On bad fractions, or too few slices for the block fallback.
    """
    if not records:
        return []
    sizes: dict[str, int] = {}
    for r in records:
        sizes[r.case] = sizes.get(r.case, 0) + 1
    names = [n for n, share in fractions.items() if share > 0]
    try:
        by_patient = patient_splits(list(sizes), fractions=fractions, sizes=sizes)
    except ValueError as err:
        if "sum to 1" in str(err) or "non-negative" in str(err):
            raise ConfigError(f"data.splits.fractions: {err}") from None
        by_patient = None
    if by_patient is not None:
        return [dataclasses.replace(r, split=by_patient[r.case]) for r in records]
    if spatial_dims == 3:
        log.warning("preprocess: %d patient(s) cannot fill the splits %s: every volume goes to train", len(sizes), names)
        return [dataclasses.replace(r, split="train") for r in records]
    log.warning(
        "preprocess: %d patient(s) cannot fill the splits %s: slices are split in blocks within each case, so the "
        "splits share patients and privacy figures are optimistic", len(sizes), names)
    by_case: dict[str, list[Record]] = {}
    for r in records:
        by_case.setdefault(r.id.rsplit("_s", 1)[0], []).append(r)
    out = []
    for case_records in by_case.values():
        case_records.sort(key=lambda r: r.slice_index or 0)
        try:
            splits = block_splits(len(case_records), block=block, gap=gap, fractions=fractions)
        except ValueError as err:
            raise ConfigError(f"data.splits: {len(sizes)} patient(s) cannot fill the splits {names}, and in blocks "
                              f"within a case: {err}") from None
        out.extend(dataclasses.replace(r, split=s) for r, s in zip(case_records, splits) if s is not None)
    return out


def split_summary(records: Sequence[Record], *, fractions: Mapping[str, float]) -> dict[str, Any]:
    """What the splits achieved, for the manifest: records, patients and share of records per split.

    Args:
        records: The records with their splits.
        fractions: The configured shares (every split with a positive share is listed, even if empty).

    Returns:
        ``{"records": {split: n}, "patients": {split: n}, "record_shares": {split: share}}``, shares
        rounded to 4 decimals.
    """
    names = [n for n, share in fractions.items() if share > 0]
    counts = dict.fromkeys(names, 0)
    patients: dict[str, set[str]] = {n: set() for n in names}
    for r in records:
        counts[r.split] = counts.get(r.split, 0) + 1
        patients.setdefault(r.split, set()).add(r.case)
    total = sum(counts.values())
    return {"records": counts, "patients": {n: len(p) for n, p in patients.items()},
            "record_shares": {n: round(c / total, 4) if total else 0.0 for n, c in counts.items()}}


def build_dataset(
    discovery: Discovery,
    *,
    out_dir: str | os.PathLike[str],
    settings: VolumeSettings,
    fractions: Mapping[str, float] | None = None,
    block: int = 8,
    gap: int = 2,
    workers: int = 0,
    progress: bool = False,
    extra_settings: Mapping[str, Any] | None = None,
) -> Manifest:
    """Preprocess every discovered case into records, then write ``manifest.json`` and ``quarantine.json``.

    One case at a time is in memory per worker. A case whose input files (sizes, modification
    times) and settings are unchanged since the last run, and whose cached records still
    match their hashes, is reused without loading it. Cases that fail are added to the
    quarantine with a scrubbed reason; the others go on.

    Args:
        discovery: What to preprocess.
        out_dir: The data folder.
        settings: Preprocessing settings (``label_names`` is taken from the discovery).
        fractions: Split shares; default 70/10/20 train/validation/holdout.
        block: Slices per block when cases must be split in blocks.
        gap: Slices dropped between blocks.
        workers: Worker processes (0 or 1: in this process).
        progress: Show a progress bar.
        extra_settings: More provenance for the manifest's settings.

    Returns:
        The written manifest.

    Raises:
        MedsynthError: If no case makes it into the dataset, or the records cannot fill the splits (the
            quarantine is written first, and the message points to it).
    """
    out = Path(out_dir)
    settings = dataclasses.replace(settings, label_names=tuple(discovery.label_names))
    fractions = dict(fractions or {"train": 0.7, "validation": 0.1, "holdout": 0.2})
    quarantine = list(discovery.quarantine)
    failed: list[dict[str, str | None]] = []
    records: list[Record] = []
    todo: list[tuple[CaseSpec, str]] = []
    reused = 0
    cached: list[tuple[CaseSpec, str, dict[str, Any]]] = []
    for spec in discovery.cases:
        fingerprint = _fingerprint(spec, settings)
        earlier = _cached(out, spec, fingerprint)
        if earlier is not None:
            cached.append((spec, fingerprint, earlier))
        else:
            todo.append((spec, fingerprint))

    def finish(spec: CaseSpec, fingerprint: str, result: dict[str, Any], *, save: bool = True) -> None:
        if result["error"] is not None:
            index = result.get("file")
            where = spec.display
            if index == -1 and spec.label:
                where = discovery.show(spec.label)
            elif index is not None and index >= 0 and len(spec.files) > 1:
                where = discovery.show(spec.files[index])
            reason = discovery.scrubber.text(str(result["error"]))
            quarantine.append(quarantine_entry(where, spec.source.get("series") or spec.key, reason))
            failed.append(quarantine[-1])
            if save:
                write_json(out / "cases" / f"{spec.key}.json", {"fingerprint": fingerprint, "error": reason, "file": index})
            return
        records.extend(Record(**r) for r in result["records"])
        if save:
            write_json(out / "cases" / f"{spec.key}.json", {"fingerprint": fingerprint, "records": result["records"]})

    for spec, fingerprint, earlier in cached:
        finish(spec, fingerprint, earlier, save=False)
        reused += 1

    bar = progress_bar(len(todo), "cases", enabled=progress)
    try:
        if workers > 1 and len(todo) > 1:
            with process_pool(workers) as pool:
                futures = {pool.submit(process_case, spec, settings, str(out)): (spec, fp) for spec, fp in todo}
                for future in concurrent.futures.as_completed(futures):
                    spec, fp = futures[future]
                    finish(spec, fp, future.result())
                    bar.update(1)
        else:
            for spec, fp in todo:
                finish(spec, fp, process_case(spec, settings, str(out)))
                bar.update(1)
    finally:
        bar.close()

    # the quarantine is written before anything else can fail, so a failed run still says why items were skipped
    quarantine_path = write_json(out / "quarantine.json", {"count": len(quarantine), "items": quarantine})
    log.info("preprocess: %d case(s): %d preprocessed, %d reused from the cache; %d item(s) quarantined -> %s",
             len(discovery.cases), len(todo), reused, len(quarantine), quarantine_path)
    if not records:
        if len(discovery.cases) == 1 and failed:  # one case (a NIfTI pair, a single series): say why here
            raise MedsynthError(f"{failed[0]['file']}: {failed[0]['reason']} (no case made it into the dataset; "
                                f"see {quarantine_path})")
        raise MedsynthError(f"no case made it into the dataset; see {quarantine_path} for why each item was skipped")
    try:
        records = assign_splits(sorted(records, key=lambda r: r.id), spatial_dims=settings.spatial_dims,
                                fractions=fractions, block=block, gap=gap)
    except MedsynthError as err:
        skipped = f"{len(quarantine)} item(s) were skipped, {quarantine_path} says why" if quarantine else \
            f"no item was skipped ({quarantine_path})"
        raise type(err)(f"{err} ({len(records)} record(s) from {len({r.case for r in records})} case(s) made it; "
                        f"{skipped})") from None
    summary = split_summary(records, fractions=fractions)
    log.info("preprocess: splits %s", ", ".join(
        f"{name} {summary['patients'][name]} patient(s) {n} record(s) ({summary['record_shares'][name]:.0%})"
        for name, n in summary["records"].items()))
    keys = {spec.key for spec in discovery.cases}
    manifest = Manifest(
        root=out, spatial_dims=settings.spatial_dims, label_names=list(discovery.label_names), records=records,
        settings={
            "source": discovery.source, **settings.as_dict(), "splits": {"fractions": fractions, "block": block, "gap": gap, **summary},
            "cases": len({r.case for r in records}), "quarantined": len(quarantine), **dict(extra_settings or {}),
        },
    )
    manifest.write()
    # records/ holds exactly what the manifest lists; a case that lost gap slices is preprocessed again next time
    remove_stale_records(out, {r.file for r in records})
    for stale in (out / "cases").glob("*.json"):
        if stale.stem not in keys:
            stale.unlink()
    return manifest


def remove_stale_records(out_dir: str | os.PathLike[str], keep: set[str]) -> None:
    """Delete cached records (``records/*.npz``) that the manifest does not list: an earlier run's, or gap slices.

    Args:
        out_dir: The data folder.
        keep: Record files to keep, relative to ``out_dir`` (``records/<id>.npz``).
    """
    for path in (Path(out_dir) / "records").glob("*.npz"):
        if f"records/{path.name}" not in keep:
            path.unlink()
