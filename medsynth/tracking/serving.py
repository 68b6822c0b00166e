"""The trained generator as an MLflow pyfunc model: one row per sample in, images and label maps out.

:class:`GeneratorModel` is the code of every logged generator (see
:func:`medsynth.tracking.registry.log_generator`): it loads the logged checkpoint as a
:class:`medsynth.diffusion.generator.Generator`, checks each request row and samples through it,
so a seed and condition give the same sample here as in the generate stage.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext

from medsynth import ConfigError, MedsynthError
from medsynth.diffusion.denoiser import parse_prompt as _parse_prompt
from medsynth.diffusion.generator import Generator

INPUT_COLUMNS: tuple[str, ...] = ("seed", "prompt", "label_map", "steps", "guidance_scale")
OUTPUT_COLUMNS: tuple[str, ...] = ("seed", "image", "label", "shape")

BATCH_SIZE = 16
"""Samples drawn together; a sample does not depend on its batch, so this only bounds memory."""


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
    - ``steps`` (int): sampling steps; default the checkpoint's ``sampling.steps``
      (``trainer.sampling.steps`` at training time).
    - ``guidance_scale`` (float): classifier-free guidance of ``class`` / ``attributes`` models;
      default the checkpoint's ``sampling.guidance_scale``.

    Output, one row per sample: ``seed``; ``image`` (nested list of floats in [0, 1], spatial
    shape, channel axis first only for multi-channel images, or None for a label-map generator);
    ``label`` (nested list of ints: the generated label map, the given one for ``mask`` models, or
    None); ``shape`` (the image's shape, else the label's).

    Sampling uses the checkpoint's sampler (``sampling.sampler``, ``sampling.eta``) with its training
    schedule through :meth:`Generator.sample <medsynth.diffusion.generator.Generator.sample>`, so a
    seed and condition give the same sample as in the generate stage, alone or in any batch.
    """

    def load_context(self, context: PythonModelContext) -> None:
        """Load the checkpoint artifact as a generator (on CUDA when available).

        The artifact is data: it is loaded through :meth:`Generator.from_checkpoint
        <medsynth.diffusion.generator.Generator.from_checkpoint>`, which checks its config, facts
        and weights first. A crafted or damaged artifact makes loading fail with that one-line
        :class:`~medsynth.MedsynthError`, so ``mlflow models serve`` exits instead of serving it.
        """
        self.load(context.artifacts["checkpoint"])

    def load(self, path: str | os.PathLike[str], *, device: torch.device | str | None = None) -> GeneratorModel:
        """Load the checkpoint at ``path`` (what :meth:`load_context` does with the logged artifact).

        Args:
            path: A medsynth training checkpoint.
            device: Where to sample; default CUDA when available, else the CPU.

        Returns:
            This model, ready to predict.

        Raises:
            MedsynthError: One line naming the file and the key, for a checkpoint that is not a
                medsynth generator or whose config, facts or weights are refused.
        """
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.generator = Generator.from_checkpoint(path, device=self.device)
        self.label_names: list[str] = list(self.generator.label_names)
        self.image_size: tuple[int, ...] = tuple(self.generator.image_size)
        self._lock = threading.Lock()  # the server predicts in threads; one sampling at a time bounds memory
        return self

    @property
    def settings(self) -> dict[str, Any]:
        """The checkpoint's sampling defaults: ``steps``, ``eta``, ``guidance_scale``; and ``batch_size``."""
        s = self.generator.sampling
        return {"steps": int(s.steps), "eta": float(s.eta), "guidance_scale": float(s.guidance_scale),
                "batch_size": BATCH_SIZE}

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
        if not rows:
            raise GeneratorInputError("no rows: give one row per sample, each with a seed")
        defaults = self.settings
        generator = self.generator
        prepared = [self._prepare(i, row, defaults, generator.guided) for i, row in enumerate(rows)]
        groups: dict[tuple[int, float], list[int]] = {}
        for i, item in enumerate(prepared):
            groups.setdefault((item["steps"], item["guidance_scale"]), []).append(i)
        out: list[dict[str, Any]] = [{} for _ in rows]
        for (steps, guidance_scale), members in groups.items():
            for start in range(0, len(members), defaults["batch_size"]):
                chunk = members[start : start + defaults["batch_size"]]
                seeds = [prepared[i]["seed"] for i in chunk]
                given = torch.stack([prepared[i]["label"] for i in chunk]) if generator.conditioning == "mask" else None
                codes = torch.cat([prepared[i]["codes"] for i in chunk]) if generator.guided else None
                with self._lock:
                    drawn = generator.sample(seeds, labels=given, codes=codes, steps=steps, eta=defaults["eta"],
                                             guidance_scale=guidance_scale)
                for k, i in enumerate(chunk):
                    image = _unbatch(drawn.images[k]) if drawn.images is not None else None
                    label = drawn.labels[k, 0].numpy().astype(np.int64) if drawn.labels is not None else None
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
                    f"{self.generator.conditioning!r} conditioning")
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
                item["codes"] = self.generator.model.encode_attributes(values)
            except MedsynthError as err:
                raise GeneratorInputError(f"{where}: prompt {prompt!r}: {err}") from None
        elif prompt:
            raise GeneratorInputError(
                f"{where}: this model ({self.generator.conditioning!r} conditioning) takes no prompt, got {prompt!r}")
        label_map = row.get("label_map")
        has_label = _given(label_map)
        if self.generator.conditioning == "mask":
            if not has_label:
                raise GeneratorInputError(
                    f"{where}: this model generates an image for a given label map: give label_map, a nested "
                    f"list of shape {list(self.image_size)} with values 0..{len(self.label_names) - 1} "
                    f"({', '.join(self.label_names)})")
            item["label"] = self._label_map(label_map, where)
        elif has_label:
            raise GeneratorInputError(
                f"{where}: this model ({self.generator.conditioning!r} conditioning) takes no label_map")
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


__all__ = ["BATCH_SIZE", "INPUT_COLUMNS", "OUTPUT_COLUMNS", "GeneratorInputError", "GeneratorModel", "parse_prompt"]
