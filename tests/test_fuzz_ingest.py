"""Hostile input files: a seeded sample of mutated DICOM, NIfTI and attributes CSVs is ingested without a crash,
a hang or a file lost, and headers that declare huge images are refused before anything is allocated.

The mutators and the harness are in :mod:`tests.fuzzing`; ``benchmarks/fuzz_ingest.py`` runs the full-size fuzz.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medsynth import ConfigError
from medsynth.data.case import CaseError, body_mask, check_grid
from medsynth.data.discovery import discover_dicom, read_attributes
from medsynth.io.dicom import read_header
from tests.fuzzing import (
    CSV_FAMILIES,
    DICOM_FAMILIES,
    FORMULAS,
    FUZZ_MAX_IMAGE_BYTES,
    NIFTI_FAMILIES,
    bad_reason,
    make_jobs,
    run_jobs,
    set_raw,
    summarise,
)

REPO = Path(__file__).resolve().parents[1]


def test_seeded_fuzz_sample_is_ingested_without_crash_hang_or_lost_file(tmp_path: Path) -> None:
    """~150 mutants (every family of every kind) each end in the dataset or the quarantine with a clean reason."""
    jobs = make_jobs(tmp_path, dicom=10 * len(DICOM_FAMILIES), nifti=6 * len(NIFTI_FAMILIES), csv=8 * len(CSV_FAMILIES),
                     seed=20261206)
    outcomes = run_jobs(jobs, timeout=20.0, log=tmp_path / "worker.log")
    assert len(outcomes) == len(jobs) >= 130
    failures = [(o.job.kind, o.job.family, o.job.note, o.outcome, o.reason) for o in outcomes if o.failed]
    assert failures == []
    by_kind = collections.Counter((o.job.kind, o.outcome) for o in outcomes)
    # the sample is neither all refused nor all accepted: the mutants keep some files usable
    for kind, good, bad in (("dicom", "dataset", "quarantine"), ("nifti", "dataset", "quarantine"),
                            ("csv", "accepted", "refused")):
        assert by_kind[kind, good] > 0 and by_kind[kind, bad] > 0, by_kind
    rows = {(r["kind"], r["family"]): r for r in summarise(outcomes)}
    assert {k for k, _ in rows} == {"dicom", "nifti", "csv"}
    assert rows["dicom", "huge_dims"]["in dataset"] == 0  # a declared size over the limit never gets in
    assert rows["nifti", "truncate"]["in dataset"] == 0
    assert all(r["crashes"] == r["hangs"] == r["other failures"] == 0 for r in rows.values())


def test_harness_reports_a_hang_and_a_crash(tmp_path: Path) -> None:
    """The harness itself can fail: a worker that never answers is a hang, one that dies is a crash."""
    from tests.fuzzing import Harness, Job

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.csv").write_text("case,class\nc1,a\n", encoding="utf-8")
    with Harness(timeout=3.0) as harness:
        assert harness.run(Job("csv", "structure", str(folder), "a.csv")).outcome == "accepted"
        assert harness.proc is not None
        os.kill(harness.proc.pid, signal.SIGSTOP)  # the worker stops answering
        assert harness.run(Job("csv", "structure", str(folder), "a.csv")).outcome == "hang"
        assert harness.run(Job("csv", "structure", str(folder), "a.csv")).outcome == "accepted"  # restarted
        os.kill(harness.proc.pid, signal.SIGKILL)  # the worker dies as a segfault would kill it
        died = harness.run(Job("csv", "structure", str(folder), "a.csv"))
        assert died.outcome == "crash" and "worker died" in died.reason
        assert harness.run(Job("csv", "structure", str(folder), "a.csv")).outcome == "accepted"
        assert harness.restarts == 2


# --- huge declared images: refused before allocation --------------------------------------------


def _huge_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, edits in {
        "dicom_rows_columns": {"Rows": 65535, "Columns": 65535},
        "dicom_frames": {"Rows": 65535, "Columns": 65535, "NumberOfFrames": "2147483647"},
        "dicom_frames_only": {"NumberOfFrames": str(10**12)},
    }.items():
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        for keyword, value in edits.items():
            set_raw(ds, keyword, value)
        files[name] = folder / f"{name}.dcm"
        ds.save_as(files[name], enforce_file_format=False)
    # a damaged length field (4 GiB) on the first element a header read does not defer
    raw = bytearray(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    at = raw.index(b"\x08\x00\x05\x00CS")
    raw[at + 4:at + 8] = b"SQ\0\0"
    raw[at + 8:at + 8] = (0xFFFFFFF0).to_bytes(4, "little")
    files["dicom_length"] = folder / "dicom_length.dcm"
    files["dicom_length"].write_bytes(bytes(raw))
    for name, dims in {"nifti_3d": [3, 32767, 32767, 32767, 1, 1, 1, 1],
                       "nifti_7d": [7, 32767, 32767, 32767, 32767, 32767, 32767, 32767]}.items():
        img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
        header = np.frombuffer(img.to_bytes()[:348], dtype=nib.nifti1.header_dtype).copy()
        header["dim"] = dims
        files[name] = folder / f"{name}.nii"
        files[name].write_bytes(header.tobytes() + img.to_bytes()[348:])
    return files


def test_huge_declared_images_are_refused_before_allocation(tmp_path: Path) -> None:
    """Under the default size limit, in a process whose address space allows 256 MiB more than its imports,
    headers declaring gigapixel images are refused with a reason, fast, and without a MemoryError."""
    files = _huge_files(tmp_path / "huge")
    script = textwrap.dedent("""
        import json, resource, sys, time
        from medsynth.io.dicom import load_dicom_series, read_header
        from medsynth.io.nifti import load_nifti
        from medsynth import MedsynthError
        size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (size + 256 * 1024**2, resource.RLIM_INFINITY))
        out = {}
        for name, path in json.loads(sys.argv[1]).items():
            start = time.perf_counter()
            try:
                if name.startswith("dicom"):
                    header = read_header(path)
                    outcome = "header: " + (header.error or "ok")
                    load_dicom_series([path])
                else:
                    load_nifti(path)
                outcome = "loaded"
            except MedsynthError as err:
                outcome = str(err)
            except BaseException as err:
                outcome = "CRASH " + type(err).__name__
            out[name] = [outcome, time.perf_counter() - start]
        print(json.dumps(out))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps({k: str(v) for k, v in files.items()})],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (outcome, seconds) in results.items():
        assert seconds < 5.0, (name, seconds)
        assert "CRASH" not in outcome and outcome != "loaded", (name, outcome)
        assert "\n" not in outcome
    expected = {"dicom_length": "damaged", "dicom_frames_only": "NumberOfFrames is 1000000000000; expected 1 to"}
    for name, (outcome, _) in results.items():
        assert expected.get(name, "data.max_image_gb); refused before reading the voxels") in outcome, (name, outcome)


