"""DICOMweb: find series on a server (QIDO-RS), retrieve them into a folder (WADO-RS), store files (STOW-RS).

``data=dicomweb`` uses :meth:`DicomwebServer.search` and :meth:`DicomwebServer.retrieve` to turn a
search on a research PACS into a folder that the folder ingest reads like any export;
``generate.push=dicomweb`` uses :meth:`DicomwebServer.store` to put the synthetic series and SEGs
on one. ``dicomweb-client`` makes the searches and the stores; retrieval streams the WADO-RS
answer itself, part by part straight to disk, so an instance is never held in memory whole and the
files are byte for byte what the server stores (``transfer-syntax=*``: no transcoding).

Credentials never come from the config (which is logged): ``$MEDSYNTH_DICOMWEB_USER`` with
``$MEDSYNTH_DICOMWEB_PASSWORD`` (HTTP basic), ``$MEDSYNTH_DICOMWEB_TOKEN`` (a bearer token), or
else the netrc entry of the server's host (``~/.netrc``, or the file ``$NETRC`` names). No message,
log record or file this module writes holds them, nor any value from a patient's data: errors say
what was being done ("retrieving series 3 of 12"), never which UID or accession number.

The retrieval folder holds patient data. Its files are named by keyed hashes (the project's salt)
of the study, series and instance UIDs, ``<folder>/s<16 hex>/i<16 hex>.dcm``, so neither names nor
paths show an identifier; each is written under a temporary name and renamed once complete, so a
file under its final name is always a whole instance. A rerun asks the server again what the
search finds, deletes the files of series it no longer finds, and retrieves only the instances
that are not complete yet: an interrupted retrieval continues where it stopped.

Everything a server sends is data from outside: UIDs are checked before they go into a URL, each
received part is identified by its own header (read with the same deflate-bomb and size guards as
any DICOM file) and kept only if it is an instance the search listed, and an instance larger than
the configured limit is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import http
import logging
import os
import re
import shutil
import urllib.parse
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from medsynth import MedsynthError
from medsynth.io.atomic import DiskFullError, remove_temporaries, temporary_name

log = logging.getLogger("medsynth")

USER_ENV = "MEDSYNTH_DICOMWEB_USER"
PASSWORD_ENV = "MEDSYNTH_DICOMWEB_PASSWORD"
TOKEN_ENV = "MEDSYNTH_DICOMWEB_TOKEN"
"""The environment variables credentials come from (else the netrc entry of the server's host)."""

MARKER = ".medsynth-dicomweb"
"""The file that marks a folder as a retrieval folder (medsynth deletes only in such folders)."""

_LOCK = ".medsynth-dicomweb.lock"
_ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_UID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")  # conformant UIDs are digits and dots; PACS in the wild hold worse
_CODE = re.compile(r"^[A-Z0-9_ ]{0,16}$")
_SERIES_DIR = re.compile(r"^s[0-9a-f]{16}$")
_INSTANCE_FILE = re.compile(r"^i[0-9a-f]{16}\.dcm$")
_CHUNK = 1 << 20
_MAX_PART_HEADERS = 16 * 1024
_MAX_PAGES = 10_000
_STUDY, _SERIES, _INSTANCE, _MODALITY, _SERIES_DESCRIPTION = "0020000D", "0020000E", "00080018", "00080060", "0008103E"


@dataclasses.dataclass(frozen=True)
class SearchFilters:
    """What to retrieve; each filter that is set narrows the search (none set: every series on the server).

    Attributes:
        study_date: ``YYYYMMDD`` or a range ``YYYYMMDD-YYYYMMDD`` (one end may be left open).
        study_description: Studies whose description matches, as the server matches (``*``, ``?``).
        series_description: Series whose description matches ``*`` and ``?`` wildcards, ignoring case.
        modality: Series of this Modality (and the SEG series of their studies, which label them).
        accession_numbers: Only the studies of these accession numbers (identifying: never log them).
    """

    study_date: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    modality: str | None = None
    accession_numbers: tuple[str, ...] = ()

    def study_queries(self) -> list[dict[str, str]]:
        """The QIDO-RS study searches to make: one, or one per accession number."""
        base = {
            k: v
            for k, v in (
                ("StudyDate", self.study_date),
                ("StudyDescription", self.study_description),
                ("ModalitiesInStudy", self.modality),
            )
            if v
        }
        if not self.accession_numbers:
            return [base]
        return [{**base, "AccessionNumber": number} for number in self.accession_numbers]

    def keeps(self, modality: str, description: str) -> bool:
        """Whether a series of a found study with this Modality and Series Description is retrieved."""
        if modality == "SEG":  # a SEG labels a series of its study; the ingest pairs them (or quarantines it)
            return True
        if self.modality and modality != self.modality.upper():
            return False
        return not self.series_description or _wildcard(self.series_description).fullmatch(description.upper()) is not None

    @property
    def empty(self) -> bool:
        """Whether no filter is set (the search finds every series on the server)."""
        return not (
            self.study_date or self.study_description or self.series_description or self.modality or self.accession_numbers
        )


@dataclasses.dataclass(frozen=True)
class FoundSeries:
    """One series a search found. It holds raw UIDs (identifiers): never write it out or log it.

    Attributes:
        study: Study Instance UID.
        series: Series Instance UID.
        modality: The series' Modality.
        instances: Its SOP Instance UIDs.
    """

    study: str
    series: str
    modality: str
    instances: tuple[str, ...]


@dataclasses.dataclass
class Retrieval:
    """What a retrieval did (counts only: nothing in it identifies anyone).

    Attributes:
        folder: The retrieval folder.
        series: Series the search found.
        instances: Their instances.
        retrieved: Instances retrieved by this run.
        present: Instances that were complete in the folder already (an earlier, interrupted run).
        removed: Files deleted because the search no longer finds their series or instance.
        refused: Parts of the server's answers that were not an instance asked for (dropped).
        missing: Instances the search listed but the server did not send.
        requests: HTTP requests made (searches included).
        bytes: Bytes received in retrieval answers.
    """

    folder: Path
    series: int = 0
    instances: int = 0
    retrieved: int = 0
    present: int = 0
    removed: int = 0
    refused: int = 0
    missing: int = 0
    requests: int = 0
    bytes: int = 0

    def metrics(self) -> dict[str, float]:
        """The counts as MLflow metrics (``dicomweb_<count>``)."""
        return {f"dicomweb_{f.name}": float(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "folder"}

    def describe(self) -> str:
        """``12 series, 300 instances: 100 retrieved (52.4 MB), 200 already complete, 0 removed, 16 requests``."""
        text = (
            f"{self.series} series, {self.instances} instances: {self.retrieved} retrieved ({_size(self.bytes)}), "
            f"{self.present} already complete, {self.removed} removed, {self.requests} requests"
        )
        if self.refused:
            text += f", {self.refused} unexpected part(s) dropped"
        if self.missing:
            text += f", {self.missing} listed instance(s) not sent"
        return text


class DicomwebServer:
    """A DICOMweb service: searches, retrieval into a folder, and stores, with errors as one line each.

    Args:
        url: Base URL of the service (``https://host/dicom-web``): http(s), no credentials, no query.
        key: The config key the URL comes from, named in messages (``data.dicomweb.url``).
        timeout: Seconds to wait for a connection (at most 10) and for each piece of an answer.

    Raises:
        MedsynthError: For a URL that is not allowed or credentials in the environment that are incomplete.
    """

    def __init__(self, url: str, *, key: str, timeout: float = 60.0) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.url = _base_url(url, key)
        self.key = key
        self.requests = 0
        self.bytes = 0
        self._timeout = (min(float(timeout), 10.0), float(timeout))
        self._session: requests.Session
        self._session, self.credentials = _session(self.url)
        self._session.hooks["response"].append(self._count)
        _quiet_client_log()
        try:
            self._client = DICOMwebClient(self.url, session=self._session, permissive_uid=True, timeout=self._timeout)
        except ValueError as err:  # a URL dicomweb-client cannot take apart (an IPv6 literal, say)
            raise MedsynthError(f"{key}={self.url} cannot be used as a DICOMweb base URL: {err}") from None
        self._client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=500)
        host = urllib.parse.urlsplit(self.url).hostname or ""
        if self.credentials and self.url.startswith("http:") and host not in ("localhost", "127.0.0.1", "::1"):
            log.warning("dicomweb: credentials go to %s over unencrypted http; use https outside a test setup", host)

    def _count(self, response: Any, *args: Any, **kwargs: Any) -> Any:
        self.requests += 1
        return response

    # --- searching -------------------------------------------------------------------------

    def check(self) -> None:
        """Make one small search, so an unreachable server or refused credentials stop a stage before its work.

        Raises:
            MedsynthError: One line saying what failed.
        """
        with self._answers("checking the connection"):
            self._client.search_for_studies(limit=1, fields=["StudyInstanceUID"])

    def search(self, filters: SearchFilters) -> list[FoundSeries]:
        """The series that ``filters`` find, with their instances (QIDO-RS: studies, then each study's instances).

        Args:
            filters: What to retrieve.

        Returns:
            The series, each once, in the order the server listed them.

        Raises:
            MedsynthError: One line if the server cannot be reached, refuses, or answers nonsense.
        """
        studies: dict[str, None] = {}
        ignored = 0
        for query in filters.study_queries():
            items = self._pages(
                "searching for studies",
                (_STUDY,),
                functools.partial(self._client.search_for_studies, search_filters=query, fields=["StudyInstanceUID"]),
            )
            for item in items:
                uid = _uid_of(item, _STUDY)
                if uid is None:
                    ignored += 1
                else:
                    studies.setdefault(uid)
        found: dict[str, FoundSeries] = {}
        for index, study in enumerate(studies, start=1):
            items = self._pages(
                f"listing the instances of study {index} of {len(studies)}",
                (_SERIES, _INSTANCE),
                functools.partial(
                    self._client.search_for_instances,
                    study_instance_uid=study,
                    fields=["SeriesInstanceUID", "SOPInstanceUID", "Modality", "SeriesDescription"],
                ),
            )
            instances: dict[str, dict[str, None]] = {}
            described: dict[str, tuple[str, str]] = {}
            for item in items:
                series, instance = _uid_of(item, _SERIES), _uid_of(item, _INSTANCE)
                if series is None or instance is None or _uid_of(item, _STUDY) not in (None, study):
                    ignored += 1
                    continue
                instances.setdefault(series, {})[instance] = None
                described.setdefault(series, (_code_of(item, _MODALITY), _text_of(item, _SERIES_DESCRIPTION)))
            for series, sops in instances.items():
                modality, description = described[series]
                if series not in found and filters.keeps(modality, description):
                    found[series] = FoundSeries(study, series, modality, tuple(sops))
        if ignored:
            log.warning("dicomweb: %d search result(s) without usable UIDs were ignored", ignored)
        return list(found.values())

    def _pages(self, action: str, keys: tuple[str, ...], search: Callable[..., Any]) -> list[dict[str, Any]]:
        """All results of a search, page after page (``offset``), until a page brings nothing new.

        A server may cut an answer short (and say so in a Warning header), or ignore ``offset`` and
        send the same page again: results are told apart by ``keys`` (tags of UIDs), so neither
        loses a result nor loops.
        """
        results: list[dict[str, Any]] = []
        seen: set[tuple[Any, ...]] = set()
        offset = 0
        for _ in range(_MAX_PAGES):
            with self._answers(action):
                page = _items(search(offset=offset))
            offset += len(page)
            new = 0
            for item in page:
                identity = tuple(_value(item, key) for key in keys)
                if identity in seen:
                    continue
                seen.add(identity)
                results.append(item)
                new += None not in identity
            if not new:
                return results
        raise MedsynthError(
            f"the DICOMweb server at {self.url} ({self.key}) kept sending new results after "
            f"{_MAX_PAGES} pages while {action}: narrow the search"
        )

    # --- retrieving ------------------------------------------------------------------------

    def retrieve(
        self, found: Sequence[FoundSeries], folder: str | os.PathLike[str], *, salt: bytes, max_bytes: int, progress: bool = False
    ) -> Retrieval:
        """Retrieve the instances of ``found`` into ``folder`` (WADO-RS), continuing an interrupted retrieval.

        Files of series or instances that ``found`` does not hold are deleted, so the folder holds
        exactly what the search found. A series none of whose instances are here comes in one
        streamed request; the missing instances of a partly retrieved series come one by one.

        Args:
            found: What :meth:`search` returned.
            folder: The retrieval folder: created (mode 0700) if needed; it must hold nothing but an
                earlier retrieval.
            salt: The project's secret salt (the files' names are keyed hashes of their UIDs).
            max_bytes: Largest instance accepted.
            progress: Show a progress bar (instances).

        Returns:
            What was done.

        Raises:
            MedsynthError: One line if the server cannot be reached, refuses, breaks off or answers
                nonsense (the complete instances stay for the rerun), or the folder is not a retrieval folder.
        """
        from medsynth.progress import progress_bar

        root = claim_folder(folder)
        result = Retrieval(root, series=len(found), instances=sum(len(s.instances) for s in found))
        requests_before, bytes_before = self.requests, self.bytes
        with _exclusive(root):
            remove_temporaries(root)
            plan = {s.series: _paths(root, s, salt) for s in found}
            result.removed = _remove_stale(root, {p for paths in plan.values() for p in paths.values()})
            todo = {s.series: [sop for sop, path in plan[s.series].items() if not path.is_file()] for s in found}
            result.present = result.instances - sum(len(t) for t in todo.values())
            with progress_bar(
                total=result.instances, initial=result.present, desc="dicomweb: retrieve", unit="instance", enabled=progress
            ) as bar:
                for index, series in enumerate(found, start=1):
                    if not todo[series.series]:
                        continue
                    action = f"retrieving series {index} of {len(found)}"
                    try:
                        self._retrieve_series(
                            series,
                            plan[series.series],
                            todo[series.series],
                            result,
                            action=action,
                            max_bytes=max_bytes,
                            done=bar.update,
                        )
                    except MedsynthError as err:
                        raise err.with_note(
                            f"the {result.present + result.retrieved} complete instance(s) stay in {root}; rerun to continue"
                        ) from None
            result.missing = sum(1 for paths in plan.values() for path in paths.values() if not path.is_file())
        result.requests = self.requests - requests_before
        result.bytes = self.bytes - bytes_before
        if result.missing:
            log.warning("dicomweb: the server did not send %d instance(s) its search listed", result.missing)
        if result.refused:
            log.warning(
                "dicomweb: %d part(s) of the server's answers were not instances asked for and were dropped", result.refused
            )
        return result

    def _retrieve_series(
        self,
        series: FoundSeries,
        paths: dict[str, Path],
        todo: list[str],
        result: Retrieval,
        *,
        action: str,
        max_bytes: int,
        done: Callable[[int], Any],
    ) -> None:
        """Stream the whole series (nothing of it here yet) or each missing instance into ``paths``."""
        base = f"{self.url}/studies/{_quote(series.study)}/series/{_quote(series.series)}"
        urls = [base] if len(todo) == len(series.instances) else [f"{base}/instances/{_quote(sop)}" for sop in todo]
        folder = next(iter(paths.values())).parent
        folder.mkdir(parents=True, exist_ok=True)
        for url in urls:
            with self._answers(action):
                response = self._session.get(url, headers={"Accept": _ACCEPT_DICOM}, stream=True, timeout=self._timeout)
                with response:
                    response.raise_for_status()
                    for part in _parts(response, folder, max_bytes=max_bytes, received=self._received):
                        try:
                            target = paths.get(_identify(part, series, max_bytes=max_bytes) or "")
                            if target is None:
                                result.refused += 1
                            elif not target.is_file():
                                os.replace(part, target)
                                result.retrieved += 1
                                done(1)
                        finally:
                            with contextlib.suppress(FileNotFoundError):
                                part.unlink()

    def _received(self, n: int) -> None:
        self.bytes += n

    # --- storing ---------------------------------------------------------------------------

    def store(self, files: Sequence[str | os.PathLike[str]], *, what: str) -> int:
        """Store DICOM files in one STOW-RS request; instances the server holds already are kept once.

        Args:
            files: The files (one sample's image series and SEG).
            what: What they are, for messages (``sample syn_00003``).

        Returns:
            How many instances the server confirmed.

        Raises:
            MedsynthError: One line if a file cannot be read, or the server cannot be reached,
                refuses the request or refuses an instance.
        """
        import pydicom

        datasets = []
        for file in files:
            try:
                datasets.append(pydicom.dcmread(file))
            except (OSError, pydicom.errors.InvalidDicomError) as err:
                raise MedsynthError(f"cannot read {file} to store it: {err}") from None
        with self._answers(f"storing {what}"):
            answer = self._client.store_instances(datasets)
        failed = list(answer.get("FailedSOPSequence") or [])
        if failed:
            reasons = sorted({f"0x{int(item.get('FailureReason', 0) or 0):04X}" for item in failed})
            raise MedsynthError(
                f"the DICOMweb server at {self.url} ({self.key}) refused {len(failed)} of {len(datasets)} "
                f"instance(s) of {what} (failure reason {', '.join(reasons)})"
            )
        if "ReferencedSOPSequence" not in answer:  # an answer without the standard's lists: nothing to check
            return len(datasets)
        confirmed = {str(item.get("ReferencedSOPInstanceUID", "")) for item in answer.ReferencedSOPSequence}
        unconfirmed = [ds for ds in datasets if str(ds.SOPInstanceUID) not in confirmed]
        if unconfirmed:
            raise MedsynthError(
                f"the DICOMweb server at {self.url} ({self.key}) did not confirm {len(unconfirmed)} of "
                f"{len(datasets)} instance(s) of {what} as stored"
            )
        return len(datasets)

    # --- errors ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _answers(self, action: str) -> Iterator[None]:
        """Turn whatever goes wrong talking to the server into one line that says what was being done.

        Neither the server's words nor the failing request are repeated: they may hold query values.
        """
        import requests
        import retrying

        try:
            yield
        except MedsynthError:
            raise
        except requests.HTTPError as err:
            raise self._refusal(err.response, action) from None
        except retrying.RetryError as err:
            last = err.last_attempt
            if last.has_exception:
                raise self._unreachable(last.value[1], action) from None
            raise self._refusal(last.value, action) from None
        except requests.exceptions.SSLError:
            raise MedsynthError(
                f"cannot make a secure connection to the DICOMweb server at {self.url} ({self.key}) "
                "while " + action + ": its certificate was not accepted (REQUESTS_CA_BUNDLE names "
                "a CA file to trust)"
            ) from None
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError, _Broken):
            raise MedsynthError(f"the connection to the DICOMweb server at {self.url} broke off while {action}") from None
        except requests.RequestException as err:
            raise self._unreachable(err, action) from None
        except _BadAnswer as err:
            raise MedsynthError(
                f"the DICOMweb server at {self.url} ({self.key}) sent an answer that is not valid DICOMweb while {action}: {err}"
            ) from None
        except (ValueError, KeyError) as err:  # a search or store answer dicomweb-client cannot decode
            raise MedsynthError(
                f"the DICOMweb server at {self.url} ({self.key}) sent an answer medsynth cannot read "
                f"while {action} ({type(err).__name__})"
            ) from None

    def _unreachable(self, err: BaseException, action: str) -> MedsynthError:
        import requests

        if isinstance(err, requests.Timeout):
            why = f"no answer within {self._timeout[1]:g} s"
        else:
            why = _connection_problem(str(err))
        return MedsynthError(f"cannot reach the DICOMweb server at {self.url} ({self.key}): {why}, while {action}")

    def _refusal(self, response: Any, action: str) -> MedsynthError:
        code = int(getattr(response, "status_code", 0) or 0)
        where = f"the DICOMweb server at {self.url} ({self.key})"
        host = urllib.parse.urlsplit(self.url).hostname
        if code == 401:
            if self.credentials is None:
                return MedsynthError(
                    f"{where} asks for credentials (HTTP 401) while {action}, and none were given: "
                    f"set {USER_ENV} and {PASSWORD_ENV}, or {TOKEN_ENV}, or add {host} to your netrc "
                    "file (docs/pacs.md)"
                )
            return MedsynthError(
                f"{where} refused the credentials from {self.credentials} (HTTP 401) while {action}: check them (docs/pacs.md)"
            )
        if code == 403:
            return MedsynthError(
                f"{where} refused access (HTTP 403) while {action}: the account "
                f"({self.credentials or 'no credentials'}) may not do this"
            )
        if code == 404:
            return MedsynthError(
                f"{where} answered HTTP 404 (not found) while {action}: check {self.key}, the base URL "
                "of the DICOMweb service (Orthanc: http://HOST:8042/dicom-web)"
            )
        try:
            phrase = f" ({http.HTTPStatus(code).phrase})"
        except ValueError:
            phrase = ""
        return MedsynthError(f"{where} answered HTTP {code}{phrase} while {action}")


