"""Cases in, dataset out: the per-case cache, worker processes, patient splits, the manifest and the quarantine.

:func:`build_dataset` is the one path from a :class:`~medsynth.data.discovery.Discovery` (any
source) to ``manifest.json``, ``quarantine.json`` and the cached records, in two halves:
:func:`preprocess_cases` (cases to cached records) and :func:`finish_dataset` (splits over all
records, manifest, quarantine). A large input can be cut into shards by patient, each run by its own
process (:func:`build_shard`, a SLURM array task), and the shards' results merged by
:func:`merge_shards`, which ends in the same :func:`finish_dataset`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsynth import ConfigError, MedsynthError
from medsynth.data.case import VolumeSettings, process_case
from medsynth.data.discovery import CaseSpec, Discovery, quarantine_entry
from medsynth.data.manifest import Manifest, Record, array_hash
from medsynth.data.parallel import process_pool, progress_bar
from medsynth.data.splits import block_splits, patient_splits, shard_of
from medsynth.io import write_json

log = logging.getLogger("medsynth")


def _fingerprint(spec: CaseSpec, settings: VolumeSettings) -> str:
    """Hash of the case's input files (size, mtime), settings and attributes."""
    digest = hashlib.sha256()
    for path in (*spec.files, *([spec.label] if spec.label else [])):
        stat = os.stat(path)
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    digest.update(
        json.dumps(
            [
                settings.as_dict(),
                dict(spec.attributes),
                dict(spec.source),
                spec.channel,
                sorted(spec.segment_names.items()),
                spec.modality,
            ],
            sort_keys=True,
            default=str,
        ).encode()
    )
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


def assign_splits(
    records: Sequence[Record], *, spatial_dims: int, fractions: Mapping[str, float], block: int, gap: int
) -> list[Record]:
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
        "splits share patients and privacy figures are optimistic",
        len(sizes),
        names,
    )
    by_case: dict[str, list[Record]] = {}
    for r in records:
        by_case.setdefault(r.id.rsplit("_s", 1)[0], []).append(r)
    out: list[Record] = []
    for case_records in by_case.values():
        case_records.sort(key=lambda r: r.slice_index or 0)
        try:
            splits = block_splits(len(case_records), block=block, gap=gap, fractions=fractions)
        except ValueError as err:
            raise ConfigError(
                f"data.splits: {len(sizes)} patient(s) cannot fill the splits {names}, and in blocks within a case: {err}"
            ) from None
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
    return {
        "records": counts,
        "patients": {n: len(p) for n, p in patients.items()},
        "record_shares": {n: round(c / total, 4) if total else 0.0 for n, c in counts.items()},
    }


@dataclasses.dataclass
class CaseOutcome:
    """What preprocessing one case gave.

    Attributes:
        fingerprint: The case's fingerprint (its input files' sizes and times, and the settings).
        records: Its records as plain dicts, split still empty (none when it failed).
        quarantine: Its ``quarantine.json`` item when it failed, else ``None``.
    """

    fingerprint: str
    records: list[dict[str, Any]]
    quarantine: dict[str, str | None] | None = None


@dataclasses.dataclass
class CaseResults:
    """The outcome of every case of a discovery, in the discovery's order, and how many were worked.

    Attributes:
        outcomes: Outcome per case key.
        processed: Cases preprocessed by this run.
        reused: Cases whose cached result was reused.
    """

    outcomes: dict[str, CaseOutcome]
    processed: int = 0
    reused: int = 0


def case_settings(discovery: Discovery, settings: VolumeSettings) -> VolumeSettings:
    """The settings each case of ``discovery`` is preprocessed with: ``settings`` with the discovery's label names."""
    return dataclasses.replace(settings, label_names=tuple(discovery.label_names))


