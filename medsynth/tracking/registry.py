"""Finding and registering trained generators in MLflow: log a checkpoint as a pyfunc model, and
turn a path, run id or registered model name back into a local checkpoint.

A logged generator is an MLflow model folder (``MLmodel`` plus ``artifacts/checkpoint.pt``) under
a run's artifacts; its code is :class:`medsynth.tracking.serving.GeneratorModel`, imported from the
installed package ("models from code"), so ``mlflow models serve -m models:/<name>/<version>
--env-manager local`` serves it from the environment medsynth is installed in.
"""

from __future__ import annotations

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
from mlflow.types.schema import Array, ColSpec, Schema

from medsynth import MedsynthError, __version__
from medsynth.diffusion.denoiser import GUIDED_MODES
from medsynth.training.checkpoint import file_sha256, load_checkpoint

CHECKPOINT_ARTIFACT = "checkpoint.pt"
"""File name of the checkpoint inside a logged generator's ``artifacts/`` folder."""

_KEPT_KEYS = ("ema", "config", "sampling", "label_names", "vocabulary", "spatial_dims", "image_size", "run_id", "step",
              "val_loss")
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
    inputs = [ColSpec("long", "seed")]
    if conditioning in GUIDED_MODES:
        inputs.append(ColSpec("string", "prompt", required=False))
    if conditioning == "mask":
        inputs.append(ColSpec(grid_long, "label_map"))
    inputs += [ColSpec("long", "steps", required=False), ColSpec("double", "guidance_scale", required=False)]
    outputs = [
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


def _save_model(model_dir: Path, code: Path, checkpoint_file: Path, checkpoint: Mapping[str, Any],
                source: Path) -> None:
    """Write the pyfunc model folder: the model code, the checkpoint artifact, signature and metadata."""
    mlflow.pyfunc.save_model(
        str(model_dir),
        python_model=str(code),
        artifacts={"checkpoint": str(checkpoint_file)},
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

    Returns:
        ``models:/<name>/<version>`` when registered, else ``runs:/<run_id>/<artifact_path>``.

    Raises:
        MedsynthError: If the checkpoint cannot be loaded or the run is not in the store.
    """
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
        model_dir = Path(tmp) / "model"
        # "models from code": the model is GeneratorModel, imported from the installed package
        code = Path(tmp) / "generator_model.py"
        code.write_text(_MODEL_CODE)
        with warnings.catch_warnings():
            # the signature is explicit, and an input example would sample at logging time
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            _save_model(model_dir, code, staged, checkpoint, checkpoint_path)
        client.log_artifacts(run_id, str(model_dir), artifact_path=artifact_path)
    uri = f"runs:/{run_id}/{artifact_path}"
    if registered_name is None:
        return uri
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    try:
        client.get_registered_model(registered_name)
    except MlflowException:
        client.create_registered_model(registered_name, description="medsynth generator (pyfunc): seed and condition in, image and label out")
    version = client.create_model_version(registered_name, source, run_id=run_id,
                                          tags={"medsynth.step": str(checkpoint.get("step", ""))})
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
        f"checkpoint {text!r} is neither a file nor an MLflow run id (32 hex digits), runs:/<run_id> "
        "or models:/<name>/<version>")


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
            + "; is it a train run? Log one with medsynth.tracking.registry.log_generator")
    owner = load_checkpoint(candidate).get("run_id")
    if owner and owner != run_id:
        raise MedsynthError(
            f"{candidate} now holds a checkpoint of MLflow run {owner}, not of run {run_id}: a later training wrote over it")
    return candidate


def _registered_checkpoint(client: MlflowClient, uri: str, tracking_uri: str, download_dir: Path) -> Path:
    """The checkpoint of a registered generator ``models:/<name>/<version>`` or ``models:/<name>@<alias>``."""
    spec = uri[len("models:/") :].strip("/")
    name, alias, version = spec, None, None
    if "@" in spec:
        name, alias = spec.rsplit("@", 1)
    elif "/" in spec:
        name, version = spec.rsplit("/", 1)
    if not name or not (alias or version) or (version is not None and not version.isdigit()):
        raise MedsynthError(f"{uri!r}: name a registered model as models:/<name>/<version> or models:/<name>@<alias>")
    try:
        registered = client.get_registered_model(name)
    except MlflowException as err:
        _not_found(err, tracking_uri)
        known = sorted(m.name for m in client.search_registered_models(max_results=50))
        raise MedsynthError(
            f"no registered model {name!r} in mlflow.tracking_uri={tracking_uri}; registered: {known or 'none'}") from None
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, str(version))
    except MlflowException as err:
        _not_found(err, tracking_uri, codes=("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"))  # a missing alias is "invalid"
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        aliases = sorted(getattr(registered, "aliases", None) or {})
        raise MedsynthError(
            f"registered model {name!r} has no {'alias ' + repr(alias) if alias else 'version ' + repr(version)}; "
            f"versions: {versions or 'none'}" + (f", aliases: {aliases}" if aliases else "")) from None
    location = client.get_model_version_download_uri(name, found.version).rstrip("/")
    try:
        return _download(f"{location}/artifacts/{CHECKPOINT_ARTIFACT}", download_dir, tracking_uri)
    except (MlflowException, OSError) as err:
        raise MedsynthError(
            f"{uri} (version {found.version}, {location}) holds no medsynth generator checkpoint: {str(err)[:200]}") from None


__all__ = ["CHECKPOINT_ARTIFACT", "generator_signature", "log_generator", "resolve_checkpoint"]
