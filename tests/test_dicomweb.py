"""PACS over DICOMweb, against a real Orthanc: ingest (``data=dicomweb``) and push (``generate.push=dicomweb``).

Two Orthanc servers run on loopback with authentication on (tests/orthanc.py): a "clinical" one
holding the test corpus with its planted identifiers (tests/dicom_corpus.py), and an empty
"research" one that synthetic sets are pushed to. The tests check that an ingest through DICOMweb
gives the dataset the same files give from a folder, that no planted identifier and no password
reaches anything medsynth writes or logs, that an interrupted retrieval continues where it stopped,
that a pushed set reads back with its SEG pointing at its series and stays one copy when pushed
again, and that wrong credentials or a dead server end in one line. Without Orthanc (the binary or
its DICOMweb plugin) the server tests skip and say why; CI installs both (`make tools`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medsynth import MedsynthError
from medsynth.cli import user_errors
from medsynth.data.deid import load_salt
from medsynth.io import dicomweb
from medsynth.io.dicomweb import DicomwebServer, SearchFilters
from tests.conftest import TINY, compose_config, phantom_overrides, run_stage, write_phantom
from tests.dicom_corpus import UID_ROOT, build_corpus, planted_identity, planted_values
from tests.orthanc import Orthanc, OrthancUnavailable, free_port, start_orthanc
from tests.test_deid import find_values

ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD = "medsynth-test", "pacs-Secret-7391"
WRONG_PASSWORD = "Wrong-QZXPASS-5522"


# --- servers ------------------------------------------------------------------------------


@contextlib.contextmanager
def _server(folder: Path) -> Iterator[Orthanc]:
    try:
        server = start_orthanc(folder, user=USER, password=PASSWORD)
    except OrthancUnavailable as err:
        pytest.skip(f"no Orthanc to test against: {err}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, list[Path], Path]]:
    """The "clinical" PACS holding the test corpus: ``(server, files it accepted, corpus root)``."""
    tmp = tmp_path_factory.mktemp("pacs")
    corpus = build_corpus(tmp / "export")
    with _server(tmp / "orthanc") as server:
        files = sorted(p for p in corpus.root.rglob("*") if p.is_file())
        accepted = server.upload(files)
        assert len(accepted) >= len(files) - 4  # Orthanc refuses the DICOMDIR, the truncated file and the two non-DICOM files
        yield server, accepted, corpus.root


@pytest.fixture(scope="session")
def research_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """An empty "research" PACS that synthetic sets are pushed to."""
    with _server(tmp_path_factory.mktemp("research") / "orthanc") as server:
        yield server


@pytest.fixture(scope="module")
def credentials() -> Iterator[None]:
    """The right credentials in the environment, as a user sets them."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(dicomweb.USER_ENV, USER)
        mp.setenv(dicomweb.PASSWORD_ENV, PASSWORD)
        mp.delenv(dicomweb.TOKEN_ENV, raising=False)
        yield


def _settings(tmp: Path, name: str, *overrides: str):
    return compose_config([
        "data.labels=body", f"paths.output={tmp / name}", f"mlflow.tracking_uri=sqlite:///{tmp / name}-mlflow.db",
        "data.spacing=[0.5,0.5,2.0]", "data.size=[32,32]", "data.min_foreground=0.01", "progress=true",
        f"data.deid.salt_file={tmp / 'secret' / 'salt'}", *overrides,
    ])


def _records(manifest) -> list[tuple[str, str, str]]:
    return sorted((r.id, r.split, r.sha256) for r in manifest.records)


def _run_metrics(settings) -> dict[str, float]:
    """The metrics the preprocess run that wrote ``settings``' dataset logged."""
    from mlflow.tracking import MlflowClient

    run_id = json.loads((Path(settings.paths.data) / "lineage.json").read_text())["preprocess_run_id"]
    return MlflowClient(settings.mlflow.tracking_uri).get_run(run_id).data.metrics


