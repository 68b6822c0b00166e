"""What a training run is built from besides its network: the condition vocabulary, the optimiser,
and the checks across the model, scheduler and trainer settings."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from medsynth import ConfigError
from medsynth.config.schema import check
from medsynth.config.settings import OPTIMIZERS, ModelSettings


def condition_vocabulary(model: ModelSettings, attribute_values: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """The attributes (and their values) a model is conditioned on, from the dataset's vocabulary.

    ``class`` uses ``model.class_key``; ``attributes`` uses ``model.attribute_keys`` (all the
    dataset's attributes when null); other modes use none.

    Args:
        model: The model settings.
        attribute_values: Every attribute of the dataset's records with its values.

    Returns:
        Attribute name -> values, in the order the model encodes them.

    Raises:
        ConfigError: If a named attribute is not in the dataset.
    """
    if model.conditioning == "class":
        keys = [model.class_key]
    elif model.conditioning == "attributes":
        keys = list(model.attribute_keys) if model.attribute_keys else sorted(attribute_values)
    else:
        return {}
    missing = [k for k in keys if k not in attribute_values]
    if missing:
        raise ConfigError(
            f"model.conditioning={model.conditioning} needs attribute(s) {missing}, but the dataset's records have "
            f"{sorted(attribute_values) or 'none'}; set model.class_key / model.attribute_keys or add attributes in preprocessing"
        )
    return {k: list(attribute_values[k]) for k in keys}


def build_optimizer(options: Mapping[str, Any], params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimiser ``trainer.optimizer`` describes, over ``params``.

    The class must be one of :data:`medsynth.config.settings.OPTIMIZERS`; every other key but
    ``_target_`` and ``_partial_`` is a plain keyword argument (``lr``, ``weight_decay``, ``betas``...).

    Args:
        options: The ``trainer.optimizer`` mapping.
        params: The parameters to optimise.

    Returns:
        The optimiser.

    Raises:
        ConfigError: For a class off the allow-list or an argument it does not take.
    """
    target = str(options.get("_target_"))
    check(target in OPTIMIZERS, "trainer.optimizer._target_", f"one of {', '.join(OPTIMIZERS)}", target)
    module, _, name = target.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    kwargs = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in options.items() if k not in ("_target_", "_partial_")}
    for key, value in kwargs.items():
        values = value if isinstance(value, list) else [value]
        check(
            all(isinstance(v, (bool, int, float, str)) for v in values),
            f"trainer.optimizer.{key}",
            "a number, flag or list of numbers",
            value,
        )
    try:
        return cls(list(params), **{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    except TypeError as err:
        raise ConfigError(f"trainer.optimizer: {target} does not accept these options ({err})") from None