def preprocess_cases(
    discovery: Discovery,
    *,
    out_dir: str | os.PathLike[str],
    settings: VolumeSettings,
    workers: int = 0,
    progress: bool = False,
) -> CaseResults:
    """Preprocess every discovered case into cached records (``records/``, ``cases/<key>.json``); no splits yet.

    One case at a time is in memory per worker. A case whose input files (sizes, modification
    times) and settings are unchanged since the last run, and whose cached records still
    match their hashes, is reused without loading it. A case that fails gets a quarantine item with
    a scrubbed reason; the others go on. Nothing is deleted: what is stale is only known once every
    case is (:func:`finish_dataset`).

    Args:
        discovery: What to preprocess.
        out_dir: The data folder.
        settings: Preprocessing settings (``label_names`` is taken from the discovery).
        workers: Worker processes (0 or 1: in this process).
        progress: Show a progress bar.

    Returns:
        The outcome of each case, in the discovery's order.
    """
    out = Path(out_dir)
    settings = case_settings(discovery, settings)
    done: dict[str, CaseOutcome] = {}
    todo: list[tuple[CaseSpec, str]] = []
    for spec in discovery.cases:
        fingerprint = _fingerprint(spec, settings)
        earlier = _cached(out, spec, fingerprint)
        if earlier is not None:
            done[spec.key] = _outcome(discovery, spec, fingerprint, earlier)
        else:
            todo.append((spec, fingerprint))
    reused = len(done)

    def finish(spec: CaseSpec, fingerprint: str, result: dict[str, Any]) -> None:
        outcome = done[spec.key] = _outcome(discovery, spec, fingerprint, result)
        if outcome.quarantine is not None:
            body = {"fingerprint": fingerprint, "error": outcome.quarantine["reason"], "file": result.get("file")}
        else:
            body = {"fingerprint": fingerprint, "records": result["records"]}
        write_json(out / "cases" / f"{spec.key}.json", body)

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
    return CaseResults({spec.key: done[spec.key] for spec in discovery.cases}, processed=len(todo), reused=reused)


def _outcome(discovery: Discovery, spec: CaseSpec, fingerprint: str, result: Mapping[str, Any]) -> CaseOutcome:
    """A case's result (:func:`~medsynth.data.case.process_case`'s, or the cache's) as an outcome."""
    if result["error"] is None:
        return CaseOutcome(fingerprint, list(result["records"]))
    index = result.get("file")
    where = spec.display
    if index == -1 and spec.label:
        where = discovery.show(spec.label)
    elif index is not None and index >= 0 and len(spec.files) > 1:
        where = discovery.show(spec.files[index])
    reason = discovery.scrubber.text(str(result["error"]))
    return CaseOutcome(fingerprint, [], quarantine_entry(where, spec.source.get("series") or spec.key, reason))


