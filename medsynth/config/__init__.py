"""The config: where ``conf/`` is, composing it, and turning it into checked, typed settings.

``conf/`` is the repository's top-level config folder; a wheel carries it as ``medsynth/conf``.
:func:`load_settings` is the one place a composed config becomes :class:`PipelineSettings`;
every key is checked there (:mod:`medsynth.config.schema`), so a typo or a bad value stops a
stage before it reads any data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medsynth import ConfigError
from medsynth.config.schema import from_mapping, to_mapping, unknown_key_message
from medsynth.config.settings import (
    DataSettings,
    DifferentialPrivacySettings,
    EncoderSettings,
    EvaluateSettings,
    GenerateSettings,
    MlflowSettings,
    ModelSettings,
    PathsSettings,
    PipelineSettings,
    PrivacySettings,
    RunSettings,
    SchedulerSettings,
    TrainerSettings,
)

__all__ = [
    "DataSettings",
    "DifferentialPrivacySettings",
    "EncoderSettings",
    "EvaluateSettings",
    "GenerateSettings",
    "MlflowSettings",
    "ModelSettings",
    "PathsSettings",
    "PipelineSettings",
    "PrivacySettings",
    "RunSettings",
    "SchedulerSettings",
    "TrainerSettings",
    "compose",
    "config_dir",
    "expand_aliases",
    "load_settings",
    "to_mapping",
]

ALIASES: dict[str, str] = {
    "trainer.privacy=dp": "trainer.privacy.enabled=true",
    "trainer.privacy=off": "trainer.privacy.enabled=false",
}
"""Short overrides and what they stand for: ``trainer.privacy=dp`` turns DP-SGD on and still lets
``trainer.privacy.target_epsilon=E`` (and the group's other keys) be set beside it."""


def expand_aliases(overrides: Sequence[str]) -> list[str]:
    """``overrides`` with each alias of :data:`ALIASES` replaced by the override it stands for.

    Args:
        overrides: Hydra overrides as typed.

    Returns:
        The overrides Hydra is given.
    """
    return [ALIASES.get(arg, arg) for arg in overrides]


def config_dir() -> Path:
    """The folder holding ``config.yaml``: ``medsynth/conf`` in an installed wheel, ``conf/`` in a checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise RuntimeError(f"medsynth's config folder is missing (looked in {package / 'conf'} and {package.parent / 'conf'})")


def load_settings(config: Mapping[str, Any]) -> PipelineSettings:
    """Check a composed, resolved config and return it as typed settings.

    Args:
        config: The config as plain containers (``OmegaConf.to_container(cfg, resolve=True)``).

    Returns:
        The settings of every group.

    Raises:
        ConfigError: For an unknown key, a value of the wrong type or out of range; the message names the key.
    """
    return from_mapping(PipelineSettings, config)


def compose(overrides: Sequence[str] = ()) -> PipelineSettings:
    """Compose ``conf/config.yaml`` with Hydra overrides and check it, as the command line does.

    Args:
        overrides: Hydra overrides, e.g. ``["trainer.max_steps=10", "paths.output=/tmp/run"]``.

    Returns:
        The checked settings.

    Raises:
        ConfigError: For an override Hydra cannot apply, or a config that fails the checks.
    """
    return load_settings(compose_container(overrides))


def compose_container(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The composed config with ``overrides`` as resolved plain containers (Hydra's compose API).

    Args:
        overrides: Hydra overrides.

    Returns:
        The config as nested dicts and lists, unchecked.

    Raises:
        ConfigError: For an override Hydra cannot apply (an unknown key or preset, bad syntax),
            in one line that names the key and what it accepts.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=expand_aliases(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(hydra_error_message(err)) from None
    return resolve(cfg)


def resolve(cfg: Any) -> dict[str, Any]:
    """A DictConfig as resolved plain containers; a missing mandatory value is a :class:`ConfigError`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} is required (it is ??? in the config)") from None
    except OmegaConfBaseException as err:
        raise ConfigError(hydra_error_message(err)) from None


_NOT_IN_STRUCT = re.compile(r"^Could not override '([^']+)'")


def hydra_error_message(err: BaseException) -> str:
    """Hydra's or OmegaConf's error about a config as one line that names the key and what it accepts.

    ``Could not override 'x.y'`` (a key the config lacks) becomes ``unknown config key x.y; x
    accepts: ...``; ``Could not find 'data/foo'`` becomes ``unknown option data=foo; data accepts:
    ...``; other messages keep their text, joined into one line.

    Args:
        err: A ``hydra.errors.HydraException`` or ``omegaconf.errors.OmegaConfBaseException``.

    Returns:
        The message.
    """
    from hydra.errors import MissingConfigException, OverrideParseException

    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    cause = err.__cause__
    unknown = _NOT_IN_STRUCT.match(lines[0])
    if unknown and "not in struct" in str(cause):
        return unknown_key_message(PipelineSettings, getattr(cause, "full_key", None) or unknown.group(1))
    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        return f"unknown option {group}={option}; {group} accepts: {', '.join(sorted(err.options))}"
    if isinstance(err, OverrideParseException):
        return "; ".join(lines[:2])
    full_key = getattr(err, "full_key", None)  # OmegaConf's errors say which key
    if full_key:
        return f"{full_key}: {lines[0]}"
    if cause is not None and str(cause).strip():  # e.g. "Error merging override k=v" because of a type clash
        return f"{lines[0]}: {hydra_error_message(cause)}"
    kept = []
    for line in lines:
        if line.startswith(("See http", "Config search path", "full_key:", "object_type=")):
            break
        kept.append(line)
    return "; ".join(kept or lines[:1])