@pytest.fixture(scope="module")
def ingested(pacs, credentials, tmp_path_factory: pytest.TempPathFactory):
    """The corpus ingested twice with the same salt: from the files Orthanc accepted, as a folder, and
    from Orthanc through ``data=dicomweb`` (log records and stderr of the latter captured)."""
    server, accepted, corpus_root = pacs
    tmp = tmp_path_factory.mktemp("ingest")
    export = tmp / "export"
    for path in accepted:
        target = export / path.relative_to(corpus_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    folder_cfg = _settings(tmp, "folder", "data=dicom", f"paths.input={export}")
    web_cfg = _settings(tmp, "web", "data=dicomweb", f"data.dicomweb.url={server.dicomweb}")
    folder = run_stage("preprocess", folder_cfg)
    stream, stderr = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.INFO)  # what the command line's log file receives
    root_logger = logging.getLogger()
    old_level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stderr(stderr):
            web = run_stage("preprocess", web_cfg)
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(old_level)
    return {"tmp": tmp, "server": server, "folder": folder, "web": web, "folder_cfg": folder_cfg, "web_cfg": web_cfg,
            "log": stream.getvalue(), "stderr": stderr.getvalue()}


# --- ingest -------------------------------------------------------------------------------


def test_dicomweb_ingest_equals_the_folder_ingest(ingested) -> None:
    """Same records (ids, splits, SHA-256) and the same quarantine reasons as the same files read from a folder."""
    folder, web = ingested["folder"], ingested["web"]
    assert len(folder.records) > 0
    assert _records(web) == _records(folder)
    assert web.label_names == folder.label_names
    reasons = [sorted(item["reason"] for item in json.loads((Path(cfg.paths.data) / "quarantine.json").read_text())["items"])
               for cfg in (ingested["folder_cfg"], ingested["web_cfg"])]
    assert reasons[0] == reasons[1]
    metrics = _run_metrics(ingested["web_cfg"])
    assert metrics["dicomweb_retrieved"] == metrics["dicomweb_instances"] > 100 and metrics["dicomweb_present"] == 0
    assert "dicomweb: retrieve:" in ingested["stderr"]  # the progress display


def test_no_identifier_or_password_leaves_the_dicomweb_ingest(ingested) -> None:
    """Nothing under paths.output, in the MLflow store (params, tags, metrics, artifacts), the log or stderr holds a
    planted value or the password; the retrieved files are gone after the ingest (data.dicomweb.keep=false)."""
    tmp, cfg = ingested["tmp"], ingested["web_cfg"]
    retrieved = Path(cfg.data.dicomweb.folder)
    assert retrieved.is_dir() and not [p for p in retrieved.iterdir() if not p.name.startswith(".")]
    places = [Path(cfg.paths.output), tmp / "web-mlflow.db", tmp / "mlartifacts"]
    assert all(place.exists() for place in places)
    values = [*planted_values(), UID_ROOT, "QZX", PASSWORD]
    assert find_values(places, [ingested["log"], ingested["stderr"]], values) == {}
    assert "preprocess: dicomweb:" in ingested["log"] and "retrieved" in ingested["log"]


def test_search_filters(pacs, credentials) -> None:
    """Accession list, study date range, study and series description and modality narrow the search."""
    server = DicomwebServer(pacs[0].dicomweb, key="data.dicomweb.url")

    def found(**filters: object) -> list[tuple[str, int]]:
        return sorted((s.modality, len(s.instances)) for s in server.search(SearchFilters(**filters)))

    one, two = planted_identity(1), planted_identity(2)
    # with a modality, the study search carries ModalitiesInStudy, and Orthanc then ignores `offset`: the paging
    # must stop when a page brings nothing new instead of asking for the same page forever
    # patient 1: the anatomical MR and its SEG; patient 2: the same scan split across folders
    assert found(accession_numbers=(one["AccessionNumber"], two["AccessionNumber"]), modality="MR") == [
        ("MR", 25), ("MR", 25), ("SEG", 1)]
    assert found(study_date=f"{one['StudyDate']}-{two['StudyDate']}") == [("MR", 25), ("MR", 25), ("SEG", 1)]
    assert found(study_description=planted_identity(3)["StudyDescription"]) == [("MR", 24)]
    assert found(series_description=planted_identity(1)["SeriesDescription"].lower()[:-1] + "?", modality="MR",
                 accession_numbers=(one["AccessionNumber"],)) == [("MR", 25), ("SEG", 1)]
    assert found(accession_numbers=("NO-SUCH-ACC",)) == []


