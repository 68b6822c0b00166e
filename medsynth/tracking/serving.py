"""The trained generator as an MLflow pyfunc model: one row per sample in, images and label maps out.

:class:`GeneratorModel` is the code of every logged generator (see
:func:`medsynth.tracking.registry.log_generator`): it loads the logged checkpoint as a
:class:`medsynth.diffusion.generator.Generator`, checks each request row and samples through it,
so a seed and condition give the same sample here as in the generate stage.

Served by ``mlflow models serve``, a request is data from outside, so the work it causes is
bounded (:class:`ServeLimits`, docs/serving-limits.md): rows, steps, body size and a time budget
that is checked before every sampling step, together with the client leaving, the handler being
cancelled and the server being told to stop (SIGTERM). Every refusal is an HTTP 400 whose body is
the reason alone; an unexpected failure is a 500 with a generic message, its detail in the
server's log.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import faulthandler
import functools
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import CANCELLED, INTERNAL_ERROR, INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.pyfunc import PythonModel, PythonModelContext

from medsynth import ConfigError, MedsynthError
from medsynth.diffusion.denoiser import parse_prompt as _parse_prompt
from medsynth.diffusion.generator import Generator

INPUT_COLUMNS: tuple[str, ...] = ("seed", "prompt", "label_map", "steps", "guidance_scale")
OUTPUT_COLUMNS: tuple[str, ...] = ("seed", "image", "label", "shape")

BATCH_SIZE = 16
"""Samples drawn together by default; a sample does not depend on its batch, so this only bounds memory."""

MAX_SEED = 2**63 - 2
"""Largest seed: a sample's stochastic steps draw from seed + 1, which must fit a 64-bit seed."""

MAX_GUIDANCE_SCALE = 100.0
"""Largest ``guidance_scale`` accepted; far above any useful value, it keeps images finite."""

MAX_PROMPT_CHARS = 1000
"""Longest prompt accepted."""

_logger = logging.getLogger("medsynth.serving")


# ------------------------------------------------------------------------------------- limits


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of a served generator (docs/serving-limits.md).

    Each limit comes from, in order: the environment variable ``MEDSYNTH_SERVE_<NAME>``, the
    model's ``model_config`` (stored at log time by :func:`~medsynth.tracking.registry.log_generator`
    or given at load time), else the default here.

    Attributes:
        max_rows: Samples (rows) per request.
        batch_size: Samples drawn together; bounds memory, not results.
        max_steps: Sampling steps per sample; never above the training schedule's timesteps.
        time_limit: Seconds a request may take from arrival, waiting for its turn included;
            ``None``: 5 s under MLflow's request timeout (``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT``,
            60 s by default), so the client gets this limit's message rather than MLflow's bare 504.
        max_body_bytes: Size of a request body.
    """

    max_rows: int = 256
    batch_size: int = BATCH_SIZE
    max_steps: int | None = None
    time_limit: float | None = None
    max_body_bytes: int = 64 * 2**20

    def resolved(self, *, num_train_timesteps: int) -> ServeLimits:
        """These limits with ``max_steps`` capped at ``num_train_timesteps`` and ``time_limit`` set."""
        steps = num_train_timesteps if self.max_steps is None else min(self.max_steps, num_train_timesteps)
        limit = self.time_limit
        if limit is None:
            from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

            limit = max(1.0, float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()) - 5.0)
        return dataclasses.replace(self, max_steps=steps, time_limit=limit)


LIMIT_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ServeLimits))
"""Names of the limits: keys of ``model_config``; the environment variables are ``MEDSYNTH_SERVE_<NAME>``."""


def limit_variable(key: str) -> str:
    """The environment variable of limit ``key``, e.g. ``MEDSYNTH_SERVE_MAX_ROWS``."""
    return f"MEDSYNTH_SERVE_{key.upper()}"


def _limit_value(key: str, value: Any, where: str) -> int | float:
    """``value`` as limit ``key`` (an integer >= 1, or seconds > 0 for ``time_limit``), checked."""
    if key == "time_limit":
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
            raise MedsynthError(f"{where} must be a number of seconds > 0, got {value!r}")
        return number
    try:
        whole = float(value)
    except (TypeError, ValueError):
        whole = math.nan
    if isinstance(value, bool) or not math.isfinite(whole) or not whole.is_integer() or whole < 1:
        raise MedsynthError(f"{where} must be an integer >= 1, got {value!r}")
    return int(whole)


def serve_limits(config: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None) -> ServeLimits:
    """The limits of a served generator from its ``model_config`` and the environment.

    Args:
        config: The model's ``model_config``; keys among :data:`LIMIT_KEYS`, a ``None`` value
            meaning "the default". Other keys are refused.
        environ: The environment (default ``os.environ``); ``MEDSYNTH_SERVE_<NAME>`` overrides the config.

    Returns:
        The limits, not yet :meth:`~ServeLimits.resolved` against a model.

    Raises:
        MedsynthError: One line naming the key or variable, for an unknown key or a value out of range.
    """
    config = dict(config or {})
    environ = os.environ if environ is None else environ
    unknown = sorted(set(config) - set(LIMIT_KEYS))
    if unknown:
        raise MedsynthError(f"model_config: unknown serving limit(s) {unknown}; known: {list(LIMIT_KEYS)}")
    values: dict[str, Any] = {}
    for key in LIMIT_KEYS:
        variable = limit_variable(key)
        if environ.get(variable, "").strip():
            values[key] = _limit_value(key, environ[variable].strip(), variable)
        elif config.get(key) is not None:
            values[key] = _limit_value(key, config[key], f"model_config {key}")
    return ServeLimits(**values)


# ------------------------------------------------------------------------------------- errors


class GeneratorInputError(MlflowException, MedsynthError):
    """A request the generator cannot serve; a served model answers it with HTTP 400 and this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)
        self.reason = message  # MLflow's server rewrites ``message``; the reason stays as given


