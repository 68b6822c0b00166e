"""The DICOM export through the real preprocess stage: dataset, quarantine, and no identifier anywhere.

Every written file of the test export carries distinctive values in the attributes the DICOM Basic
Application Level Confidentiality Profile removes (tests/dicom_corpus.py); folders and files are
named by identifiers as PACS exports are. After ``medsynth.preprocess`` every byte under
``paths.output``, the MLflow store (database and artifacts), the log records and stderr are searched
for each of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from medsynth.data import read_manifest
from medsynth.data.deid import SALT_ENV, Scrubber, load_salt, pseudonym
from tests.conftest import compose_config, run_stage
from tests.dicom_corpus import PLANTED_PATIENTS, UID_ROOT, build_corpus, planted_identity, planted_values


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root)}|{path.stat().st_mtime_ns}|".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def find_values(places: list[Path], texts: list[str], values: list[str]) -> dict[str, list[str]]:
    """Where each value occurs (case-insensitively) in the files under ``places`` and in ``texts``."""
    needles = {v: v.lower().encode() for v in values}
    found: dict[str, list[str]] = {}
    blobs: list[tuple[str, bytes]] = [(f"text {i}", t.encode()) for i, t in enumerate(texts)]
    for place in places:
        files = [place] if place.is_file() else sorted(p for p in place.rglob("*") if p.is_file())
        blobs.extend((str(p), p.read_bytes()) for p in files)
    for where, blob in blobs:
        lowered = blob.lower()
        for value, needle in needles.items():
            if needle in lowered:
                found.setdefault(value, []).append(where)
    return found


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory: pytest.TempPathFactory):
    """The corpus preprocessed twice by the real stage, with logs and stderr captured."""
    tmp = tmp_path_factory.mktemp("deid")
    corpus = build_corpus(tmp / "export")
    before = _tree_digest(corpus.root)
    cfg = compose_config([
        "data=dicom", "data.labels=body", f"paths.input={corpus.root}", f"paths.output={tmp / 'out'}",
        f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "data.spacing=[0.5,0.5,2.0]", "data.size=[32,32]",
        "data.min_foreground=0.01", "progress=true",
    ])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root_logger, medsynth_logger = logging.getLogger(), logging.getLogger("medsynth")
    old_levels = root_logger.level, medsynth_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    medsynth_logger.setLevel(logging.DEBUG)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            first = run_stage("preprocess", cfg)
            second = run_stage("preprocess", cfg)
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(old_levels[0])
        medsynth_logger.setLevel(old_levels[1])
    return {
        "corpus": corpus, "cfg": cfg, "tmp": tmp, "first": first, "second": second, "log": stream.getvalue(),
        "stderr": stderr.getvalue(), "before": before, "after": _tree_digest(corpus.root),
    }


def test_every_valid_series_is_in_the_dataset(preprocessed) -> None:
    """The 11 clean series (single-frame, multi-frame in four syntaxes, JPEG, JPEG 2000, split across folders) are all in."""
    manifest = read_manifest(preprocessed["cfg"].paths.data)
    series = {r.source["series"] for r in manifest.records}
    assert len(series) == len(preprocessed["corpus"].valid), sorted(series)
    assert all(r.source["format"] == "dicom" for r in manifest.records)


def test_every_broken_item_is_quarantined_with_a_reason(preprocessed) -> None:
    """Each broken item appears in quarantine.json with a reason a person understands."""
    body = json.loads((Path(preprocessed["cfg"].paths.data) / "quarantine.json").read_text())
    reasons = [item["reason"] for item in body["items"]]
    assert body["count"] == len(reasons)
    for item, words in preprocessed["corpus"].broken.items():
        assert any(words in r for r in reasons), f"{item}: no reason containing {words!r} in {reasons}"
    assert all(set(item) == {"file", "series", "reason"} for item in body["items"])
    jpeg_xl = next(r for r in reasons if "JPEG XL" in r)
    assert "1.2.840.10008.1.2.4.112" in jpeg_xl


def test_patients_never_share_splits_and_ids_are_stable(preprocessed) -> None:
    """No patient in two splits; the rerun reused every case and gave the same records."""
    first, second = preprocessed["first"], preprocessed["second"]
    splits: dict[str, set[str]] = {}
    for r in first.records:
        splits.setdefault(r.case, set()).add(r.split)
    assert all(len(s) == 1 for s in splits.values())
    assert set(first.counts()) == {"train", "validation", "holdout"}
    assert [(r.id, r.sha256, r.split) for r in second.records] == [(r.id, r.sha256, r.split) for r in first.records]
    assert "0 preprocessed" in preprocessed["log"]
    assert "preprocess: cases" in preprocessed["stderr"]  # the progress bar was shown


def test_inputs_are_never_modified(preprocessed) -> None:
    assert preprocessed["after"] == preprocessed["before"]


def test_no_identifier_leaves_preprocessing(preprocessed) -> None:
    """No planted value is in any file under paths.output, the MLflow store, the log or stderr."""
    tmp = preprocessed["tmp"]
    places = [tmp / "out", tmp / "mlflow.db", tmp / "mlartifacts"]
    assert (tmp / "mlflow.db").is_file() and (tmp / "mlartifacts").is_dir()
    values = [*planted_values(), UID_ROOT, "QZX"]
    texts = [preprocessed["log"], preprocessed["stderr"]]
    assert preprocessed["log"].count("preprocess:") >= 4
    assert find_values(places, texts, values) == {}


def test_the_search_can_fail(tmp_path: Path) -> None:
    """Control: the search finds a planted value written into a file, a binary file, or a log text."""
    identity = planted_identity(3)
    (tmp_path / "a.json").write_text(json.dumps({"x": identity["PatientName"]}))
    (tmp_path / "b.bin").write_bytes(os.urandom(100) + identity["StudyDate"].encode() + os.urandom(100))
    found = find_values([tmp_path], [f"log line {identity['AccessionNumber'].lower()}"], list(identity.values()))
    assert set(found) == {identity["PatientName"], identity["StudyDate"], identity["AccessionNumber"]}


def test_planted_values_cover_the_profile() -> None:
    """The corpus plants names, ids, dates, times, institution, physicians, UIDs, accession number and descriptions."""
    keys = set(planted_identity(1))
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate",
                    "ContentDate", "StudyTime", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
                    "PerformingPhysicianName", "OperatorsName", "StudyInstanceUID", "FrameOfReferenceUID",
                    "AccessionNumber", "StudyID", "StudyDescription", "SeriesDescription", "ImageComments"):
        assert keyword in keys
    assert len(set(planted_values())) > 30 * len(PLANTED_PATIENTS) // 2


# --- salt and pseudonyms ------------------------------------------------------------------


def test_processes_that_create_the_salt_at_once_read_one_whole_secret(tmp_path: Path) -> None:
    """Array tasks that start together on a fresh output folder: each reads the same 32 bytes, none an
    empty or partial file, and no temporary file is left behind."""
    import concurrent.futures
    import multiprocessing

    from medsynth.data.deid import secret_file

    path = tmp_path / "secret" / "salt"
    with concurrent.futures.ProcessPoolExecutor(6, mp_context=multiprocessing.get_context("fork")) as pool:
        secrets = list(pool.map(secret_file, [path] * 24))
    assert len(set(secrets)) == 1 and len(secrets[0]) == 32
    assert [p.name for p in path.parent.iterdir()] == ["salt"]


def test_salt_file_is_created_once_private(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(SALT_ENV, raising=False)
    path = tmp_path / "secret" / "salt"
    salt = load_salt(path)
    assert len(salt) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_salt(path) == salt
    monkeypatch.setenv(SALT_ENV, "from-the-environment")
    assert load_salt(path) == b"from-the-environment"


def test_pseudonyms_are_keyed(preprocessed) -> None:
    """The case id is the salted HMAC of PatientID: stable for the salt, different under another salt."""
    salt = load_salt(preprocessed["cfg"].data.deid.salt_file)
    expected = pseudonym(planted_identity(1)["PatientID"], salt, prefix="p", length=12)
    assert expected in {r.case for r in preprocessed["first"].records}
    assert pseudonym("QZXPID0001", b"another", prefix="p", length=12) != expected


def test_scrubber_paths_and_text() -> None:
    scrubber = Scrubber(b"s", ["DOE^JOHN", "DOE", "JOHN", "MRN12345"])
    assert scrubber.path("/x/export/PT0001/IM0001", "/x/export") == "PT0001/IM0001"
    assert scrubber.path("/x/export/PT000000", "/x/export").startswith("~")  # six digits may be a record number
    masked = scrubber.path("/x/export/john_doe/1.2.3.4.5.6.dcm", "/x/export")
    assert "john" not in masked.lower() and masked.endswith(".dcm") and "1.2.3" not in masked
    assert scrubber.text("cannot read MRN12345 of doe^john at 1.2.826.0.1.2") == "cannot read <removed> of <removed> at <removed>"
    assert scrubber.text("syntax 1.2.840.10008.1.2.4.112") == "syntax 1.2.840.10008.1.2.4.112"