def finish_dataset(
    discovery: Discovery,
    outcomes: Mapping[str, CaseOutcome],
    *,
    out_dir: str | os.PathLike[str],
    settings: VolumeSettings,
    fractions: Mapping[str, float] | None = None,
    block: int = 8,
    gap: int = 2,
    extra_settings: Mapping[str, Any] | None = None,
    worked: str = "",
) -> Manifest:
    """Assign splits to the records of every case at once, write ``quarantine.json`` and ``manifest.json``, and
    delete what the manifest no longer lists (records, ``cases/*.json`` of cases no longer discovered).

    The second half of :func:`build_dataset`, and all of a merge of shards (:func:`merge_shards`):
    splits depend on the whole set of records only, so they come out the same either way.

    Args:
        discovery: The whole input's discovery.
        outcomes: Outcome per case key, for every case of ``discovery``.
        out_dir: The data folder.
        settings: Preprocessing settings (``label_names`` is taken from the discovery).
        fractions: Split shares; default 70/10/20 train/validation/holdout.
        block: Slices per block when cases must be split in blocks.
        gap: Slices dropped between blocks.
        extra_settings: More provenance for the manifest's settings.
        worked: How the cases were worked, for the log (``3 preprocessed, 2 reused from the cache``).

    Returns:
        The written manifest.

    Raises:
        MedsynthError: If no case makes it into the dataset, or the records cannot fill the splits (the
            quarantine is written first, and the message points to it).
    """
    out = Path(out_dir)
    settings = case_settings(discovery, settings)
    fractions = dict(fractions or {"train": 0.7, "validation": 0.1, "holdout": 0.2})
    chosen = [outcomes[spec.key] for spec in discovery.cases]
    failed = [o.quarantine for o in chosen if o.quarantine is not None]
    quarantine = [*discovery.quarantine, *failed]
    records = [Record(**r) for o in chosen for r in o.records]
    # the quarantine is written before anything else can fail, so a failed run still says why items were skipped
    quarantine_path = write_json(out / "quarantine.json", {"count": len(quarantine), "items": quarantine})
    log.info(
        "preprocess: %d case(s)%s; %d item(s) quarantined -> %s",
        len(discovery.cases),
        f": {worked}" if worked else "",
        len(quarantine),
        quarantine_path,
    )
    if not records:
        if len(discovery.cases) == 1 and failed:  # one case (a NIfTI pair, a single series): say why here
            raise MedsynthError(
                f"{failed[0]['file']}: {failed[0]['reason']} (no case made it into the dataset; see {quarantine_path})"
            )
        raise MedsynthError(f"no case made it into the dataset; see {quarantine_path} for why each item was skipped")
    try:
        records = assign_splits(
            sorted(records, key=lambda r: r.id), spatial_dims=settings.spatial_dims, fractions=fractions, block=block, gap=gap
        )
    except MedsynthError as err:
        skipped = (
            f"{len(quarantine)} item(s) were skipped, {quarantine_path} says why"
            if quarantine
            else f"no item was skipped ({quarantine_path})"
        )
        raise type(err)(
            f"{err} ({len(records)} record(s) from {len({r.case for r in records})} case(s) made it; {skipped})"
        ) from None
    summary = split_summary(records, fractions=fractions)
    log.info(
        "preprocess: splits %s",
        ", ".join(
            f"{name} {summary['patients'][name]} patient(s) {n} record(s) ({summary['record_shares'][name]:.0%})"
            for name, n in summary["records"].items()
        ),
    )
    keys = {spec.key for spec in discovery.cases}
    manifest = Manifest(
        root=out,
        spatial_dims=settings.spatial_dims,
        label_names=list(discovery.label_names),
        records=records,
        settings={
            "source": discovery.source,
            **settings.as_dict(),
            "splits": {"fractions": fractions, "block": block, "gap": gap, **summary},
            "cases": len({r.case for r in records}),
            "quarantined": len(quarantine),
            **dict(extra_settings or {}),
        },
    )
    manifest.write()
    # records/ holds exactly what the manifest lists; a case that lost gap slices is preprocessed again next time
    remove_stale_records(out, {r.file for r in records})
    for stale in (out / "cases").glob("*.json"):
        if stale.stem not in keys:
            stale.unlink()
    return manifest


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

    :func:`preprocess_cases` (cached, optionally in workers), then :func:`finish_dataset` (splits,
    quarantine, manifest, stale files removed).

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
    results = preprocess_cases(discovery, out_dir=out_dir, settings=settings, workers=workers, progress=progress)
    return finish_dataset(
        discovery,
        results.outcomes,
        out_dir=out_dir,
        settings=settings,
        fractions=fractions,
        block=block,
        gap=gap,
        extra_settings=extra_settings,
        worked=f"{results.processed} preprocessed, {results.reused} reused from the cache",
    )


def remove_stale_records(out_dir: str | os.PathLike[str], keep: set[str]) -> None:
    """Delete cached records (``records/*.npz``) that the manifest does not list: an earlier run's, or gap slices.

    Args:
        out_dir: The data folder.
        keep: Record files to keep, relative to ``out_dir`` (``records/<id>.npz``).
    """
    for path in (Path(out_dir) / "records").glob("*.npz"):
        if f"records/{path.name}" not in keep:
            path.unlink()


# --- shards: one part of the input per process (a SLURM array task), merged into one manifest ------------------------