class RequestStopped(MlflowException, MedsynthError):
    """Sampling for a request stopped early: HTTP 503 (time limit, server stopping) or 499 (client gone)."""

    def __init__(self, message: str, *, error_code: int = TEMPORARILY_UNAVAILABLE) -> None:
        super().__init__(message, error_code=error_code)
        self.reason = message


class _Stop(Exception):
    """Raised between sampling steps when a request's budget says stop; carries why."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _StopFlag:
    """A flag a signal handler may set: one attribute store, no lock.

    A :class:`threading.Event` takes a lock in ``set()``. A second signal arriving while the first
    handler holds that lock runs the handler again, nested, in the same thread, which then waits
    for the lock forever: the event loop's thread deadlocks. (``mlflow models serve`` delivers
    SIGTERM twice to uvicorn when its process group is signalled: once directly and once as the
    parent-death signal of the ``mlflow`` process.)
    """

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


_SERVER_STOPPING = _StopFlag()
"""Set when the serving process is told to stop (SIGTERM, SIGINT); every request then stops at its next step."""


@dataclasses.dataclass
class RequestBudget:
    """When the work for one request must stop: its deadline, or a reason set from outside.

    Attributes:
        time_limit: Seconds the request may take.
        deadline: ``time.monotonic()`` value at which it runs out.
    """

    time_limit: float
    deadline: float
    _why: str | None = None

    @classmethod
    def start(cls, time_limit: float) -> RequestBudget:
        """A budget of ``time_limit`` seconds from now."""
        return cls(time_limit=time_limit, deadline=time.monotonic() + time_limit)

    def stop(self, why: str) -> None:
        """Ask the work to stop at its next check: ``client`` (gone) or ``cancelled`` (handler cancelled)."""
        self._why = self._why or why

    def check(self) -> None:
        """Raise :class:`_Stop` when the server is stopping, the request was stopped, or time ran out."""
        if _SERVER_STOPPING.is_set():
            raise _Stop("shutdown")
        if self._why is not None:
            raise _Stop(self._why)
        if time.monotonic() > self.deadline:
            raise _Stop("time")


class SamplingTurns:
    """A lock taken in order of arrival, whose waiters give up when their request's budget says stop.

    Requests wait for their turn to sample; a plain lock would let a late request overtake ones
    that waited longer, stretching the tail of the latency under load (and pushing some requests
    past their time limit). A request that gives up while waiting leaves the queue; if the turn
    was handed to it at that moment, it is passed on to the next.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._waiting: collections.deque[threading.Event] = collections.deque()
        self._held = False

    def acquire(self, budget: RequestBudget, *, poll: float = 0.05) -> None:
        """Wait for this caller's turn, checking ``budget`` every ``poll`` seconds.

        Raises:
            _Stop: When the budget says stop before the turn came; the caller then holds nothing.
        """
        with self._mutex:
            if not self._held and not self._waiting:
                self._held = True
                return
            turn = threading.Event()
            self._waiting.append(turn)
        try:
            while not turn.wait(poll):
                budget.check()
        except BaseException:
            with self._mutex:
                if turn.is_set():  # handed over just now: pass it on
                    self._hand_over()
                else:
                    self._waiting.remove(turn)
            raise

    def release(self) -> None:
        """End this caller's turn and give the next one to the longest waiting caller."""
        with self._mutex:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._waiting:
            self._waiting.popleft().set()  # the turn passes on; the lock stays held
        else:
            self._held = False


_REQUEST_BUDGET: contextvars.ContextVar[RequestBudget | None] = contextvars.ContextVar("medsynth_request_budget", default=None)
"""The budget of the HTTP request being served; MLflow's server runs ``predict`` in a thread that inherits it."""


def _stopped(why: str, *, done: int, total: int, time_limit: float) -> RequestStopped:
    """The error for a request whose sampling stopped after ``done`` of ``total`` samples."""
    progress = f"{done} of {total} samples drawn"
    if why == "time":
        return RequestStopped(
            f"the request ran past the serving time limit of {time_limit:g} s (MEDSYNTH_SERVE_TIME_LIMIT) with "
            f"{progress}; send fewer rows or steps per request"
        )
    if why == "shutdown":
        return RequestStopped(f"the server is shutting down; the request was stopped with {progress}: send it again")
    if why == "client":
        return RequestStopped(f"the client closed the connection; stopped with {progress}", error_code=CANCELLED)
    return RequestStopped(
        f"the request was cancelled by the server (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT); stopped with {progress}",
        error_code=CANCELLED,
    )