def claim_folder(folder: str | os.PathLike[str]) -> Path:
    """Create the retrieval folder (mode 0700), or check that an existing one holds only an earlier retrieval.

    Args:
        folder: The folder.

    Returns:
        Its path.

    Raises:
        MedsynthError: If it holds anything else (those files would be ingested as if retrieved) or
            cannot be created.
    """
    root = Path(folder)
    try:
        if root.is_dir() and not (root / MARKER).is_file():
            if any(not entry.name.startswith(".") for entry in root.iterdir()):
                raise MedsynthError(
                    f"{root} holds files that medsynth did not retrieve, and the ingest would read them as "
                    "if retrieved: choose an empty or new folder for data.dicomweb.folder"
                )
        root.mkdir(parents=True, exist_ok=True)
        if not (root / MARKER).is_file():
            os.chmod(root, 0o700)  # patient data
            (root / MARKER).write_text(
                "DICOM instances retrieved by medsynth (data=dicomweb): patient data, identifiers included; see docs/pacs.md\n"
            )
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(root / MARKER, err.strerror or "", err.errno) from None
        raise MedsynthError(f"cannot use {root} as the retrieval folder: {err.strerror or err}") from None
    return root


def discard_folder(folder: str | os.PathLike[str]) -> int:
    """Delete a retrieval folder's instances (after a successful ingest): the folder is left empty but for its marker.

    Only a folder with the :data:`MARKER` is touched, and in it only retrieved files.

    Args:
        folder: The retrieval folder.

    Returns:
        How many files were deleted.
    """
    root = Path(folder)
    if not (root / MARKER).is_file():
        return 0
    with _exclusive(root):
        count = 0
        for entry in root.iterdir():
            if entry.is_dir() and not entry.is_symlink() and _SERIES_DIR.match(entry.name):
                count += sum(1 for _ in entry.iterdir())
                shutil.rmtree(entry)
        remove_temporaries(root)
        return count


