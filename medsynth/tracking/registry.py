"""Finding and registering trained generators in MLflow: log a checkpoint as a pyfunc model, and
turn a path, run id or registered model name back into a local checkpoint.

A logged generator is an MLflow model folder (``MLmodel`` plus ``artifacts/checkpoint.pt``) under
a run's artifacts; its code is :class:`medsynth.tracking.serving.GeneratorModel`, imported from the
installed package ("models from code"), so ``mlflow models serve -m models:/<name>/<version>
--env-manager local`` serves it from the environment medsynth is installed in. Its ``model_config``
holds the serving limits (docs/serving-limits.md).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow.artifacts
import mlflow.pyfunc
import torch
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Array, ColSpec, Schema, TensorSpec

from medsynth import MedsynthError, __version__
from medsynth.diffusion.denoiser import GUIDED_MODES
from medsynth.training.checkpoint import file_sha256, load_checkpoint

CHECKPOINT_ARTIFACT = "checkpoint.pt"
"""File name of the checkpoint inside a logged generator's ``artifacts/`` folder."""

_KEPT_KEYS = (
    "ema",
    "config",
    "sampling",
    "label_names",
    "vocabulary",
    "spatial_dims",
    "image_size",
    "run_id",
    "step",
    "val_loss",
    "data_manifest_sha256",
    "lineage",
)
_REQUIRED_KEYS = ("ema", "config", "label_names", "image_size")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def generator_signature(checkpoint: Mapping[str, Any]) -> ModelSignature:
    """The input and output schema of the generator of ``checkpoint``, so serving checks requests.

    ``prompt`` is an input for ``class`` / ``attributes`` models, ``label_map`` (required) for
    ``mask`` models; ``steps`` and ``guidance_scale`` are optional for all.
    """
    conditioning = checkpoint["config"]["model"]["conditioning"]
    spatial_dims = len(checkpoint["image_size"])
    grid_long: Any = "long"
    grid_double: Any = "double"
    for _ in range(spatial_dims):
        grid_long, grid_double = Array(grid_long), Array(grid_double)
    inputs: list[ColSpec | TensorSpec] = [ColSpec("long", "seed")]
    if conditioning in GUIDED_MODES:
        inputs.append(ColSpec("string", "prompt", required=False))
    if conditioning == "mask":
        inputs.append(ColSpec(grid_long, "label_map"))
    inputs += [ColSpec("long", "steps", required=False), ColSpec("double", "guidance_scale", required=False)]
    outputs: list[ColSpec | TensorSpec] = [
        ColSpec("long", "seed"),
        ColSpec(grid_double, "image", required=False),
        ColSpec(grid_long, "label", required=False),
        ColSpec(Array("long"), "shape"),
    ]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


_MODEL_CODE = """\
from mlflow.models import set_model

from medsynth.tracking.serving import GeneratorModel

set_model(GeneratorModel())
"""


def _requirements() -> list[str]:
    """What the served environment needs (pinned to this one); stated, so MLflow does not infer it."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in ("medsynth", "mlflow", "torch", "monai", "hydra-core", "pandas"):
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def serving_config(serve_limits: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``model_config`` a generator is logged with: every serving limit, ``None`` for "the default".

    Every key is written, so each limit can also be set when the model is loaded (MLflow only
    overrides keys the logged config has); see docs/serving-limits.md.

    Args:
        serve_limits: Limits to store (keys among :data:`medsynth.tracking.serving.LIMIT_KEYS`).

    Returns:
        ``{key: value or None}`` for every limit.

    Raises:
        MedsynthError: For an unknown key or a value out of range.
    """
    from medsynth.tracking.serving import LIMIT_KEYS
    from medsynth.tracking.serving import serve_limits as check_limits

    given = dict(serve_limits or {})
    check_limits(given, environ={})
    return {key: given.get(key) for key in LIMIT_KEYS}


