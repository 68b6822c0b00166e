"""What a model is conditioned on and what it generates: the names the config accepts, and the
prompt syntax. Plain Python, so checking a config needs no torch."""

from __future__ import annotations

from medsynth import ConfigError

CONDITIONING_MODES: tuple[str, ...] = ("mask", "joint", "class", "attributes", "none")
OUTPUTS: tuple[str, ...] = ("image", "label", "pair")
GUIDED_MODES: tuple[str, ...] = ("class", "attributes")
"""Modes whose condition can be dropped, which classifier-free guidance needs."""


def parse_prompt(text: str | None) -> dict[str, str]:
    """A prompt such as ``"age=60-70 sex=F"`` (spaces or commas between words) as ``{"age": "60-70", "sex": "F"}``.

    Raises:
        ConfigError: For a word that is not ``key=value``.
    """
    values: dict[str, str] = {}
    for word in (text or "").replace(",", " ").split():
        key, sep, value = word.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f'prompt {text!r}: {word!r} is not key=value (example: "age=60-70 sex=F")')
        values[key] = value
    return values


def default_output(conditioning: str) -> str:
    """What a mode generates unless told otherwise: a labelled pair for ``joint``, an image otherwise."""
    return "pair" if conditioning == "joint" else "image"


def check_mode(conditioning: str, output: str) -> None:
    """Reject unknown modes and combinations that make no sense, naming the config key."""
    if conditioning not in CONDITIONING_MODES:
        raise ConfigError(f"model.conditioning must be one of {CONDITIONING_MODES}, got {conditioning!r}")
    if output not in OUTPUTS:
        raise ConfigError(f"model.output must be one of {OUTPUTS}, got {output!r}")
    if conditioning == "mask" and output != "image":
        raise ConfigError("model.conditioning=mask generates an image for a given label map: use model.output=image")
    if conditioning == "joint" and output != "pair":
        raise ConfigError("model.conditioning=joint generates image and label together: use model.output=pair")


__all__ = ["CONDITIONING_MODES", "GUIDED_MODES", "OUTPUTS", "check_mode", "default_output", "parse_prompt"]
