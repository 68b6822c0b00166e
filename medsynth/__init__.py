"""medsynth: synthetic, labelled medical imaging data with audited realism and privacy.

The stages are functions with typed settings, callable without Hydra::

    import medsynth
    from medsynth.config import compose

    settings = compose(["trainer.max_steps=50", "paths.output=/tmp/demo"])  # or build the dataclasses
    medsynth.preprocess(settings=settings.data, run=settings.run)
    medsynth.train(model=settings.model, scheduler=settings.scheduler, trainer=settings.trainer, run=settings.run)

See docs/api.md for the whole worked example.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


class MedsynthError(Exception):
    """An error caused by the user's input or configuration.

    The command line catches it at the top and prints its message alone (no traceback), then
    exits with status 2. The message must name the file or config key at fault.
    """

    def with_note(self, note: str) -> MedsynthError:
        """The same kind of error with ``; note`` appended to its message (where the complete outputs are, say)."""
        try:
            return type(self)(f"{self}; {note}")
        except TypeError:  # a subclass with another constructor
            return MedsynthError(f"{self}; {note}")


class ConfigError(MedsynthError, ValueError):
    """An option value that is not allowed; the message names the config key."""


_STAGES = ("preprocess", "train", "generate", "evaluate", "run_pipeline")


def __getattr__(name: str) -> Any:
    """The stage functions and :class:`~medsynth.diffusion.generator.Generator`, imported on first use
    (so ``import medsynth`` stays light)."""
    if name in _STAGES:
        from medsynth import stages

        return getattr(stages, name)
    if name == "Generator":
        from medsynth.diffusion.generator import Generator

        return Generator
    raise AttributeError(f"module 'medsynth' has no attribute {name!r}")