SHARDS_FOLDER = "shards"
"""Folder of the data folder holding one folder per shard (``shards/<K>-of-<N>/``)."""
SHARD_RESULT = "result.json"
"""A shard's result file, inside its folder."""
SHARD_VERSION = 1
_SHARD_FOLDER = re.compile(r"^(\d+)-of-(\d+)$")


@dataclasses.dataclass(frozen=True)
class ShardResult:
    """What one shard preprocessed (its result file holds the details).

    Attributes:
        path: The result file (``shards/<K>-of-<N>/result.json``).
        cases: Cases of the shard's patients.
        records: Records they gave.
        quarantined: Cases of the shard that failed (discovery's own quarantine is the merge's to report).
        processed: Cases preprocessed by this run.
        reused: Cases reused from the cache.
    """

    path: Path
    cases: int
    records: int
    quarantined: int
    processed: int
    reused: int


def shard_folder(out_dir: str | os.PathLike[str], index: int, count: int) -> Path:
    """The folder of shard ``index`` of ``count``: its result file, and its lock while it runs."""
    return Path(out_dir) / SHARDS_FOLDER / f"{index}-of-{count}"


def shard_folders(out_dir: str | os.PathLike[str]) -> dict[tuple[int, int], Path]:
    """Every shard folder under the data folder, by ``(index, count)``."""
    found = {}
    for path in sorted((Path(out_dir) / SHARDS_FOLDER).glob("*-of-*")):
        if path.is_dir() and (match := _SHARD_FOLDER.match(path.name)):
            found[int(match[1]), int(match[2])] = path
    return found


def shard_cases(discovery: Discovery, *, index: int, count: int) -> Discovery:
    """The part of ``discovery`` that shard ``index`` of ``count`` preprocesses: every case of its patients
    (:func:`~medsynth.data.splits.shard_of`); the label names and discovery's quarantine stay whole."""
    return dataclasses.replace(discovery, cases=[s for s in discovery.cases if shard_of(s.patient, count) == index])