class _CuttingProxy:
    """A loopback TCP proxy to ``port`` that closes the connection once it has relayed ``limit`` bytes of
    answers after the first WADO-RS series or instance request: a connection lost in mid-retrieval."""

    def __init__(self, port: int, limit: int) -> None:
        self.upstream, self.limit = port, limit
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.upstream))
                state = {"armed": False, "sent": 0}
                threading.Thread(target=self._pump, args=(client, server, state, True), daemon=True).start()
                threading.Thread(target=self._pump, args=(server, client, state, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, state: dict, requests_: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if requests_ and re.search(rb"GET /dicom-web/studies/[^ ?]+/series/[^ ?]+ HTTP", data):
                    state["armed"] = True
                if not requests_ and state["armed"]:
                    state["sent"] += len(data)
                    if state["sent"] > self.limit:
                        break
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()


def test_an_interrupted_retrieval_continues_where_it_stopped(pacs, credentials, ingested) -> None:
    """A connection lost mid-retrieval ends the stage in one line and leaves only whole files; the rerun retrieves
    only what is missing, and so does a run after some files were deleted; the dataset is the same."""
    server, tmp = pacs[0], ingested["tmp"]
    port = int(server.url.rsplit(":", 1)[1])
    proxy = _CuttingProxy(port, limit=300_000)
    try:
        cut = _settings(tmp, "resume", "data=dicomweb", f"data.dicomweb.url=http://127.0.0.1:{proxy.port}/dicom-web",
                        "data.dicomweb.keep=true", "progress=false")
        with pytest.raises(MedsynthError, match="broke off|closed the connection|connection was") as stopped:
            run_stage("preprocess", cut)
    finally:
        proxy.close()
    assert "rerun to continue" in str(stopped.value) and "\n" not in str(stopped.value)
    folder = Path(cut.data.dicomweb.folder)
    complete = sorted(folder.glob("s*/i*.dcm"))
    total = int(_run_metrics(ingested["web_cfg"])["dicomweb_instances"])
    assert 0 < len(complete) < total
    assert not [p for p in folder.rglob(".*") if ".tmp" in p.name]  # no half-written file left behind
    for path in complete:
        pydicom.dcmread(path, stop_before_pixels=True)  # every file under its final name is whole

    resumed_cfg = _settings(tmp, "resume", "data=dicomweb", f"data.dicomweb.url={server.dicomweb}",
                            "data.dicomweb.keep=true", "progress=false")
    resumed = run_stage("preprocess", resumed_cfg)
    metrics, full = _run_metrics(resumed_cfg), _run_metrics(ingested["web_cfg"])
    assert metrics["dicomweb_present"] == len(complete)
    assert metrics["dicomweb_retrieved"] == total - len(complete)
    assert metrics["dicomweb_bytes"] < full["dicomweb_bytes"]
    assert _records(resumed) == _records(ingested["folder"])

    by_series: dict[Path, list[Path]] = {}
    for path in sorted(folder.glob("s*/i*.dcm")):
        by_series.setdefault(path.parent, []).append(path)
    deleted = [files[-1] for files in sorted(by_series.values(), key=len)[-2:]] + [sorted(by_series.values(), key=len)[-1][0]]
    for path in deleted:
        path.unlink()
    again = run_stage("preprocess", resumed_cfg)
    metrics = _run_metrics(resumed_cfg)
    assert metrics["dicomweb_retrieved"] == len(deleted) and metrics["dicomweb_present"] == total - len(deleted)
    assert metrics["dicomweb_requests"] < full["dicomweb_requests"]
    assert all(path.is_file() for path in deleted)
    assert _records(again) == _records(ingested["folder"])

    # a narrower search: the files of the series it no longer finds are deleted, nothing is retrieved again
    narrowed = DicomwebServer(server.dicomweb, key="data.dicomweb.url")
    found = narrowed.search(SearchFilters(accession_numbers=(planted_identity(1)["AccessionNumber"],)))
    result = narrowed.retrieve(found, folder, salt=load_salt(resumed_cfg.data.deid.salt_file), max_bytes=10**9)
    assert (result.series, result.instances, result.present, result.retrieved) == (2, 26, 26, 0)
    assert result.removed == total - 26 and len(list(folder.glob("s*/i*.dcm"))) == 26


# --- push ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(research_pacs, credentials, tmp_path_factory: pytest.TempPathFactory):
    """A tiny model trained on the phantom, and a settings factory that generates DICOM and pushes to the research PACS."""
    tmp = tmp_path_factory.mktemp("push")
    image, label = write_phantom(tmp / "raw")

    def settings(*more: str):
        return compose_config([*TINY, *phantom_overrides(image, label), f"paths.output={tmp / 'out'}",
                               f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "generate.num_samples=2",
                               "generate.batch_size=2", "generate.formats=[nifti,dicom]", "generate.push=dicomweb",
                               f"generate.dicomweb.url={research_pacs.dicomweb}", *more])

    run_stage("preprocess", settings())
    run_stage("train", settings())
    return settings


def _dicom_set(synthetic_folder: Path) -> dict[str, dict[str, object]]:
    """Per sample: the image series' UIDs and the SEG's, from the files generate wrote."""
    import csv

    out = {}
    with open(synthetic_folder / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            series = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((synthetic_folder / row["dicom_series"]).glob("*.dcm"))]
            seg = pydicom.dcmread(synthetic_folder / row["dicom_seg"], stop_before_pixels=True)
            out[row["sample_id"]] = {"study": series[0].StudyInstanceUID, "series": series[0].SeriesInstanceUID,
                                     "instances": sorted(ds.SOPInstanceUID for ds in series),
                                     "seg_series": seg.SeriesInstanceUID, "seg": seg.SOPInstanceUID}
    return out


def test_push_reads_back_and_a_second_push_keeps_one_copy(synthetic, research_pacs, credentials) -> None:
    """The pushed series and SEGs are on the research PACS (QIDO, WADO), each SEG references its pushed series;
    pushing the set again, and pushing the same set generated afresh, leaves one copy of each instance."""
    settings = synthetic()
    run_stage("generate", settings)
    local = _dicom_set(Path(settings.paths.synthetic))
    server = DicomwebServer(research_pacs.dicomweb, key="generate.dicomweb.url")
    client = server._client
    stored = research_pacs.count_instances()
    assert stored == sum(len(s["instances"]) + 1 for s in local.values())
    for sample in local.values():
        on_server = client.search_for_instances(study_instance_uid=sample["study"], fields=["SeriesInstanceUID"])
        series = {}
        for item in on_server:
            series.setdefault(item["0020000E"]["Value"][0], set()).add(item["00080018"]["Value"][0])
        assert series == {sample["series"]: set(sample["instances"]), sample["seg_series"]: {sample["seg"]}}
        seg = client.retrieve_instance(sample["study"], sample["seg_series"], sample["seg"])
        referenced = seg.ReferencedSeriesSequence[0]
        assert referenced.SeriesInstanceUID == sample["series"]
        assert sorted(i.ReferencedSOPInstanceUID for i in referenced.ReferencedInstanceSequence) == sample["instances"]
        image = client.retrieve_instance(sample["study"], sample["series"], sample["instances"][0])
        assert image.PatientName.family_name == "SYNTHETIC" and "not a patient" in image.ImageComments

    run_stage("generate", settings)  # the set is complete: the rerun pushes it again
    assert research_pacs.count_instances() == stored

    fresh = synthetic(f"paths.synthetic={Path(settings.paths.output) / 'synthetic-again'}")
    run_stage("generate", fresh)  # the same set generated afresh: the same UIDs
    assert _dicom_set(Path(fresh.paths.synthetic)) == local
    assert research_pacs.count_instances() == stored


# --- errors -------------------------------------------------------------------------------


def _medsynth(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("MEDSYNTH_DEBUG", "HYDRA_FULL_ERROR", dicomweb.TOKEN_ENV, dicomweb.USER_ENV, dicomweb.PASSWORD_ENV)}
    return subprocess.run([sys.executable, "-m", "medsynth.cli", *args], cwd=cwd, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def _one_error_line(result: subprocess.CompletedProcess[str], stage: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"medsynth {stage}: error: "), result.stderr[-3000:]
    return errors[0]


def test_wrong_password_is_one_line_without_the_password(pacs, tmp_path: Path) -> None:
    line = _one_error_line(_medsynth(
        "preprocess", "data=dicomweb", f"data.dicomweb.url={pacs[0].dicomweb}", f"paths.output={tmp_path / 'out'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path,
        env={dicomweb.USER_ENV: USER, dicomweb.PASSWORD_ENV: WRONG_PASSWORD}), "preprocess")
    assert "refused the credentials" in line and "HTTP 401" in line and dicomweb.PASSWORD_ENV in line
    assert WRONG_PASSWORD not in line and PASSWORD not in line
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(WRONG_PASSWORD.encode() not in p.read_bytes() for p in written)


def test_unreachable_server_is_one_line(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    line = _one_error_line(_medsynth(
        "preprocess", "data=dicomweb", f"data.dicomweb.url=http://127.0.0.1:{closed}/dicom-web",
        f"paths.output={tmp_path / 'out'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path,
        env={dicomweb.USER_ENV: USER, dicomweb.PASSWORD_ENV: WRONG_PASSWORD}), "preprocess")
    assert f"cannot reach the DICOMweb server at http://127.0.0.1:{closed}/dicom-web (data.dicomweb.url)" in line
    assert "connection refused" in line and WRONG_PASSWORD not in line


def test_push_with_wrong_or_missing_credentials_stops_before_generating(research_pacs, capsys,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """generate checks the push target first; its refusal is one line that names where credentials come from."""
    from medsynth.stages.generate import _push_target

    settings = compose_config(["generate.push=dicomweb", "generate.formats=[dicom]",
                               f"generate.dicomweb.url={research_pacs.dicomweb}"]).generate
    monkeypatch.setenv(dicomweb.USER_ENV, USER)
    monkeypatch.setenv(dicomweb.PASSWORD_ENV, WRONG_PASSWORD)
    with pytest.raises(SystemExit) as stopped, user_errors("generate"):
        _push_target(settings)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused the credentials" in err and WRONG_PASSWORD not in err
    monkeypatch.delenv(dicomweb.USER_ENV)
    monkeypatch.delenv(dicomweb.PASSWORD_ENV)
    monkeypatch.setenv("NETRC", str(Path(os.devnull)))
    with pytest.raises(MedsynthError, match=r"asks for credentials \(HTTP 401\).*none were given"):
        _push_target(settings)


def test_credentials_from_a_netrc_file(pacs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the environment variables, the netrc entry of the server's host is used (and named, never shown)."""
    for name in (dicomweb.USER_ENV, dicomweb.PASSWORD_ENV, dicomweb.TOKEN_ENV):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    server = DicomwebServer(pacs[0].dicomweb, key="data.dicomweb.url")
    assert server.credentials == "the netrc entry for 127.0.0.1"
    assert server.search(SearchFilters(accession_numbers=(planted_identity(4)["AccessionNumber"],)))
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {WRONG_PASSWORD}\n")
    with pytest.raises(MedsynthError, match="refused the credentials from the netrc entry for 127.0.0.1") as err:
        DicomwebServer(pacs[0].dicomweb, key="data.dicomweb.url").check()
    assert WRONG_PASSWORD not in str(err.value)


# --- without a server ---------------------------------------------------------------------


class _Answer:
    """Enough of a streamed ``requests`` response for the multipart reader."""

    def __init__(self, body: bytes, content_type: str, *, seed: int) -> None:
        self.headers = {"Content-Type": content_type}
        self.body, self.rng = body, random.Random(seed)

    def iter_content(self, size: int) -> Iterator[bytes]:
        i = 0
        while i < len(self.body):
            n = self.rng.randint(1, 97)
            yield self.body[i:i + n]
            i += n


def _multipart(parts: list[bytes], boundary: str) -> bytes:
    body = b"preamble to ignore"
    for part in parts:
        body += f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part
    return body + f"\r\n--{boundary}--\r\n".encode()


@pytest.mark.parametrize("seed", range(4))
def test_multipart_parts_are_split_whatever_the_chunks(tmp_path: Path, seed: int) -> None:
    """Parts come out byte for byte however the answer is chunked, even with boundary-like bytes inside."""
    boundary = "b0undary-XYZ"
    rng = np.random.default_rng(seed)
    parts = [rng.bytes(int(n)) for n in rng.integers(0, 3000, size=5)]
    parts[1] = b"\r\n--b0undary-XY" + parts[1] + b"\r\n--"  # almost a delimiter, twice
    answer = _Answer(_multipart(parts, boundary), f'multipart/related; type="application/dicom"; boundary="{boundary}"',
                     seed=seed)
    received: list[int] = []
    files = list(dicomweb._parts(answer, tmp_path, max_bytes=10**6, received=received.append))
    assert [f.read_bytes() for f in files] == parts
    assert sum(received) == len(answer.body)


def test_a_cut_or_oversized_answer_leaves_no_file(tmp_path: Path) -> None:
    boundary = "zz"
    body = _multipart([b"A" * 500, b"B" * 500], boundary)
    content_type = f"multipart/related; boundary={boundary}"
    cut = _Answer(body[:-300], content_type, seed=0)
    with pytest.raises(dicomweb._Broken):
        for part in dicomweb._parts(cut, tmp_path, max_bytes=10**6, received=lambda n: None):
            part.unlink()
    with pytest.raises(dicomweb._BadAnswer, match="larger than"):
        list(dicomweb._parts(_Answer(body, content_type, seed=1), tmp_path, max_bytes=100, received=lambda n: None))
    with pytest.raises(dicomweb._BadAnswer, match="not multipart/related"):
        list(dicomweb._parts(_Answer(b"{}", "application/json", seed=2), tmp_path, max_bytes=100, received=lambda n: None))
    assert list(tmp_path.iterdir()) == []


def test_config_refuses_credentials_in_urls_and_bad_filters(tmp_path: Path) -> None:
    from medsynth import ConfigError

    with pytest.raises(ConfigError, match="must not hold credentials") as err:
        compose_config(["data=dicomweb", "data.dicomweb.url=https://alice:QZXSECRET@pacs.example/dicom-web"])
    assert "QZXSECRET" not in str(err.value)
    with pytest.raises(ConfigError, match="data.dicomweb.study_date"):
        compose_config(["data=dicomweb", "data.dicomweb.url=https://pacs.example/dicom-web", "data.dicomweb.study_date=2024"])
    with pytest.raises(ConfigError, match="generate.formats"):
        compose_config(["generate.push=dicomweb", "generate.dicomweb.url=https://pacs.example/dicom-web"])
    (tmp_path / "acc.txt").write_text("# accession numbers\nA1\n\nA2\nA1\n")
    assert dicomweb.read_accession_list(tmp_path / "acc.txt") == ("A1", "A2")
    (tmp_path / "bad.txt").write_text("A1\nQZX*\n")
    with pytest.raises(MedsynthError, match="line 2 is not one accession number") as err:
        dicomweb.read_accession_list(tmp_path / "bad.txt")
    assert "QZX" not in str(err.value).replace(str(tmp_path), "")


def test_a_folder_with_other_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mine.dcm").write_text("not retrieved")
    with pytest.raises(MedsynthError, match="did not retrieve"):
        dicomweb.claim_folder(tmp_path)
    fresh = dicomweb.claim_folder(tmp_path / "new")
    assert (fresh / dicomweb.MARKER).is_file() and (fresh.stat().st_mode & 0o077) == 0


def test_environment_credentials_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token goes in a bearer header; half a user/password pair, or both kinds at once, is refused in one line."""
    for name in (dicomweb.USER_ENV, dicomweb.PASSWORD_ENV, dicomweb.TOKEN_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(dicomweb.TOKEN_ENV, "tok-QZX123")
    server = DicomwebServer("https://pacs.example/dicom-web/", key="generate.dicomweb.url")
    assert server.url == "https://pacs.example/dicom-web" and server.credentials == dicomweb.TOKEN_ENV
    assert server._session.headers["Authorization"] == "Bearer tok-QZX123"
    monkeypatch.setenv(dicomweb.USER_ENV, USER)
    with pytest.raises(MedsynthError, match="not both") as err:
        DicomwebServer("https://pacs.example/dicom-web", key="generate.dicomweb.url")
    assert "QZX" not in str(err.value)
    monkeypatch.delenv(dicomweb.TOKEN_ENV)
    with pytest.raises(MedsynthError, match=f"only {dicomweb.USER_ENV} is set"):
        DicomwebServer("https://pacs.example/dicom-web", key="generate.dicomweb.url")
