"""Exceptions raised by flowdistill.

Every error a user can cause (a bad path, a bad config value, a broken file) derives from
:class:`FlowdistillError`, so the command line can print its message without a traceback.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FlowdistillError",
    "NonFiniteLossError",
    "ShapeMismatchError",
    "TapError",
    "UnknownMethodError",
    "ValueRangeError",
]


class FlowdistillError(Exception):
    """Base class of every error caused by user input."""


class ConfigError(FlowdistillError, ValueError):
    """A configuration key is unknown or one of its values is invalid."""


class UnknownMethodError(FlowdistillError, KeyError):
    """A distillation method name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TapError(FlowdistillError, ValueError):
    """A feature tap names a module path that does not exist."""


class ShapeMismatchError(FlowdistillError, ValueError):
    """Two feature shapes that no adapter can bridge."""


class DataError(FlowdistillError, OSError):
    """A data file is missing, truncated or not in the expected format."""


class CheckpointError(FlowdistillError, OSError):
    """A checkpoint is missing, truncated or corrupted."""


class NonFiniteLossError(FlowdistillError, FloatingPointError):
    """Training produced a NaN or infinite loss."""


class ValueRangeError(FlowdistillError, ValueError):
    """A tensor holds values outside the range an operation accepts (a class index beyond
    the classes, padding where a loss needs a label for every position)."""