def _settings_digest(discovery: Discovery, settings: VolumeSettings) -> str:
    """Hash of what turns a case into records: the source and the (case) settings."""
    body = json.dumps([discovery.source, case_settings(discovery, settings).as_dict()], sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def _discovery_digest(discovery: Discovery, fingerprints: Mapping[str, str]) -> str:
    """Hash of the whole input as discovery saw it: every case (key, patient, fingerprint), what it skipped, the
    label names. Independent of the order in which files were found."""
    cases = sorted([spec.key, spec.patient, fingerprints[spec.key]] for spec in discovery.cases)
    skipped = sorted(json.dumps(item, sort_keys=True) for item in discovery.quarantine)
    body = json.dumps([discovery.source, list(discovery.label_names), cases, skipped], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def _fingerprints(discovery: Discovery, settings: VolumeSettings) -> dict[str, str]:
    """The fingerprint of every case of ``discovery`` (its files' sizes and times, and the settings)."""
    settings = case_settings(discovery, settings)
    return {spec.key: _fingerprint(spec, settings) for spec in discovery.cases}


def build_shard(
    discovery: Discovery,
    *,
    out_dir: str | os.PathLike[str],
    settings: VolumeSettings,
    index: int,
    count: int,
    workers: int = 0,
    progress: bool = False,
) -> ShardResult:
    """Preprocess the cases of shard ``index`` of ``count`` and write its result file; no splits, no manifest.

    Any number of shards may run at once on one data folder: each writes only its own cases' records
    and ``cases/<key>.json`` and its own ``shards/<K>-of-<N>/result.json``, and deletes nothing. The
    result holds its cases' outcomes and hashes of the settings and of the whole discovery, which
    :func:`merge_shards` checks.

    Args:
        discovery: The whole input's discovery (every shard discovers all of it).
        out_dir: The data folder.
        settings: Preprocessing settings.
        index: This shard, 1 to ``count``.
        count: Number of shards.
        workers: Worker processes (0 or 1: in this process).
        progress: Show a progress bar.

    Returns:
        What the shard did, and where its result is.
    """
    if not 1 <= index <= count:
        raise ConfigError(f"data.shard must be K/N with 1 <= K <= N, got {index}/{count}")
    mine = shard_cases(discovery, index=index, count=count)
    results = preprocess_cases(mine, out_dir=out_dir, settings=settings, workers=workers, progress=progress)
    body = {
        "version": SHARD_VERSION,
        "shard": index,
        "count": count,
        "settings_sha256": _settings_digest(discovery, settings),
        "discovery_sha256": _discovery_digest(discovery, _fingerprints(discovery, settings)),
        "cases": {key: dataclasses.asdict(outcome) for key, outcome in results.outcomes.items()},
    }
    path = write_json(shard_folder(out_dir, index, count) / SHARD_RESULT, body)
    outcomes = results.outcomes.values()
    result = ShardResult(
        path,
        cases=len(mine.cases),
        records=sum(len(o.records) for o in outcomes),
        quarantined=sum(o.quarantine is not None for o in outcomes),
        processed=results.processed,
        reused=results.reused,
    )
    log.info(
        "preprocess: shard %d/%d: %d of %d case(s) (%d patient(s)): %d preprocessed, %d reused from the cache, "
        "%d failed; %d record(s) -> %s",
        index,
        count,
        result.cases,
        len(discovery.cases),
        len({s.patient for s in mine.cases}),
        result.processed,
        result.reused,
        result.quarantined,
        result.records,
        path,
    )
    return result


def shard_count(out_dir: str | os.PathLike[str]) -> int:
    """The number of shards whose results the data folder holds, for a merge that was not told it.

    Raises:
        MedsynthError: If it holds none, or results of several shard counts.
    """
    counts = sorted({n for (_, n), folder in shard_folders(out_dir).items() if (folder / SHARD_RESULT).is_file()})
    if not counts:
        raise MedsynthError(
            f"data.shard=merge: no shard results under {Path(out_dir) / SHARDS_FOLDER}: run "
            "`medsynth preprocess data.shard=K/N` for K = 1 to N first"
        )
    if len(counts) > 1:
        raise MedsynthError(
            f"data.shard=merge: {Path(out_dir) / SHARDS_FOLDER} holds results of "
            f"{' and '.join(map(str, counts))} shards: say which to merge with data.shard=merge/N"
        )
    return counts[0]


def merge_shards(
    discovery: Discovery,
    *,
    out_dir: str | os.PathLike[str],
    settings: VolumeSettings,
    count: int,
    fractions: Mapping[str, float] | None = None,
    block: int = 8,
    gap: int = 2,
    extra_settings: Mapping[str, Any] | None = None,
) -> Manifest:
    """Merge the results of shards 1 to ``count`` into the manifest one run over the whole input would write.

    Every shard's result must be there, made with the same settings (source and case settings), from the
    same input as ``discovery`` (every case of the shard's patients with unchanged files, the same items
    skipped and label names) and with its record files in place. Then :func:`finish_dataset` assigns the
    splits over all records at once and writes the manifest and the quarantine, exactly as
    :func:`build_dataset` does.

    Args:
        discovery: The whole input's discovery, made again by the merge.
        out_dir: The data folder the shards wrote.
        settings: Preprocessing settings; must be the shards'.
        count: Number of shards.
        fractions: Split shares; default 70/10/20 train/validation/holdout.
        block: Slices per block when cases must be split in blocks.
        gap: Slices dropped between blocks.
        extra_settings: More provenance for the manifest's settings.

    Returns:
        The written manifest.

    Raises:
        MedsynthError: One line naming every shard that is missing or does not fit and why; or what
            :func:`finish_dataset` raises.
    """
    out = Path(out_dir)
    digest = _settings_digest(discovery, settings)
    fingerprints = _fingerprints(discovery, settings)
    seen = _discovery_digest(discovery, fingerprints)
    by_shard: dict[int, dict[str, str]] = {index: {} for index in range(1, count + 1)}
    for spec in discovery.cases:
        by_shard[shard_of(spec.patient, count)][spec.key] = fingerprints[spec.key]
    outcomes: dict[str, CaseOutcome] = {}
    problems: dict[str, list[str]] = {}
    for index, expected in by_shard.items():
        label = f"{index}/{count}"
        found = _read_shard(out, index, count)
        problem = (
            found
            if isinstance(found, str)
            else _shard_problem(out, found, expected, settings_digest=digest, discovery_digest=seen)
        )
        if problem is not None:
            problems.setdefault(problem, []).append(label)
        elif not isinstance(found, str):
            outcomes.update(found.cases)
    if problems:
        listed = "; ".join(
            f"shard{'s' if len(labels) > 1 else ''} {_shown_labels(labels)}: {problem}" for problem, labels in problems.items()
        )
        raise MedsynthError(
            f"cannot merge {count} shard(s) in {out}: {listed}; rerun those with `medsynth preprocess "
            f"data.shard=K/{count}` and the merge's data settings, then merge again"
        )
    return finish_dataset(
        discovery,
        outcomes,
        out_dir=out,
        settings=settings,
        fractions=fractions,
        block=block,
        gap=gap,
        extra_settings=extra_settings,
        worked=f"merged from {count} shard(s)",
    )


def _shown_labels(labels: Sequence[str], most: int = 8) -> str:
    """``1/8, 3/8`` (at most ``most`` named, then how many more)."""
    more = f" and {len(labels) - most} more" if len(labels) > most else ""
    return ", ".join(labels[:most]) + more


@dataclasses.dataclass(frozen=True)
class _ShardFile:
    """A shard's result file as read back by the merge."""

    settings_sha256: str
    discovery_sha256: str
    cases: dict[str, CaseOutcome]


def _read_shard(out: Path, index: int, count: int) -> _ShardFile | str:
    """A shard's result, checked for shape and turned into outcomes; or what is wrong with it."""
    path = shard_folder(out, index, count) / SHARD_RESULT
    if not path.is_file():
        return "no result (it has not run, or not to its end)"
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        if body.get("version") != SHARD_VERSION or body.get("shard") != index or body.get("count") != count:
            return f"its result {path} is not shard {index} of {count}'s (version {SHARD_VERSION})"
        cases: dict[str, CaseOutcome] = {}
        for key, outcome in dict(body["cases"]).items():
            item = CaseOutcome(str(outcome["fingerprint"]), list(outcome["records"]), outcome.get("quarantine"))
            for record in item.records:
                Record(**record)  # every field there, none unknown
            if item.quarantine is not None and not isinstance(item.quarantine, dict):
                raise TypeError("a quarantine item is not a mapping")
            cases[str(key)] = item
        return _ShardFile(str(body["settings_sha256"]), str(body["discovery_sha256"]), cases)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"its result {path} cannot be read ({type(err).__name__}: {err})"


def _shard_problem(
    out: Path, found: _ShardFile, expected: Mapping[str, str], *, settings_digest: str, discovery_digest: str
) -> str | None:
    """Why a shard's result does not fit the merge's settings and input (``None``: it fits)."""
    if found.settings_sha256 != settings_digest:
        return "made with other data settings than the merge's"
    cases = found.cases
    added = len(set(expected) - set(cases))
    removed = len(set(cases) - set(expected))
    changed = sum(1 for key in set(expected) & set(cases) if cases[key].fingerprint != expected[key])
    if added or removed or changed:
        return f"out of date: the input changed since it ran ({added} case(s) added, {removed} gone, {changed} changed)"
    if found.discovery_sha256 != discovery_digest:
        return "made from another view of the input (the items discovery skipped, or the label names, differ)"
    for outcome in cases.values():
        for record in outcome.records:
            file = str(record["file"])
            if file != f"records/{Path(file).name}" or not (out / file).is_file():
                return f"its record file {file} is missing"
    return None
