"""medsynth: synthetic, labelled medical imaging data with audited realism and privacy."""

from __future__ import annotations

__version__ = "0.1.0"


class MedsynthError(Exception):
    """An error caused by the user's input or configuration.

    Pipelines catch it at the top and print its message alone (no traceback), then exit
    with a non-zero status. The message must name the file or config key at fault.
    """


class ConfigError(MedsynthError, ValueError):
    """An option value that is not allowed; the message names the config key."""