def _interruptible(scheduler: Any, budget: RequestBudget) -> Any:
    """``scheduler`` with every ``step`` preceded by ``budget.check()``, so sampling stops between steps."""
    step = scheduler.step

    def checked(*args: Any, **kwargs: Any) -> Any:
        budget.check()
        return step(*args, **kwargs)

    scheduler.step = checked
    return scheduler


# --------------------------------------------------------------------------------------- model


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

    - ``seed`` (int in 0..2^63-2, required): fixes the sample's starting noise.
    - ``prompt`` (str): attribute values for ``class`` / ``attributes`` models, e.g.
      ``"level=2 sex=F"``; attributes left out (or an empty prompt) are "not given".
    - ``label_map`` (nested list of ints, the model's image size): required by ``mask`` models.
    - ``steps`` (int, 1..``max_steps``): sampling steps; default the checkpoint's ``sampling.steps``
      (``trainer.sampling.steps`` at training time).
    - ``guidance_scale`` (float, 0..100): classifier-free guidance of ``class`` / ``attributes`` models;
      default the checkpoint's ``sampling.guidance_scale``.

    Output, one row per sample: ``seed``; ``image`` (nested list of floats in [0, 1], spatial
    shape, channel axis first only for multi-channel images, or None for a label-map generator);
    ``label`` (nested list of ints: the generated label map, the given one for ``mask`` models, or
    None); ``shape`` (the image's shape, else the label's).

    Sampling uses the checkpoint's sampler (``sampling.sampler``, ``sampling.eta``) with its training
    schedule through :meth:`Generator.sample <medsynth.diffusion.generator.Generator.sample>`, so a
    seed and condition give the same sample as in the generate stage, alone or in any batch.
    A request is bounded by :attr:`limits` (see :class:`ServeLimits`).
    """

    def load_context(self, context: PythonModelContext) -> None:
        """Load the checkpoint artifact as a generator (on CUDA when available), with its serving limits.

        The artifact is data: it is loaded through :meth:`Generator.from_checkpoint
        <medsynth.diffusion.generator.Generator.from_checkpoint>`, which checks its config, facts
        and weights first. A crafted or damaged artifact, or a serving limit out of range, makes
        loading fail with that one-line :class:`~medsynth.MedsynthError`, so ``mlflow models serve``
        exits instead of serving it. Inside ``mlflow models serve`` it also installs the request
        guard and the stop signal handler (:func:`install_serving_hooks`).
        """
        self.load(context.artifacts["checkpoint"], limits=serve_limits(context.model_config))
        if _in_scoring_server():
            install_serving_hooks(self)

    def load(
        self, path: str | os.PathLike[str], *, device: torch.device | str | None = None, limits: ServeLimits | None = None
    ) -> GeneratorModel:
        """Load the checkpoint at ``path`` (what :meth:`load_context` does with the logged artifact).

        Args:
            path: A medsynth training checkpoint.
            device: Where to sample; default CUDA when available, else the CPU.
            limits: What one request may ask (default: :func:`serve_limits` of the environment).

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
        self.limits = (limits or serve_limits()).resolved(num_train_timesteps=int(self.generator.scheduler.num_train_timesteps))
        self._turns = SamplingTurns()  # the server predicts in threads; one sampling at a time bounds memory
        return self

    @property
    def settings(self) -> dict[str, Any]:
        """The checkpoint's sampling defaults: ``steps``, ``eta``, ``guidance_scale``; and ``batch_size``."""
        s = self.generator.sampling
        return {
            "steps": int(s.steps),
            "eta": float(s.eta),
            "guidance_scale": float(s.guidance_scale),
            "batch_size": int(self.limits.batch_size),
        }

    @property
    def columns(self) -> tuple[str, ...]:
        """The input columns this model takes (``prompt`` for guided models, ``label_map`` for mask models)."""
        skip = {"prompt"} if not self.generator.guided else set()
        skip |= {"label_map"} if self.generator.conditioning != "mask" else set()
        return tuple(c for c in INPUT_COLUMNS if c not in skip)

    def predict(
        self, context: PythonModelContext | None, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
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
                label map, too many rows, or a setting out of range.
            RequestStopped: When the request's time limit ran out, its client left or the server is stopping.
            MlflowException: For an unexpected failure: a generic message, the detail in the log.
        """
        try:
            return pd.DataFrame(self.generate(_rows(model_input)), columns=list(OUTPUT_COLUMNS))
        except (GeneratorInputError, RequestStopped):
            raise
        except MedsynthError as err:
            raise GeneratorInputError(str(err)) from None
        except Exception as err:
            _logger.exception("the generator failed on a request")
            raise MlflowException(
                "the generator failed on this request; the server's log has the detail", error_code=INTERNAL_ERROR
            ) from err

    def generate(self, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """:meth:`predict` on plain row dicts; returns plain row dicts."""
        if not rows:
            raise GeneratorInputError("no rows: give one row per sample, each with a seed")
        if len(rows) > self.limits.max_rows:
            raise GeneratorInputError(_too_many_rows(len(rows), self.limits.max_rows))
        budget = _REQUEST_BUDGET.get() or RequestBudget.start(_resolved(self.limits.time_limit, "time_limit"))
        defaults = self.settings
        prepared = [self._prepare(i, row, defaults, self.generator.guided) for i, row in enumerate(rows)]
        groups: dict[tuple[int, float], list[int]] = {}
        for i, item in enumerate(prepared):
            groups.setdefault((item["steps"], item["guidance_scale"]), []).append(i)
        chunks = [
            members[start : start + defaults["batch_size"]]
            for members in groups.values()
            for start in range(0, len(members), defaults["batch_size"])
        ]
        out: list[dict[str, Any]] = [{} for _ in rows]
        done = 0
        try:
            self._turns.acquire(budget)
            try:
                for chunk in chunks:
                    self._draw(chunk, prepared, out, defaults["eta"], budget)
                    done += len(chunk)
            finally:
                self._turns.release()
        except _Stop as stop:
            error = _stopped(stop.why, done=done, total=len(rows), time_limit=budget.time_limit)
            _logger.warning("stopped a request: %s", error.reason)
            raise error from None
        return out

    def _draw(
        self, chunk: list[int], prepared: list[dict[str, Any]], out: list[dict[str, Any]], eta: float, budget: RequestBudget
    ) -> None:
        """Sample the rows ``chunk`` (same steps and guidance) in one batch into ``out``."""
        budget.check()
        generator = self.generator
        first = prepared[chunk[0]]
        seeds = [prepared[i]["seed"] for i in chunk]
        given = torch.stack([prepared[i]["label"] for i in chunk]) if generator.conditioning == "mask" else None
        codes = torch.cat([prepared[i]["codes"] for i in chunk]) if generator.guided else None
        drawn = generator.sample(
            seeds,
            labels=given,
            codes=codes,
            steps=first["steps"],
            eta=eta,
            guidance_scale=first["guidance_scale"],
            sampler=_interruptible(generator.sampler(), budget),
        )
        for k, i in enumerate(chunk):
            image = _unbatch(drawn.images[k]) if drawn.images is not None else None
            label = drawn.labels[k, 0].numpy().astype(np.int64) if drawn.labels is not None else None
            out[i] = {
                "seed": seeds[k],
                "image": image.tolist() if image is not None else None,
                "label": label.tolist() if label is not None else None,
                "shape": list(image.shape if image is not None else label.shape if label is not None else ()),
            }

    def _prepare(self, index: int, row: Mapping[str, Any], defaults: Mapping[str, Any], guided: bool) -> dict[str, Any]:
        """Check one row and turn it into a seed, settings and the model's condition inputs."""
        where = f"row {index}"
        unknown = sorted(set(row) - set(INPUT_COLUMNS))
        if unknown:
            raise GeneratorInputError(f"{where}: unknown column(s) {unknown}; the generator takes {list(INPUT_COLUMNS)}")
        if not _given(row.get("seed")):
            raise GeneratorInputError(f"{where}: a seed (int) is required")
        seed = _integer(row["seed"], f"{where}: seed")
        if not 0 <= seed <= MAX_SEED:
            raise GeneratorInputError(f"{where}: seed must be in 0..{MAX_SEED}, got {seed}")
        steps = _integer(row["steps"], f"{where}: steps") if _given(row.get("steps")) else defaults["steps"]
        if steps < 1:
            raise GeneratorInputError(f"{where}: steps must be >= 1, got {steps}")
        max_steps = int(_resolved(self.limits.max_steps, "max_steps"))
        if steps > max_steps:
            raise GeneratorInputError(_too_many_steps(where, steps, max_steps, int(self.generator.scheduler.num_train_timesteps)))
        item: dict[str, Any] = {
            "seed": seed,
            "steps": steps,
            "guidance_scale": self._guidance_scale(row, where, defaults, guided),
        }
        prompt = str(row["prompt"]) if _given(row.get("prompt")) else None
        if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
            raise GeneratorInputError(f"{where}: prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
        if guided:
            item["codes"] = self._codes(prompt, where)
        elif prompt:
            raise GeneratorInputError(
                f"{where}: this model ({self.generator.conditioning!r} conditioning) takes no prompt, got {prompt!r}"
            )
        label_map = row.get("label_map")
        has_label = _given(label_map)
        if self.generator.conditioning == "mask":
            if not has_label:
                raise GeneratorInputError(
                    f"{where}: this model generates an image for a given label map: give label_map, a nested "
                    f"list of shape {list(self.image_size)} with values 0..{len(self.label_names) - 1} "
                    f"({', '.join(self.label_names)})"
                )
            item["label"] = self._label_map(label_map, where)
        elif has_label:
            raise GeneratorInputError(f"{where}: this model ({self.generator.conditioning!r} conditioning) takes no label_map")
        return item

    def _guidance_scale(self, row: Mapping[str, Any], where: str, defaults: Mapping[str, Any], guided: bool) -> float:
        """The row's guidance scale, checked (1 for unguided models, the checkpoint's default when not given)."""
        if not _given(row.get("guidance_scale")):
            return float(defaults["guidance_scale"]) if guided else 1.0
        try:
            scale = float(row["guidance_scale"])
        except (TypeError, ValueError):
            raise GeneratorInputError(f"{where}: guidance_scale must be a number, got {row['guidance_scale']!r}") from None
        if not 0.0 <= scale <= MAX_GUIDANCE_SCALE:
            raise GeneratorInputError(f"{where}: guidance_scale must be in 0..{MAX_GUIDANCE_SCALE:g}, got {scale}")
        if not guided and scale != 1.0:
            raise GeneratorInputError(
                f"{where}: guidance_scale applies to class/attributes models; this one uses "
                f"{self.generator.conditioning!r} conditioning"
            )
        return scale

    def _codes(self, prompt: str | None, where: str) -> torch.Tensor:
        """The attribute codes of a guided model's prompt."""
        try:
            values = parse_prompt(prompt)
        except GeneratorInputError as err:
            raise GeneratorInputError(f"{where}: {err.reason}") from None
        try:
            return self.generator.model.encode_attributes(values)
        except MedsynthError as err:
            raise GeneratorInputError(f"{where}: prompt {prompt!r}: {err}") from None

    def _label_map(self, value: Any, where: str) -> torch.Tensor:
        """A label map given as nested lists as a ``(1, *spatial)`` long tensor, checked."""
        try:
            array = np.asarray(_nested(value), dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise GeneratorInputError(
                f"{where}: label_map must be a nested list of integers of shape {list(self.image_size)}"
            ) from None
        if array.shape == (1, *self.image_size):
            array = array[0]
        if array.shape != self.image_size:
            raise GeneratorInputError(
                f"{where}: label_map has shape {list(array.shape)}, the model generates {list(self.image_size)}"
            )
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise GeneratorInputError(f"{where}: label_map must hold integer label values")
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= len(self.label_names):
            raise GeneratorInputError(
                f"{where}: label_map values must be in 0..{len(self.label_names) - 1} ({', '.join(self.label_names)}), "
                f"got {low}..{high}"
            )
        return torch.from_numpy(array.astype(np.int64))[None]


def _too_many_rows(rows: int, limit: int) -> str:
    return f"the request has {rows} rows; at most {limit} per request (MEDSYNTH_SERVE_MAX_ROWS): split it"


def _too_many_steps(where: str, steps: int, limit: int, timesteps: int) -> str:
    why = (
        f"the training schedule has {timesteps} timesteps"
        if limit == timesteps
        else f"the serving limit is {limit} (MEDSYNTH_SERVE_MAX_STEPS)"
    )
    return f"{where}: steps must be at most {limit} ({why}), got {steps}"


def _nested(value: Any) -> Any:
    """Lists of numpy arrays (how MLflow hands over nested array columns) as plain nested lists."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [_nested(v) for v in value]
    if isinstance(value, (list, tuple)):
        return [_nested(v) for v in value]
    return value


def _integer(value: Any, what: str) -> int:
    """``value`` as an int, refusing fractions, booleans and non-numbers."""
    if isinstance(value, (bool, np.bool_)):
        raise GeneratorInputError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
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
        f"the generator takes a table of rows (a DataFrame, a list of dicts or a dict of columns), got {type(model_input).__name__}"
    )


# ------------------------------------------------------------------------- the HTTP request check

DATA_KEYS: tuple[str, ...] = ("dataframe_split", "dataframe_records", "inputs", "instances")
"""The JSON keys that carry rows (MLflow's scoring protocol); a body has exactly one of them."""

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "seed": (int,),
    "steps": (int,),
    "guidance_scale": (int, float),
    "prompt": (str,),
    "label_map": (list,),
}
_TYPE_NAMES = {
    "seed": "an integer",
    "steps": "an integer",
    "guidance_scale": "a number",
    "prompt": "a string",
    "label_map": "a nested list of integers",
}


def _refuse_constant(name: str) -> Any:
    raise GeneratorInputError(f"the body holds {name}, which is not a JSON number")


def decode_request(body: bytes, content_type: str | None) -> Any:
    """The JSON value of a request body, refusing other content types, bad encodings and deep nesting.

    Args:
        body: The request body.
        content_type: Its ``Content-Type`` header.

    Returns:
        The decoded JSON value.

    Raises:
        GeneratorInputError: For a body that is not UTF-8 JSON (with the reason).
    """
    mime, *parameters = [part.strip().lower() for part in (content_type or "").split(";")]
    if mime != "application/json":
        raise GeneratorInputError(
            f"send the rows as JSON with Content-Type: application/json, got Content-Type {content_type or 'none'!r}"
        )
    charset = dict(p.partition("=")[::2] for p in parameters).get("charset", "utf-8").strip('"')
    if charset not in ("utf-8", "utf8"):
        raise GeneratorInputError(f"the body must be UTF-8 JSON, got charset {charset!r}")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as err:
        raise GeneratorInputError(f"the body is not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise GeneratorInputError(f"the body is not JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise GeneratorInputError("the body nests JSON arrays or objects deeper than the server parses") from None


def request_rows(payload: Any) -> list[Mapping[str, Any]]:
    """The rows of a decoded request in any of MLflow's JSON layouts (:data:`DATA_KEYS`).

    Args:
        payload: The decoded JSON body.

    Returns:
        The rows as mappings of column to JSON value.

    Raises:
        GeneratorInputError: For a body that is not one of those layouts.
    """
    layouts = f"an object with one of {list(DATA_KEYS)}"
    if not isinstance(payload, dict):
        raise GeneratorInputError(f"the body must be {layouts}, got a JSON {_json_kind(payload)}")
    keys = sorted(payload)
    found = [k for k in keys if k in DATA_KEYS]
    if len(found) != 1 or len(keys) != 1:
        extra = [k[:40] for k in keys if k not in DATA_KEYS][:5]
        raise GeneratorInputError(
            f"the body must be {layouts} and nothing else"
            + (f"; it has {extra}" if extra else f"; it has {found or 'none'}")
            + ("; settings are per-row columns, not params" if "params" in keys else "")
        )
    key = found[0]
    data = payload[key]
    if key == "dataframe_split":
        return _split_rows(data)
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return data
    if key != "dataframe_records" and isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) > 1:
            raise GeneratorInputError(f"{key}: columns have different lengths")
        return [{k: v[i] for k, v in data.items()} for i in range(lengths.pop() if lengths else 0)]
    raise GeneratorInputError(
        f"{key} must be a list of row objects"
        + ("" if key == "dataframe_records" else " or an object of equal-length column lists")
    )


def _split_rows(data: Any) -> list[Mapping[str, Any]]:
    """The rows of a ``dataframe_split`` value (``columns``, ``data``, optional ``index``)."""
    if not isinstance(data, dict) or not set(data) <= {"columns", "data", "index"} or "data" not in data:
        raise GeneratorInputError("dataframe_split must be an object with columns, data and optionally index")
    columns, values = data.get("columns"), data["data"]
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise GeneratorInputError("dataframe_split.columns must be a list of column names")
    if len(set(columns)) != len(columns):
        raise GeneratorInputError("dataframe_split.columns names a column twice")
    if not isinstance(values, list) or not all(isinstance(r, list) and len(r) == len(columns) for r in values):
        raise GeneratorInputError(f"dataframe_split.data must be a list of rows of {len(columns)} values each")
    return [dict(zip(columns, r)) for r in values]


def _json_kind(value: Any) -> str:
    for kind, types in (("object", dict), ("array", list), ("string", str), ("boolean", bool), ("number", (int, float))):
        if isinstance(value, types):
            return kind
    return "null"


def check_request(
    payload: Any,
    *,
    columns: Sequence[str],
    required: Sequence[str],
    image_size: Sequence[int],
    max_rows: int,
    max_steps: int | None = None,
    num_train_timesteps: int | None = None,
) -> int:
    """Check a decoded request before MLflow parses it: layout, row count, column names, JSON types and steps.

    MLflow's own parsing casts (a seed of 1.5 becomes 1), drops unknown columns and cannot parse
    deep nesting; this check refuses all of those with a reason. The steps limit is checked here
    too, so a request over it is refused at once rather than after waiting for a worker thread.
    Other values (ranges, label values, prompts) are checked by :meth:`GeneratorModel.predict`.

    Args:
        payload: The decoded JSON body.
        columns: The columns the model takes.
        required: The columns every row must give.
        image_size: The shape a ``label_map`` must have.
        max_rows: Rows per request.
        max_steps: Sampling steps per row (``None``: not checked here).
        num_train_timesteps: The training schedule's length, named in the message when it is the limit.

    Returns:
        The number of rows.

    Raises:
        GeneratorInputError: One line naming the row and column at fault.
    """
    rows = request_rows(payload)
    if not rows:
        raise GeneratorInputError("no rows: give one row per sample, each with a seed")
    if len(rows) > max_rows:
        raise GeneratorInputError(_too_many_rows(len(rows), max_rows))
    for index, row in enumerate(rows):
        unknown = sorted(str(c)[:40] for c in set(row) - set(columns))
        if unknown:
            raise GeneratorInputError(f"row {index}: unknown column(s) {unknown[:10]}; this model takes {list(columns)}")
        for name in required:
            if row.get(name) is None:
                raise GeneratorInputError(f"row {index}: {name} is required")
        for name, value in row.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, _JSON_TYPES[name])):
                raise GeneratorInputError(f"row {index}: {name} must be {_TYPE_NAMES[name]}, got a JSON {_json_kind(value)}")
            if isinstance(value, int) and not -(2**63) <= value < 2**63:
                raise GeneratorInputError(f"row {index}: {name} is out of range (more than 64 bits)")
        steps = row.get("steps")
        if max_steps is not None and isinstance(steps, int):
            if steps < 1:
                raise GeneratorInputError(f"row {index}: steps must be >= 1, got {steps}")
            if steps > max_steps:
                raise GeneratorInputError(_too_many_steps(f"row {index}", steps, max_steps, num_train_timesteps or max_steps))
        if row.get("label_map") is not None:
            _check_grid(row["label_map"], tuple(image_size), f"row {index}: label_map")
    return len(rows)


def _check_grid(value: list[Any], shape: tuple[int, ...], where: str) -> None:
    """Refuse a label map that is not a nested list of integers of ``shape`` (or ``(1, *shape)``)."""
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError):
        raise GeneratorInputError(f"{where} must be a nested list of integers of shape {list(shape)}; it is ragged") from None
    if array.shape == (1, *shape):
        array = array[0]
    if array.shape != shape:
        raise GeneratorInputError(f"{where} has shape {list(array.shape)}, the model generates {list(shape)}")
    if array.dtype.kind not in "iu":
        raise GeneratorInputError(
            f"{where} must hold integers, got {'booleans' if array.dtype.kind == 'b' else array.dtype.name}"
        )


# ------------------------------------------------------------------------ hooks into MLflow's server

_HOOKS_INSTALLED = False


def _in_scoring_server() -> bool:
    """Whether this process is MLflow's scoring server loading its model (``mlflow models serve``).

    That server imports ``mlflow.pyfunc.scoring_server`` and names the model in the environment
    variable ``__pyfunc_model_path__`` before it loads the model; nothing else does both.
    """
    module = sys.modules.get("mlflow.pyfunc.scoring_server")
    return module is not None and bool(os.environ.get(getattr(module, "_SERVER_MODEL_PATH", "__pyfunc_model_path__")))


def install_serving_hooks(model: GeneratorModel) -> bool:
    """Guard MLflow's ``/invocations`` endpoint with :func:`guard_endpoint` and make SIGTERM stop sampling.

    MLflow's scoring server (``mlflow.pyfunc.scoring_server``) loads the model first and builds its
    FastAPI app after, wrapping the ``/invocations`` handler in ``_async_catch_mlflow_exception``,
    which it looks up when it builds the app. Loading the model replaces that wrapper with one that
    checks the request first and answers every error with its reason alone. uvicorn's SIGTERM
    handler (graceful shutdown: wait for open requests) is chained after one that tells running
    requests to stop at their next sampling step; the guarded endpoint renews that chain before
    each request, since uvicorn may install its handlers after the model is loaded.

    Args:
        model: The loaded model.

    Returns:
        True when the request guard is installed; False (with a warning in the log) when this
        version of MLflow's server has no such wrapper, so requests are served unguarded (the
        model's own limits still hold).
    """
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return True
    _install_stop_handler()
    _install_stack_dump()
    from mlflow.pyfunc import scoring_server

    original = getattr(scoring_server, "_async_catch_mlflow_exception", None)
    if not callable(original):
        _logger.warning("this MLflow scoring server has no _async_catch_mlflow_exception; requests are not pre-checked")
        return False

    def wrap(endpoint: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        return guard_endpoint(endpoint, model)

    scoring_server._async_catch_mlflow_exception = wrap
    _HOOKS_INSTALLED = True
    return True


def _install_stop_handler() -> None:
    """Chain a handler before the current SIGTERM/SIGINT handlers that tells running requests to stop.

    Idempotent, and called again before every request: uvicorn installs its own handlers after
    the model is loaded (0.30 and later load the app first), replacing one chained at load time,
    so the chain is renewed from the event loop's (main) thread whenever the current handler is
    not this one. A default or ignored handler is left alone: nothing then waits for open requests.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if not callable(previous) or getattr(previous, "_medsynth_stop", False):
            continue

        def on_signal(number: int, frame: Any, previous: Callable[[int, Any], Any] = previous) -> None:
            _SERVER_STOPPING.set()
            previous(number, frame)

        on_signal._medsynth_stop = True  # type: ignore[attr-defined]
        signal.signal(signum, on_signal)


def _install_stack_dump() -> None:
    """Make SIGUSR1 write every thread's Python stack to the server's log (stderr).

    :mod:`faulthandler` writes from the signal handler itself, in whichever thread receives the
    signal, so the dump comes even when the event loop's thread is stuck: ``kill -USR1 PID`` of the
    ``uvicorn`` process shows where a server that stopped answering waits.
    """
    if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)


def guard_endpoint(endpoint: Callable[..., Awaitable[Any]], model: GeneratorModel) -> Callable[..., Awaitable[Any]]:
    """MLflow's ``/invocations`` handler behind the request check, the time budget and clean errors.

    The guarded handler reads the body up to ``max_body_bytes``, checks it (:func:`decode_request`,
    :func:`check_request`), then calls ``endpoint`` with the request's :class:`RequestBudget` in
    context (MLflow runs ``predict`` in a thread that inherits it). While it runs, a watcher waits
    for the client to disconnect; a disconnect or a cancelled handler stops the budget, so sampling
    stops at its next step. Errors become JSON ``{"error_code", "message"}`` with the reason alone:
    no stack trace, no echo of the request; anything unexpected is a 500 with a generic message and
    its traceback in the server's log.

    Args:
        endpoint: MLflow's handler, ``async (request) -> Response``.
        model: The served model (its limits and input columns).

    Returns:
        The guarded handler, with ``endpoint``'s signature (FastAPI injects the request by it).
    """

    @functools.wraps(endpoint)
    async def guarded(request: Any) -> Any:
        from starlette.requests import Request

        limits = model.limits
        budget = RequestBudget.start(_resolved(limits.time_limit, "time_limit"))
        _install_stop_handler()
        try:
            body = await _read_body(request, int(limits.max_body_bytes))
            check = functools.partial(_check_body, model, body, request.headers.get("content-type"))
            # a large body takes a while to parse: off the event loop, so other requests are still answered
            if len(body) > _INLINE_CHECK_BYTES:
                await asyncio.to_thread(check)
            else:
                check()
        except MlflowException as err:
            return _error_response(err)
        replay = Request(request.scope, _replaying(body, request.receive))
        watcher = asyncio.ensure_future(_watch_disconnect(request.receive, budget))
        token = _REQUEST_BUDGET.set(budget)
        try:
            return await endpoint(replay)
        except asyncio.CancelledError:
            budget.stop("cancelled")
            raise
        except MlflowException as err:
            return _error_response(err)
        except Exception:
            _logger.exception("unexpected error while serving a request")
            return _error_response(
                MlflowException("the server failed on this request; its log has the detail", error_code=INTERNAL_ERROR)
            )
        finally:
            _REQUEST_BUDGET.reset(token)
            watcher.cancel()

    return guarded


_INLINE_CHECK_BYTES = 2**20
"""Bodies up to this size are checked on the event loop; larger ones in a worker thread."""


def _check_body(model: GeneratorModel, body: bytes, content_type: str | None) -> None:
    """:func:`decode_request` and :func:`check_request` of a body against ``model``'s columns and limits."""
    limits = model.limits
    check_request(
        decode_request(body, content_type),
        columns=model.columns,
        required=[c for c in ("seed", "label_map") if c in model.columns],
        image_size=model.image_size,
        max_rows=int(limits.max_rows),
        max_steps=int(_resolved(limits.max_steps, "max_steps")),
        num_train_timesteps=int(model.generator.scheduler.num_train_timesteps),
    )


async def _read_body(request: Any, limit: int) -> bytes:
    """The request body, refused as soon as it is known to be over ``limit`` bytes."""
    too_big = f"bytes; at most {limit} per request (MEDSYNTH_SERVE_MAX_BODY_BYTES): send fewer rows"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise GeneratorInputError(f"the request body has {int(declared)} {too_big}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise GeneratorInputError(f"the request body has more than {limit} {too_big}")
        chunks.append(chunk)
    return b"".join(chunks)


def _replaying(body: bytes, receive: Callable[[], Awaitable[dict[str, Any]]]) -> Callable[[], Awaitable[dict[str, Any]]]:
    """An ASGI ``receive`` that gives ``body`` once, then passes on to ``receive``."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _watch_disconnect(receive: Callable[[], Awaitable[dict[str, Any]]], budget: RequestBudget) -> None:
    """Wait for the client to disconnect (after its body was read) and stop the request's budget then."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            budget.stop("client")
            return


_PREDICT_PREFIX = re.compile(r"^Failed to predict data '.*?'\. \nError: ", re.DOTALL)


def _error_response(err: MlflowException) -> Any:
    """A JSON response with the error's code and reason alone (no stack trace, no echo of the data)."""
    from starlette.responses import Response

    message = getattr(err, "reason", None) or _PREDICT_PREFIX.sub("", err.message, count=1)
    if len(message) > 1000:
        message = message[:1000] + " ..."
    body = json.dumps({"error_code": err.error_code, "message": message})
    return Response(content=body, status_code=err.get_http_status_code(), media_type="application/json")


__all__ = [
    "BATCH_SIZE",
    "DATA_KEYS",
    "INPUT_COLUMNS",
    "LIMIT_KEYS",
    "MAX_GUIDANCE_SCALE",
    "MAX_PROMPT_CHARS",
    "MAX_SEED",
    "OUTPUT_COLUMNS",
    "GeneratorInputError",
    "GeneratorModel",
    "RequestBudget",
    "RequestStopped",
    "SamplingTurns",
    "ServeLimits",
    "check_request",
    "decode_request",
    "guard_endpoint",
    "install_serving_hooks",
    "limit_variable",
    "parse_prompt",
    "request_rows",
    "serve_limits",
]


def _resolved(value: float | None, name: str) -> float:
    """A limit that :meth:`ServeLimits.resolved` has set (a model's limits always are)."""
    if value is None:
        raise RuntimeError(f"serving limit {name} was not resolved")
    return float(value)