def _save_model(
    model_dir: Path,
    code: Path,
    checkpoint_file: Path,
    checkpoint: Mapping[str, Any],
    source: Path,
    model_config: Mapping[str, Any],
) -> None:
    """Write the pyfunc model folder: the model code, the checkpoint artifact, signature, serving limits and metadata."""
    mlflow.pyfunc.save_model(
        str(model_dir),
        python_model=str(code),
        artifacts={"checkpoint": str(checkpoint_file)},
        model_config=dict(model_config),
        signature=generator_signature(checkpoint),
        pip_requirements=_requirements(),
        metadata={
            "medsynth_version": __version__,
            "conditioning": checkpoint["config"]["model"]["conditioning"],
            "label_names": list(checkpoint["label_names"]),
            "vocabulary": dict(checkpoint.get("vocabulary") or {}),
            "image_size": [int(s) for s in checkpoint["image_size"]],
            "train_run_id": str(checkpoint.get("run_id", "")),
            "step": int(checkpoint.get("step", 0)),
            "source_checkpoint_sha256": file_sha256(source),
        },
    )


def log_generator(
    checkpoint_path: str | os.PathLike[str],
    *,
    run_id: str,
    tracking_uri: str,
    registered_name: str | None = None,
    artifact_path: str = "generator",
    serve_limits: Mapping[str, Any] | None = None,
) -> str:
    """Log a training checkpoint as a pyfunc generator under a run's artifacts; register it if named.

    The logged checkpoint keeps what sampling needs (EMA weights, config, sampling defaults, image
    size, labels, vocabulary) and drops the optimizer state. The model refers to the installed
    medsynth package instead of copying code, so serve it from this environment:
    ``mlflow models serve --env-manager local``.

    Args:
        checkpoint_path: A training checkpoint, e.g. ``checkpoints/last.pt``.
        run_id: The MLflow run to log under (usually the train run).
        tracking_uri: The MLflow store holding the run (and the registry).
        registered_name: Register the model under this name (a new version each call).
        artifact_path: Folder of the model among the run's artifacts.
        serve_limits: What one request to the served model may ask (``max_rows``, ``batch_size``,
            ``max_steps``, ``time_limit``, ``max_body_bytes``), stored as the model's
            ``model_config``; limits left out take their defaults. See docs/serving-limits.md.

    Returns:
        ``models:/<name>/<version>`` when registered, else ``runs:/<run_id>/<artifact_path>``.

    Raises:
        MedsynthError: If the checkpoint cannot be loaded, the run is not in the store or a
            serving limit is unknown or out of range.
    """
    model_config = serving_config(serve_limits)
    checkpoint_path = Path(checkpoint_path)
    checkpoint = load_checkpoint(checkpoint_path)
    missing = [k for k in _REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise MedsynthError(f"{checkpoint_path} is not a medsynth training checkpoint: it lacks {missing}")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    _get_run(client, run_id, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="medsynth-generator-") as tmp:
        staged = Path(tmp) / CHECKPOINT_ARTIFACT
        torch.save({k: checkpoint[k] for k in _KEPT_KEYS if k in checkpoint}, staged)
        logged_sha256 = file_sha256(staged)  # what models:/ and runs:/ resolution download
        model_dir = Path(tmp) / "model"
        # "models from code": the model is GeneratorModel, imported from the installed package
        code = Path(tmp) / "generator_model.py"
        code.write_text(_MODEL_CODE)
        with warnings.catch_warnings():
            # the signature is explicit, and an input example would sample at logging time
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            _save_model(model_dir, code, staged, checkpoint, checkpoint_path, model_config)
        client.log_artifacts(run_id, str(model_dir), artifact_path=artifact_path)
    uri = f"runs:/{run_id}/{artifact_path}"
    if registered_name is None:
        return uri
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    try:
        client.get_registered_model(registered_name)
    except MlflowException:
        client.create_registered_model(
            registered_name, description="medsynth generator (pyfunc): seed and condition in, image and label out"
        )
    version = client.create_model_version(
        registered_name,
        source,
        run_id=run_id,
        tags={
            "medsynth.step": str(checkpoint.get("step", "")),
            "medsynth.source_checkpoint_sha256": file_sha256(checkpoint_path),
            "medsynth.checkpoint_sha256": logged_sha256,
            "medsynth.data_manifest_sha256": str(checkpoint.get("data_manifest_sha256", "")),
        },
    )
    return f"models:/{registered_name}/{version.version}"


def resolve_checkpoint(source: str | os.PathLike[str], *, tracking_uri: str, download_dir: str | os.PathLike[str]) -> Path:
    """The local path of the checkpoint a user names by path, run or registered model.

    Args:
        source: One of
            - a checkpoint file path;
            - ``runs:/<run_id>`` or a bare run id: the run's logged generator (see
              :func:`log_generator`), else its ``checkpoints/last.pt`` artifact, else
              ``checkpoints/last.pt`` under the run's output folder (tag ``medsynth.output``) when
              that checkpoint still belongs to the run;
            - ``models:/<name>/<version>`` or ``models:/<name>@<alias>``: a registered generator.
        tracking_uri: The MLflow store (and registry) to look runs and models up in.
        download_dir: Where downloaded checkpoints go.

    Returns:
        Path of a checkpoint that :func:`medsynth.training.load_checkpoint` reads.

    Raises:
        MedsynthError: For a missing file, an unknown run id, model name, version or alias, or a
            run without a checkpoint.
    """
    text = str(source)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if text.startswith("models:/"):
        return _registered_checkpoint(client, text, tracking_uri, Path(download_dir))
    if text.startswith("runs:/"):
        run_id = text[len("runs:/") :].strip("/").split("/")[0]
        return _run_checkpoint(client, run_id, tracking_uri, Path(download_dir))
    path = Path(text)
    if path.is_file():
        return path
    if _RUN_ID.match(text):
        return _run_checkpoint(client, text, tracking_uri, Path(download_dir))
    raise MedsynthError(
        f"checkpoint {text!r} is neither a file nor an MLflow run id (32 hex digits), runs:/<run_id> or models:/<name>/<version>"
    )


def _not_found(err: MlflowException, tracking_uri: str, *, codes: Sequence[str] = ("RESOURCE_DOES_NOT_EXIST",)) -> None:
    """Re-raise anything but "does not exist" (an unreachable or broken store) as a store error."""
    if err.error_code not in codes:
        raise MedsynthError(f"cannot read the MLflow store mlflow.tracking_uri={tracking_uri}: {err.message[:300]}") from None


def _get_run(client: MlflowClient, run_id: str, tracking_uri: str) -> Any:
    try:
        return client.get_run(run_id)
    except MlflowException as err:
        _not_found(err, tracking_uri)
        raise MedsynthError(f"no MLflow run {run_id!r} in the store mlflow.tracking_uri={tracking_uri}") from None


def _download(uri: str, download_dir: Path, tracking_uri: str) -> Path:
    """Download one artifact into a new folder under ``download_dir`` (so downloads never overwrite each other)."""
    download_dir.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="checkpoint-", dir=download_dir))
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target), tracking_uri=tracking_uri))