def test_header_scan_reads_a_damaged_length_without_allocating_it(tmp_path: Path) -> None:
    """A 4 GiB length on an element the header scan reads (not deferred) gives a reason, not a MemoryError."""
    path = _huge_files(tmp_path)["dicom_length"]
    header = read_header(path)
    assert header.kind is None and header.error


# --- reasons never carry header values ------------------------------------------------------------


def test_damaged_sop_class_is_not_shown_in_reasons(tmp_path: Path) -> None:
    """A SOP Class UID holding other header text (a damaged file) is reported as unknown, never verbatim."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    set_raw(ds, "SOPClassUID", "QZXSECRET^NAME 19230911")
    del ds.PixelData
    del ds.Rows
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "x.dcm", enforce_file_format=False)
    header = read_header(tmp_path / "in" / "x.dcm")
    assert header.sop_class == ""
    discovery = discover_dicom(tmp_path / "in", salt=b"s")
    reasons = [item["reason"] for item in discovery.quarantine]
    assert reasons and all("QZX" not in r and "19230911" not in r for r in reasons)
    assert all(bad_reason(r) is None for r in reasons)


# --- NIfTI values that used to escape the quarantine ------------------------------------------------


def test_body_mask_of_denormal_intensities() -> None:
    """A scaling slope of 1e-45 makes voxel values denormal: the body mask still finds the bright part."""
    volume = np.zeros((8, 8, 8), np.float32)
    volume[2:6, 2:6, 2:6] = 500
    mask = body_mask(volume * np.float32(1e-45), modality="MR")
    assert mask.sum() == 64


def test_check_grid_counts_the_working_set_of_resampling() -> None:
    """Large declared voxel sizes make a small image huge once resampled: held to the limit with the working set
    of preprocessing (8 float32 values per resampled voxel), so 101 MB of resampled image is refused at 256 MiB."""
    shape = (24, 28, 20)
    check_grid(shape, np.diag([2.0, 2.0, 2.0, 1.0]), spacing=(1.0, 1.0, 1.0), max_bytes=FUZZ_MAX_IMAGE_BYTES)
    with pytest.raises(CaseError, match="refused before reading the voxels") as caught:
        check_grid(shape, np.diag([2.0, 512.0, 2.0, 1.0]), spacing=(1.0, 1.0, 1.0), max_bytes=FUZZ_MAX_IMAGE_BYTES)
    assert "25341225 voxels" in str(caught.value)  # 47 x 13825 x 39
    with pytest.raises(CaseError, match="too large to resample"):
        check_grid(shape, np.diag([1e300, 1e300, 1.0, 1.0]), spacing=(1.0, 1.0, 1.0), max_bytes=FUZZ_MAX_IMAGE_BYTES)
    with pytest.raises(CaseError, match="affine"):
        check_grid(shape, np.diag([1.0, 1.0, np.nan, 1.0]), spacing=(1.0, 1.0, 1.0), max_bytes=FUZZ_MAX_IMAGE_BYTES)


# --- attributes CSVs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*FORMULAS, ""])
def test_formula_column_names_are_refused_in_one_line(tmp_path: Path, name: str) -> None:
    path = tmp_path / "attributes.csv"
    path.write_text("case,class,\"" + name.replace('"', '""') + "\"\nc1,a,b\n", encoding="utf-8")
    columns = ["class", name] if name == "" else None
    with pytest.raises(ConfigError) as caught:
        read_attributes(path, key="case", columns=columns)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert "formula" in message


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252", "utf-16-le", "shift_jis"])
def test_wrong_encodings_are_refused_naming_file_and_line(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "attributes.csv"
    text = "case,class\nc1,a\nc2,caf\u00e9\n" if encoding != "shift_jis" else "case,class\nc1,a\nc2,\u65e5\u672c\n"
    path.write_bytes(text.encode(encoding))
    with pytest.raises(ConfigError) as caught:
        read_attributes(path, key="case")
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "line" in message


def test_formula_values_never_start_an_attributes_cell(tmp_path: Path) -> None:
    """Values may hold formula text (they are data), but the manifest cell starts with a checked column name."""
    path = tmp_path / "attributes.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case", "class", "age"])
        writer.writerows([f"c{i}", value, value[:2]] for i, value in enumerate(FORMULAS))
    table = read_attributes(path, key="case")
    assert len(table) == len(FORMULAS)
    assert table["c0"]["class"] == "=1+2"
    for values in table.values():
        cell = " ".join(f"{k}={v}" for k, v in sorted(values.items()))
        assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r")


def test_utf16_with_bom_is_read(tmp_path: Path) -> None:
    path = tmp_path / "attributes.csv"
    path.write_bytes("case,class\nc1,caf\u00e9\n".encode("utf-16"))
    assert read_attributes(path, key="case") == {"c1": {"class": "caf\u00e9"}}