def read_accession_list(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The accession numbers of a text file, one per line (blank lines and ``#`` comments skipped).

    Args:
        path: The file (``data.dicomweb.accession_list``).

    Returns:
        The numbers, each once, in file order.

    Raises:
        MedsynthError: If the file cannot be read, holds no number, or a line is not one accession
            number (the message gives the line number, never the value).
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise MedsynthError(f"data.dicomweb.accession_list={path}: cannot read it ({type(err).__name__})") from None
    numbers: dict[str, None] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        value = line.strip()
        if not value or value.startswith("#"):
            continue
        if len(value) > 16 or not value.isprintable() or any(c in value for c in "\\*?,"):
            raise MedsynthError(
                f"data.dicomweb.accession_list={path}: line {number} is not one accession number "
                "(at most 16 characters, no wildcards, backslashes or commas)"
            )
        numbers.setdefault(value)
    if not numbers:
        raise MedsynthError(f"data.dicomweb.accession_list={path} holds no accession number")
    return tuple(numbers)


# --- helpers ------------------------------------------------------------------------------


class _BadAnswer(Exception):
    """An answer that is not what DICOMweb promises; the text says what, without its content."""


class _Broken(Exception):
    """An answer that ends in the middle of a message."""


def _base_url(url: str, key: str) -> str:
    """The URL without a trailing slash, if it is an http(s) base URL without credentials, query or fragment
    (the message never repeats a URL that may hold a secret)."""
    accepts = f"{key} must be the http(s) base URL of a DICOMweb service"
    try:
        parts = urllib.parse.urlsplit(str(url))
        parts.port  # noqa: B018 (raises for a port that is not a number)
    except ValueError:
        raise MedsynthError(f"{accepts}; it cannot be parsed as a URL") from None
    if "@" in parts.netloc:
        raise MedsynthError(
            f"{key} must not hold credentials (user:password@host); set {USER_ENV} and {PASSWORD_ENV}, "
            "or a netrc entry for the host (docs/pacs.md)"
        )
    if parts.query or parts.fragment:
        raise MedsynthError(f"{accepts}, without a query (?...) or fragment (#...)")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise MedsynthError(f"{accepts}, got {url!r}")
    return str(url).rstrip("/")


def _session(url: str) -> tuple[Any, str | None]:
    """A requests session with the credentials of the environment; also what they are, for messages."""
    import requests

    session = requests.Session()
    token, user, password = (os.environ.get(name) or None for name in (TOKEN_ENV, USER_ENV, PASSWORD_ENV))
    if token and (user or password):
        raise MedsynthError(f"set either {TOKEN_ENV} or {USER_ENV} with {PASSWORD_ENV}, not both")
    if token:
        if not token.isprintable() or any(c.isspace() for c in token):
            raise MedsynthError(f"{TOKEN_ENV} holds spaces or control characters; a bearer token has none")
        session.headers["Authorization"] = f"Bearer {token}"
        return session, TOKEN_ENV
    if user or password:
        if not (user and password):
            raise MedsynthError(f"{USER_ENV} and {PASSWORD_ENV} go together: only {USER_ENV if user else PASSWORD_ENV} is set")
        if not (user.isprintable() and password.isprintable()):
            raise MedsynthError(f"{USER_ENV} or {PASSWORD_ENV} holds control characters")
        session.auth = (user, password)
        return session, f"{USER_ENV} and {PASSWORD_ENV}"
    if requests.utils.get_netrc_auth(url):
        return session, f"the netrc entry for {urllib.parse.urlsplit(url).hostname}"
    return session, None


def _quiet_client_log() -> None:
    """dicomweb-client logs UIDs at INFO ("retrieve series ..."): keep its records below WARNING out of the
    log, unless ``MEDSYNTH_LIBRARY_LOGS=1`` asks for library records."""
    logger = logging.getLogger("dicomweb_client")
    if os.environ.get("MEDSYNTH_LIBRARY_LOGS") != "1" and logger.level < logging.WARNING:
        logger.setLevel(logging.WARNING)


def _connection_problem(text: str) -> str:
    """What a connection error's text says, in a few words (the text itself may hold the request's query)."""
    known = (
        ("refused", "connection refused"),
        ("Name or service not known", "unknown host"),
        ("nodename nor servname", "unknown host"),
        ("Temporary failure in name resolution", "unknown host"),
        ("No route to host", "no route to host"),
        ("Network is unreachable", "network unreachable"),
        ("reset", "the connection was reset"),
        ("RemoteDisconnected", "the server closed the connection"),
        ("aborted", "the connection was closed"),
    )
    return next((words for needle, words in known if needle in text), "no connection")


def _items(answer: Any) -> list[dict[str, Any]]:
    if not isinstance(answer, list):
        raise _BadAnswer("a search answer that is not a list of data sets")
    return [item for item in answer if isinstance(item, dict)]


def _value(item: dict[str, Any], tag: str) -> Any:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _uid_of(item: dict[str, Any], tag: str) -> str | None:
    """A UID of a search result, if it is one that can go into a URL."""
    value = _value(item, tag)
    return value if isinstance(value, str) and _UID.match(value) and value not in (".", "..") else None


def _code_of(item: dict[str, Any], tag: str) -> str:
    value = _value(item, tag)
    return value.strip().upper() if isinstance(value, str) and _CODE.match(value.strip().upper()) else ""


def _text_of(item: dict[str, Any], tag: str) -> str:
    value = _value(item, tag)
    return value.strip() if isinstance(value, str) else ""


def _wildcard(pattern: str) -> re.Pattern[str]:
    """DICOM wildcard matching (``*`` any run, ``?`` one character), ignoring case."""
    text = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.upper())
    return re.compile(text, re.DOTALL)


def _quote(uid: str) -> str:
    return urllib.parse.quote(uid, safe="")


def _paths(root: Path, series: FoundSeries, salt: bytes) -> dict[str, Path]:
    """Where each instance of ``series`` is kept: names are keyed hashes, so they show no UID."""
    from medsynth.data.deid import pseudonym

    folder = root / pseudonym(f"{series.study}/{series.series}", salt, prefix="s", length=16)
    return {sop: folder / f"{pseudonym(f'{series.series}/{sop}', salt, prefix='i', length=16)}.dcm" for sop in series.instances}


def _remove_stale(root: Path, keep: set[Path]) -> int:
    """Delete retrieved files (and then empty series folders) that are not in ``keep``."""
    removed = 0
    for entry in sorted(root.iterdir()):
        if not (entry.is_dir() and not entry.is_symlink() and _SERIES_DIR.match(entry.name)):
            continue
        for file in sorted(entry.iterdir()):
            if _INSTANCE_FILE.match(file.name) and file not in keep:
                file.unlink()
                removed += 1
        if not any(entry.iterdir()):
            entry.rmdir()
    return removed


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Hold the retrieval folder alone (runs that retrieve into it at once, shards of one input, wait in turn)."""
    fd = os.open(root / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("dicomweb: waiting for another run that retrieves into %s", root)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _media_type(value: str) -> tuple[str, dict[str, str]]:
    """``multipart/related; boundary="x"; type=...`` as ``("multipart/related", {"boundary": "x", ...})``."""
    media, *params = value.split(";")
    found = {}
    for param in params:
        name, _, text = param.partition("=")
        found[name.strip().lower()] = text.strip().strip('"')
    return media.strip().lower(), found


def _parts(response: Any, folder: Path, *, max_bytes: int, received: Callable[[int], None]) -> Iterator[Path]:
    """Each part of a WADO-RS answer, written to a temporary file in ``folder`` as it arrives.

    The caller renames or deletes each yielded file; a part cut off by the end of the answer is deleted here.

    Raises:
        _BadAnswer: For an answer that is not ``multipart/related`` DICOM, or a part over ``max_bytes``.
        _Broken: For an answer that ends inside a part.
    """
    media, params = _media_type(response.headers.get("Content-Type", ""))
    stream = response.iter_content(_CHUNK)
    body = [0]

    def chunks() -> Iterator[bytes]:
        for chunk in stream:
            received(len(chunk))
            body[0] += len(chunk)
            yield chunk

    if media == "application/dicom":  # one instance sent bare (some servers do, against the standard)
        yield _write_part(chunks(), bytearray(), None, folder, max_bytes=max_bytes)
        return
    if media != "multipart/related" or not params.get("boundary"):
        raise _BadAnswer(f"the answer is {media or 'untyped'}, not multipart/related")
    delimiter = b"\r\n--" + params["boundary"].encode("latin-1")
    source = chunks()
    buffer = bytearray(b"\r\n")  # the first boundary may open the body: match it as a delimiter too
    while (start := buffer.find(delimiter)) < 0:
        del buffer[: max(0, len(buffer) - len(delimiter))]
        if not _fill(buffer, source):
            declared = response.headers.get("Content-Length", "")
            if body[0] == 0 or (declared.isdigit() and body[0] < int(declared)):
                raise _Broken()  # the connection ended before the answer's first part: cut, not malformed
            raise _BadAnswer("the answer holds no part")
    del buffer[: start + len(delimiter)]
    while True:
        while len(buffer) < 2:
            if not _fill(buffer, source):
                raise _Broken()
        if buffer[:2] == b"--":  # the closing delimiter: read the epilogue, so the connection can serve the next request
            for _ in zip(range(64), source):
                pass
            return
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > _MAX_PART_HEADERS:
                raise _BadAnswer("a part's headers are too long")
            if not _fill(buffer, source):
                raise _Broken()
        headers = bytes(buffer[:end]).decode("latin-1").lower()
        del buffer[: end + 4]
        content_type = next(
            (line.split(":", 1)[1].strip() for line in headers.split("\r\n") if line.startswith("content-type:")),
            "application/dicom",
        )
        if not content_type.startswith("application/dicom"):
            raise _BadAnswer(f"a part is {content_type.split(';')[0]}, not application/dicom")
        yield _write_part(source, buffer, delimiter, folder, max_bytes=max_bytes)


def _fill(buffer: bytearray, source: Iterator[bytes]) -> bool:
    for chunk in source:
        if chunk:
            buffer.extend(chunk)
            return True
    return False


def _write_part(source: Iterator[bytes], buffer: bytearray, delimiter: bytes | None, folder: Path, *, max_bytes: int) -> Path:
    """Write one part to a temporary file: up to ``delimiter`` (consumed from ``buffer``), or to the end."""
    tmp = temporary_name(folder / "part.dcm")
    size = 0
    try:
        with open(tmp, "wb") as fh:
            while True:
                cut = buffer.find(delimiter) if delimiter is not None else -1
                if cut >= 0:
                    fh.write(buffer[:cut])
                    size += cut
                    del buffer[: cut + len(delimiter or b"")]
                    break
                keep = len(delimiter) - 1 if delimiter is not None else 0
                if len(buffer) > keep:  # all but a tail that may begin the delimiter
                    n = len(buffer) - keep
                    fh.write(buffer[:n])
                    size += n
                    del buffer[:n]
                if size > max_bytes:
                    raise _BadAnswer(
                        f"an instance is larger than {max_bytes / 1e9:.3g} GB, the limit on one image (data.max_image_gb)"
                    )
                if not _fill(buffer, source):
                    if delimiter is not None:
                        raise _Broken()
                    fh.write(buffer)
                    size += len(buffer)
                    break
        if size > max_bytes:
            raise _BadAnswer(f"an instance is larger than {max_bytes / 1e9:.3g} GB (data.max_image_gb)")
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(folder, err.strerror or "", err.errno) from None
        raise
    return tmp


def _identify(path: Path, series: FoundSeries, *, max_bytes: int) -> str | None:
    """The SOP Instance UID of a received part, if it is a readable instance of ``series``; else ``None``."""
    from medsynth.io.dicom import _read  # the guarded header reader of every DICOM file medsynth opens

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = _read(path, max_bytes=max_bytes, header_only=True)
        sop, of_series = str(ds.get("SOPInstanceUID", "") or ""), str(ds.get("SeriesInstanceUID", "") or "")
    except MemoryError:
        raise
    except Exception:  # a damaged part is dropped and counted, like any unreadable file
        return None
    return sop if of_series == series.series else None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"
