"""The trained generator as an MLflow pyfunc model: log it, register it, serve it, find its checkpoint.

A logged generator is an MLflow model folder (``MLmodel`` plus ``artifacts/checkpoint.pt``) under
a run's artifacts. Its ``predict`` takes one row per sample (a seed and the sample's condition) and
returns images and label maps, so ``mlflow models serve -m models:/<name>/<version> --env-manager
local`` serves it over HTTP from the same environment medsynth is installed in.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Array, ColSpec, Schema

from medsynth import ConfigError, MedsynthError, __version__
from medsynth.diffusion.denoiser import parse_prompt as _parse_prompt
from medsynth.train.checkpoint import file_sha256, load_checkpoint

CHECKPOINT_ARTIFACT = "checkpoint.pt"
"""File name of the checkpoint inside a logged generator's ``artifacts/`` folder."""

INPUT_COLUMNS: tuple[str, ...] = ("seed", "prompt", "label_map", "steps", "guidance_scale")
OUTPUT_COLUMNS: tuple[str, ...] = ("seed", "image", "label", "shape")

_KEPT_KEYS = ("ema", "config", "label_names", "vocabulary", "spatial_dims", "run_id", "step", "val_loss")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class GeneratorInputError(MlflowException, MedsynthError):
    """A request the generator cannot serve; a served model answers it with HTTP 400 and this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def parse_prompt(text: str | None) -> dict[str, str]:
    """:func:`medsynth.diffusion.denoiser.parse_prompt`, with a bad prompt reported as bad request input."""
    try:
        return _parse_prompt(text)
    except ConfigError as err:
        raise GeneratorInputError(str(err)) from None


def _given(value: Any) -> bool:
    """False for a missing cell (None, NaN, pandas NA), True otherwise (lists and arrays included)."""
    return value is not None and not (np.ndim(value) == 0 and bool(pd.isna(value)))


class GeneratorModel(PythonModel):
    """A medsynth checkpoint's EMA denoiser behind MLflow's pyfunc ``predict``.

    Input, one row per sample (a pandas DataFrame, a list of dicts or a dict of columns):

    - ``seed`` (int, required): fixes the sample's starting noise.
    - ``prompt`` (str): attribute values for ``class`` / ``attributes`` models, e.g.
      ``"level=2 sex=F"``; attributes left out (or an empty prompt) are "not given".
    - ``label_map`` (nested list of ints, the model's image size): required by ``mask`` models.
    - ``steps`` (int): sampling steps; default the checkpoint's ``generate.steps``.
    - ``guidance_scale`` (float): classifier-free guidance of ``class`` / ``attributes`` models;
      default the checkpoint's ``generate.guidance_scale``.

    Output, one row per sample: ``seed``; ``image`` (nested list of floats in [0, 1], spatial
    shape, channel axis first only for multi-channel images, or None for a label-map generator);
    ``label`` (nested list of ints: the generated label map, the given one for ``mask`` models, or
    None); ``shape`` (the image's shape, else the label's).

    Sampling uses the checkpoint's sampler (``generate.sampler``, ``generate.eta``) with its training
    schedule, so a seed and condition give the same sample as :func:`medsynth.diffusion.sample`.
    """

    def load_context(self, context: PythonModelContext) -> None:
        """Load the checkpoint artifact into the EMA denoiser (on CUDA when available)."""
        self.load(context.artifacts["checkpoint"])

    def load(self, path: str | os.PathLike[str], *, device: torch.device | str | None = None) -> GeneratorModel:
        """Load the checkpoint at ``path`` (what :meth:`load_context` does with the logged artifact).

        Args:
            path: A medsynth training checkpoint.
            device: Where to sample; default CUDA when available, else the CPU.

        Returns:
            This model, ready to predict.
        """
        # imported when a model is loaded, so importing this module does not import the pipelines
        from pipelines.common import build_sampler, load_ema_model

        checkpoint = load_checkpoint(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.config: dict[str, Any] = checkpoint["config"]
        self.label_names: list[str] = list(checkpoint["label_names"])
        self.model = load_ema_model(checkpoint, path, num_classes=len(self.label_names)).to(self.device)
        self.sampler = build_sampler(self.config["generate"]["sampler"], self.config["scheduler"])
        self.image_size = tuple(int(s) for s in self.config["data"]["size"])
        self.sample_shape = self.model.sample_shape(self.image_size)
        self._lock = threading.Lock()  # the server predicts in threads; sampling sets the sampler's timesteps
        return self

    @property
    def settings(self) -> dict[str, Any]:
        """The checkpoint's generation defaults: ``steps``, ``eta``, ``guidance_scale``, ``batch_size``."""
        g = self.config["generate"]
        return {"steps": int(g["steps"]), "eta": float(g["eta"]), "guidance_scale": float(g["guidance_scale"]),
                "batch_size": int(g["batch_size"])}

    def predict(self, context: PythonModelContext | None, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Generate one sample per input row.

        Args:
            context: MLflow's context (unused; the model was loaded by :meth:`load_context`).
            model_input: A pandas DataFrame (what serving passes), a list of row dicts or a dict of
                columns (see the class).
            params: Unused; the settings are per-row columns.

        Returns:
            A pandas DataFrame with columns :data:`OUTPUT_COLUMNS`, one row per input row.

        Raises:
            GeneratorInputError: For a missing seed, an unknown prompt value, a missing or misshapen
                label map, or a setting out of range.
        """
        return pd.DataFrame(self.generate(_rows(model_input)), columns=list(OUTPUT_COLUMNS))

    def generate(self, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """:meth:`predict` on plain row dicts; returns plain row dicts."""
        from monai.networks.schedulers import DDIMScheduler, RFlowScheduler

        from medsynth.diffusion import sample
        from medsynth.diffusion.denoiser import GUIDED_MODES

        if not rows:
            raise GeneratorInputError("no rows: give one row per sample, each with a seed")
        defaults = self.settings
        guided = self.model.conditioning in GUIDED_MODES
        prepared = [self._prepare(i, row, defaults, guided) for i, row in enumerate(rows)]
        # a deterministic sampler gives the same sample alone or in a batch; a stochastic one
        # (DDPM, DDIM with eta > 0) draws its step noise per batch, so it samples each row alone
        deterministic = isinstance(self.sampler, RFlowScheduler) or (
            isinstance(self.sampler, DDIMScheduler) and defaults["eta"] == 0.0)
        batch_size = defaults["batch_size"] if deterministic else 1
        groups: dict[tuple[int, float], list[int]] = {}
        for i, item in enumerate(prepared):
            groups.setdefault((item["steps"], item["guidance_scale"]), []).append(i)
        out: list[dict[str, Any]] = [{} for _ in rows]
        for (steps, guidance_scale), members in groups.items():
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                seeds = [prepared[i]["seed"] for i in chunk]
                given = torch.stack([prepared[i]["label"] for i in chunk]) if self.model.conditioning == "mask" else None
                codes = torch.cat([prepared[i]["codes"] for i in chunk]) if guided else None
                condition = self.model.condition(given, codes)
                with self._lock:
                    x = sample(self.model, self.sampler, condition.to(self.device) if condition is not None else None,
                               seeds=seeds, shape=self.sample_shape, steps=steps, eta=defaults["eta"],
                               guidance_scale=guidance_scale, device=self.device)
                    images, generated = self.model.split(x)
                labels = generated.cpu() if generated is not None else given
                for k, i in enumerate(chunk):
                    image = _unbatch(images[k].cpu()) if images is not None else None
                    label = labels[k, 0].numpy().astype(np.int64) if labels is not None else None
                    out[i] = {
                        "seed": seeds[k],
                        "image": image.tolist() if image is not None else None,
                        "label": label.tolist() if label is not None else None,
                        "shape": list(image.shape if image is not None else label.shape),
                    }
        return out

    def _prepare(self, index: int, row: Mapping[str, Any], defaults: Mapping[str, Any], guided: bool) -> dict[str, Any]:
        """Check one row and turn it into a seed, settings and the model's condition inputs."""
        where = f"row {index}"
        unknown = sorted(set(row) - set(INPUT_COLUMNS))
        if unknown:
            raise GeneratorInputError(f"{where}: unknown column(s) {unknown}; the generator takes {list(INPUT_COLUMNS)}")
        if not _given(row.get("seed")):
            raise GeneratorInputError(f"{where}: a seed (int) is required")
        seed = _integer(row["seed"], f"{where}: seed")
        steps = _integer(row["steps"], f"{where}: steps") if _given(row.get("steps")) else defaults["steps"]
        if steps < 1:
            raise GeneratorInputError(f"{where}: steps must be >= 1, got {steps}")
        guidance_scale = 1.0
        if _given(row.get("guidance_scale")):
            guidance_scale = float(row["guidance_scale"])
            if not guided and guidance_scale != 1.0:
                raise GeneratorInputError(
                    f"{where}: guidance_scale applies to class/attributes models; this one uses "
                    f"{self.model.conditioning!r} conditioning")
        elif guided:
            guidance_scale = defaults["guidance_scale"]
        item: dict[str, Any] = {"seed": seed, "steps": steps, "guidance_scale": guidance_scale}
        prompt = str(row["prompt"]) if _given(row.get("prompt")) else None
        if guided:
            try:
                values = parse_prompt(prompt)
            except GeneratorInputError as err:
                raise GeneratorInputError(f"{where}: {err.message}") from None
            try:
                item["codes"] = self.model.encode_attributes(values)
            except MedsynthError as err:
                raise GeneratorInputError(f"{where}: prompt {prompt!r}: {err}") from None
        elif prompt:
            raise GeneratorInputError(
                f"{where}: this model ({self.model.conditioning!r} conditioning) takes no prompt, got {prompt!r}")
        label_map = row.get("label_map")
        has_label = _given(label_map)
        if self.model.conditioning == "mask":
            if not has_label:
                raise GeneratorInputError(
                    f"{where}: this model generates an image for a given label map: give label_map, a nested "
                    f"list of shape {list(self.image_size)} with values 0..{len(self.label_names) - 1} "
                    f"({', '.join(self.label_names)})")
            item["label"] = self._label_map(label_map, where)
        elif has_label:
            raise GeneratorInputError(
                f"{where}: this model ({self.model.conditioning!r} conditioning) takes no label_map")
        return item

    def _label_map(self, value: Any, where: str) -> torch.Tensor:
        """A label map given as nested lists as a ``(1, *spatial)`` long tensor, checked."""
        try:
            array = np.asarray(_nested(value), dtype=np.float64)
        except (TypeError, ValueError):
            raise GeneratorInputError(f"{where}: label_map must be a nested list of integers of shape {list(self.image_size)}") from None
        if array.shape == (1, *self.image_size):
            array = array[0]
        if array.shape != self.image_size:
            raise GeneratorInputError(
                f"{where}: label_map has shape {list(array.shape)}, the model generates {list(self.image_size)}")
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise GeneratorInputError(f"{where}: label_map must hold integer label values")
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= len(self.label_names):
            raise GeneratorInputError(
                f"{where}: label_map values must be in 0..{len(self.label_names) - 1} ({', '.join(self.label_names)}), "
                f"got {low}..{high}")
        return torch.from_numpy(array.astype(np.int64))[None]


def _nested(value: Any) -> Any:
    """Lists of numpy arrays (how MLflow hands over nested array columns) as plain nested lists."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [_nested(v) for v in value]
    if isinstance(value, (list, tuple)):
        return [_nested(v) for v in value]
    return value


def _integer(value: Any, what: str) -> int:
    """``value`` as an int, refusing fractions and non-numbers."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise GeneratorInputError(f"{what} must be an integer, got {value!r}") from None
    if not number.is_integer():
        raise GeneratorInputError(f"{what} must be an integer, got {value!r}")
    return int(number)


def _unbatch(image: torch.Tensor) -> np.ndarray:
    """A ``(C, *spatial)`` image as ``(*spatial)`` when it has one channel."""
    array = image.numpy().astype(np.float64)
    return array[0] if array.shape[0] == 1 else array


def _rows(model_input: Any) -> list[dict[str, Any]]:
    """A DataFrame, list of dicts or dict of columns as a list of row dicts."""
    if isinstance(model_input, pd.DataFrame):
        return [{str(k): v for k, v in row.items()} for row in model_input.to_dict(orient="records")]
    if isinstance(model_input, Mapping):
        columns = {k: list(v) if isinstance(v, (list, tuple, np.ndarray, pd.Series)) else [v] for k, v in model_input.items()}
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise GeneratorInputError(f"columns have different lengths: { {k: len(v) for k, v in columns.items()} }")
        n = lengths.pop() if lengths else 0
        return [{k: v[i] for k, v in columns.items()} for i in range(n)]
    if isinstance(model_input, Sequence) and all(isinstance(r, Mapping) for r in model_input):
        return [dict(r) for r in model_input]
    raise GeneratorInputError(
        f"the generator takes a table of rows (a DataFrame, a list of dicts or a dict of columns), got {type(model_input).__name__}")


# --- logging, registering, finding ------------------------------------------------------------------


def generator_signature(checkpoint: Mapping[str, Any]) -> ModelSignature:
    """The input and output schema of the generator of ``checkpoint``, so serving checks requests.

    ``prompt`` is an input for ``class`` / ``attributes`` models, ``label_map`` (required) for
    ``mask`` models; ``steps`` and ``guidance_scale`` are optional for all.
    """
    from medsynth.diffusion.denoiser import GUIDED_MODES

    conditioning = checkpoint["config"]["model"]["conditioning"]
    spatial_dims = len(checkpoint["config"]["data"]["size"])
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

from medsynth.tracking.model import GeneratorModel

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
            "image_size": list(checkpoint["config"]["data"]["size"]),
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

    The logged checkpoint keeps what sampling needs (EMA weights, config, labels, vocabulary) and
    drops the optimizer state. The model refers to the installed medsynth package instead of copying
    code, so serve it from this environment: ``mlflow models serve --env-manager local``.

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
    missing = [k for k in ("ema", "config", "label_names") if k not in checkpoint]
    if missing:
        raise MedsynthError(f"{checkpoint_path} is not a medsynth training checkpoint: it lacks {missing}")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    _get_run(client, run_id, tracking_uri)
    with tempfile.TemporaryDirectory(prefix="medsynth-generator-") as tmp:
        staged = Path(tmp) / CHECKPOINT_ARTIFACT
        torch.save({k: checkpoint[k] for k in _KEPT_KEYS if k in checkpoint}, staged)
        model_dir = Path(tmp) / "model"
        # "models from code": the model is this module's class, imported from the installed package
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
        Path of a checkpoint that :func:`medsynth.train.load_checkpoint` reads.

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
            + "; is it a train run? Log one with medsynth.tracking.model.log_generator")
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


__all__ = [
    "CHECKPOINT_ARTIFACT", "GeneratorInputError", "GeneratorModel", "generator_signature", "log_generator",
    "parse_prompt", "resolve_checkpoint",
]
