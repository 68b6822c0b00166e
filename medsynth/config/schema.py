"""Plain mappings into typed settings dataclasses, checked key by key.

The settings dataclasses are the schema of the config: :func:`from_mapping` walks a mapping (the
resolved Hydra config, or anything a notebook passes) against a dataclass's fields and type hints.
An unknown key, a missing value or a value of the wrong type raises :class:`ConfigError` with the
dotted key and what it accepts, so a typo fails before any data is read. Range rules live in each
dataclass's ``__post_init__`` and use :func:`check`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

from medsynth import ConfigError

T = TypeVar("T")


def check(condition: bool, key: str, accepts: str, value: Any) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``condition`` holds.

    Args:
        condition: The rule the value must meet.
        key: The dotted config key, e.g. ``generate.steps``.
        accepts: What the key accepts, e.g. ``"an integer >= 1"``.
        value: The value given.
    """
    if not condition:
        raise ConfigError(f"{key} must be {accepts}, got {value!r}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of a settings class (cached: resolving them is slow)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, *, key: str = "") -> T:
    """Build the settings dataclass ``cls`` from ``data``, checking every key and value.

    Args:
        cls: A dataclass whose fields have type hints (nested dataclasses, ``Literal``, optional,
            ``list``/``tuple``/``dict`` of those, and the scalars ``int``, ``float``, ``bool``, ``str``).
        data: The values; keys left out take the field's default.
        key: Dotted prefix of ``data`` in the whole config, used in messages.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: For an unknown key, a missing required key, a value of the wrong type, or a
            value its ``__post_init__`` rejects; the message names the dotted key.
    """
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key or 'config'} must be a group of keys, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{key}.{unknown[0]}" if key else unknown[0]
        raise ConfigError(f"unknown config key {where}; {key or 'the root'} accepts: {', '.join(sorted(fields))}")
    hints = _hints(cls)
    values = {}
    for name, field in fields.items():
        dotted = f"{key}.{name}" if key else name
        if name in data:
            values[name] = convert(hints[name], data[name], key=dotted)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{dotted} is required")
    return cls(**values)


def unknown_key_message(cls: type, dotted: str) -> str:
    """The one-line error for a key that ``dotted`` names but the config does not hold.

    Walks the schema ``cls`` along ``dotted`` and names the first part it lacks with what that
    group accepts; a free-form mapping (a network's arguments, say) is told how to add a key.

    Args:
        cls: The root settings dataclass (:class:`~medsynth.config.settings.PipelineSettings`).
        dotted: The dotted key, e.g. ``trainer.max_stepz``.

    Returns:
        The message, e.g. ``unknown config key trainer.max_stepz; trainer accepts: accumulate, ...``.
    """
    hint: Any = cls
    prefix = ""
    for part in dotted.split("."):
        key = f"{prefix}.{part}" if prefix else part
        group = _group(hint)
        if group is None:
            if _free_form(hint):
                return f"unknown config key {dotted}; {prefix} takes any key: add one with +{dotted}=VALUE"
            return f"unknown config key {dotted}; {prefix} is a single value, not a group of keys"
        fields = {f.name for f in dataclasses.fields(group) if f.init}
        if part not in fields:
            return f"unknown config key {key}; {prefix or 'the root'} accepts: {', '.join(sorted(fields))}"
        hint, prefix = _hints(group)[part], key
    return f"config key {dotted} is not set by the chosen presets; add it with +{dotted}=VALUE"


def _group(hint: Any) -> type | None:
    """The dataclass ``hint`` stands for (also inside ``X | None``), else None."""
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    if typing.get_origin(hint) in (Union, types.UnionType):
        return next((a for a in typing.get_args(hint) if isinstance(a, type) and dataclasses.is_dataclass(a)), None)
    return None


def _free_form(hint: Any) -> bool:
    """Whether ``hint`` is a mapping of arbitrary keys (also inside ``X | None``)."""
    if hint is Any or typing.get_origin(hint) is dict:
        return True
    return typing.get_origin(hint) in (Union, types.UnionType) and any(_free_form(a) for a in typing.get_args(hint))


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return "a group of keys"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def convert(hint: Any, value: Any, *, key: str) -> Any:
    """``value`` as the type ``hint`` describes, or :class:`ConfigError` naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        group = _group(hint)
        if group is not None and isinstance(value, Mapping):  # a group of keys: its own messages name the key at fault
            return convert(group, value, key=key)
        for option in (a for a in args if a is not type(None)):
            try:
                return convert(option, value, key=key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {_describe(hint)}, got {value!r}")
    if origin is Literal:
        check(value in args, key, _describe(hint), value)
        return value
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_mapping(hint, value, key=key)  # type: ignore[arg-type]
    if origin in (list, tuple):
        check(isinstance(value, (list, tuple)), key, _describe(hint), value)
        item = args[0] if args else Any
        items = [convert(item, v, key=f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        check(isinstance(value, Mapping), key, "a mapping", value)
        value_hint = args[1] if args else Any
        return {str(k): convert(value_hint, v, key=f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        check(isinstance(value, bool), key, "true or false", value)
        return value
    if hint is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        return value
    if hint is float:
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value)
        return float(value)
    if hint is str:
        check(isinstance(value, (str, int, float)) and not isinstance(value, bool), key, "a string", value)
        return str(value)
    raise TypeError(f"{key}: no conversion for type {hint!r}")  # a schema bug, not a user error


def to_mapping(settings: Any) -> dict[str, Any]:
    """A settings dataclass as plain nested dicts and lists (what checkpoints and MLflow params store)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(settings)