def _artifact_files(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {item.path for item in client.list_artifacts(run_id, path) if not item.is_dir}


def _run_checkpoint(client: MlflowClient, run_id: str, tracking_uri: str, download_dir: Path) -> Path:
    """A run's checkpoint: its logged generator, its checkpoint artifact, or the file in its output folder."""
    run = _get_run(client, run_id, tracking_uri)
    artifact_uri = run.info.artifact_uri.rstrip("/")
    for item in client.list_artifacts(run_id):
        if item.is_dir and f"{item.path}/MLmodel" in _artifact_files(client, run_id, item.path):
            if f"{item.path}/artifacts/{CHECKPOINT_ARTIFACT}" in _artifact_files(client, run_id, f"{item.path}/artifacts"):
                return _download(f"{artifact_uri}/{item.path}/artifacts/{CHECKPOINT_ARTIFACT}", download_dir, tracking_uri)
    if "checkpoints/last.pt" in _artifact_files(client, run_id, "checkpoints"):
        return _download(f"{artifact_uri}/checkpoints/last.pt", download_dir, tracking_uri)
    output = run.data.tags.get("medsynth.output")
    candidate = Path(output) / "checkpoints" / "last.pt" if output else None
    if candidate is None or not candidate.is_file():
        raise MedsynthError(
            f"MLflow run {run_id} has no logged generator or checkpoint artifact"
            + (f", and {candidate} does not exist" if candidate else "")
            + "; is it a train run? Log one with medsynth.tracking.registry.log_generator"
        )
    owner = load_checkpoint(candidate).get("run_id")
    if owner and owner != run_id:
        raise MedsynthError(
            f"{candidate} now holds a checkpoint of MLflow run {owner}, not of run {run_id}: a later training wrote over it"
        )
    return candidate


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """Split ``models:/<name>/<version>`` or ``models:/<name>@<alias>``.

    Args:
        uri: The model URI.

    Returns:
        ``(name, version, alias)``; one of version and alias is ``None``.

    Raises:
        MedsynthError: If ``uri`` has neither form.
    """
    spec = uri[len("models:/") :].strip("/") if uri.startswith("models:/") else ""
    name, alias, version = spec, None, None
    if "@" in spec:
        name, alias = spec.rsplit("@", 1)
    elif "/" in spec:
        name, version = spec.rsplit("/", 1)
    if not name or not (alias or version) or (version is not None and not version.isdigit()):
        raise MedsynthError(f"{uri!r}: name a registered model as models:/<name>/<version> or models:/<name>@<alias>")
    return name, version, alias


def _registered_checkpoint(client: MlflowClient, uri: str, tracking_uri: str, download_dir: Path) -> Path:
    """The checkpoint of a registered generator ``models:/<name>/<version>`` or ``models:/<name>@<alias>``."""
    name, version, alias = parse_model_uri(uri)
    try:
        registered = client.get_registered_model(name)
    except MlflowException as err:
        _not_found(err, tracking_uri)
        known = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise MedsynthError(
            f"no registered model {name!r} in mlflow.tracking_uri={tracking_uri}; registered: {known or 'none'}"
        ) from None
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, str(version))
    except MlflowException as err:
        _not_found(
            err, tracking_uri, codes=("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
        )  # a missing alias is "invalid"
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        aliases = sorted(getattr(registered, "aliases", None) or {})
        raise MedsynthError(
            f"registered model {name!r} has no {'alias ' + repr(alias) if alias else 'version ' + repr(version)}; "
            f"versions: {versions or 'none'}" + (f", aliases: {aliases}" if aliases else "")
        ) from None
    location = client.get_model_version_download_uri(name, found.version).rstrip("/")
    try:
        return _download(f"{location}/artifacts/{CHECKPOINT_ARTIFACT}", download_dir, tracking_uri)
    except (MlflowException, OSError) as err:
        raise MedsynthError(
            f"{uri} (version {found.version}, {location}) holds no medsynth generator checkpoint: {str(err)[:200]}"
        ) from None


# ------------------------------------------------------------------------------- audit of a version

AUDITED_ALIAS = "audited"
"""Alias of the newest registered version whose audit passed."""

AUDIT_TAGS = ("medsynth.audit.verdict", "medsynth.audit.evaluate_run_id", "medsynth.audit.metrics_sha256")
"""Model version tags that carry an audit: the verdict (pass|fail), the evaluate run, the hash of its metrics.json."""


@dataclasses.dataclass(frozen=True)
class AuditStatus:
    """A registered model version and the last audit recorded on it.

    Attributes:
        name: Registered model name.
        version: Version number.
        verdict: ``pass``, ``fail``, or ``""`` when never audited.
        evaluate_run_id: The evaluate run of that audit (``""`` when never audited).
        metrics_sha256: SHA-256 of that audit's ``metrics.json``.
    """

    name: str
    version: str
    verdict: str = ""
    evaluate_run_id: str = ""
    metrics_sha256: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def describe(self) -> str:
        """One phrase for a log line: ``passed an audit (evaluate run ...)`` and the like."""
        if not self.verdict:
            return f"{self.uri} has no audit"
        return f"{self.uri} {'passed' if self.passed else 'failed'} its audit (evaluate run {self.evaluate_run_id or '?'})"


def _registry(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def find_model_version(source: str, *, checkpoint_sha256: str, train_run_id: str, tracking_uri: str) -> tuple[str, str] | None:
    """The registered version a generator is, if it is one.

    A ``models:/NAME/VERSION`` (or ``@ALIAS``) source is that version. Otherwise a version counts
    when its run is ``train_run_id`` and its recorded checkpoint hash (of the training
    checkpoint, or of the logged copy) is ``checkpoint_sha256``.

    Args:
        source: The checkpoint as the user named it (path, run id, ``runs:/`` or ``models:/``).
        checkpoint_sha256: SHA-256 of the checkpoint file that was loaded.
        train_run_id: The train run the checkpoint says it came from (``""`` if unknown).
        tracking_uri: The MLflow store and registry.

    Returns:
        ``(name, version)``, or ``None`` when it is not a registered version.

    Raises:
        MedsynthError: For a ``models:/`` URI that names no version, or an unreadable store.
    """
    client = _registry(tracking_uri)
    if source.startswith("models:/"):
        name, version, alias = parse_model_uri(source)
        try:
            found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, str(version))
        except MlflowException as err:
            _not_found(err, tracking_uri, codes=("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"))
            raise MedsynthError(f"{source}: no such registered model version in mlflow.tracking_uri={tracking_uri}") from None
        return found.name, str(found.version)
    if not _RUN_ID.match(train_run_id or ""):
        return None
    try:
        versions = client.search_model_versions(f"run_id = '{train_run_id}'")
    except MlflowException as err:
        _not_found(err, tracking_uri)
        return None
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        tags = v.tags or {}
        if checkpoint_sha256 in (tags.get("medsynth.source_checkpoint_sha256"), tags.get("medsynth.checkpoint_sha256")):
            return v.name, str(v.version)
    return None


def mark_audit(
    name: str, version: str, *, passed: bool, evaluate_run_id: str, metrics_sha256: str, tracking_uri: str
) -> AuditStatus:
    """Record an audit on a registered model version: tags, and the ``audited`` alias on a PASS.

    A FAIL also takes the ``audited`` alias away from this version if it held it.

    Args:
        name: Registered model name.
        version: Version number.
        passed: The audit's verdict.
        evaluate_run_id: The evaluate run that made it.
        metrics_sha256: SHA-256 of its ``evaluation/metrics.json``.
        tracking_uri: The MLflow store and registry.

    Returns:
        The version's audit status as recorded.
    """
    client = _registry(tracking_uri)
    values = ("pass" if passed else "fail", evaluate_run_id, metrics_sha256)
    for key, value in zip(AUDIT_TAGS, values):
        client.set_model_version_tag(name, str(version), key, value)
    if passed:
        client.set_registered_model_alias(name, AUDITED_ALIAS, str(version))
    else:
        try:
            holder = client.get_model_version_by_alias(name, AUDITED_ALIAS)
        except MlflowException:
            holder = None
        if holder is not None and str(holder.version) == str(version):
            client.delete_registered_model_alias(name, AUDITED_ALIAS)
    return AuditStatus(name, str(version), *values)


def audit_status(name: str, version: str, *, tracking_uri: str) -> AuditStatus:
    """The last audit recorded on a registered model version (see :func:`mark_audit`).

    Args:
        name: Registered model name.
        version: Version number.
        tracking_uri: The MLflow store and registry.

    Returns:
        The status; its ``verdict`` is ``""`` when the version was never audited.

    Raises:
        MedsynthError: If there is no such version.
    """
    try:
        found = _registry(tracking_uri).get_model_version(name, str(version))
    except MlflowException as err:
        _not_found(err, tracking_uri)
        raise MedsynthError(
            f"no registered model version models:/{name}/{version} in mlflow.tracking_uri={tracking_uri}"
        ) from None
    tags = found.tags or {}
    verdict = tags.get(AUDIT_TAGS[0], "")
    return AuditStatus(
        name,
        str(version),
        verdict if verdict in ("pass", "fail") else "",
        tags.get(AUDIT_TAGS[1], ""),
        tags.get(AUDIT_TAGS[2], ""),
    )


__all__ = [
    "AUDITED_ALIAS",
    "AUDIT_TAGS",
    "CHECKPOINT_ARTIFACT",
    "AuditStatus",
    "audit_status",
    "find_model_version",
    "generator_signature",
    "log_generator",
    "mark_audit",
    "parse_model_uri",
    "resolve_checkpoint",
    "serving_config",
]
