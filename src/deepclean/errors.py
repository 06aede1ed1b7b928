"""The errors DeepClean raises. Each message says what was expected, what arrived and how to fix it."""

from __future__ import annotations

__all__ = [
    "DeepCleanError",
    "ConfigurationError",
    "DataError",
    "DataNotFoundError",
    "MaskError",
    "CheckpointError",
    "SplitMismatchError",
    "BusyError",
    "DivergenceError",
]


class DeepCleanError(Exception):
    """Base class of every error raised by DeepClean."""


class ConfigurationError(DeepCleanError, ValueError):
    """A hyperparameter, name or option is invalid."""


class DataError(DeepCleanError, ValueError):
    """A data set, split or batch is not what was expected (empty, wrong shape, wrong labels)."""


class DataNotFoundError(DeepCleanError, FileNotFoundError):
    """The files of a data set are not on disk."""


class MaskError(DeepCleanError, KeyError):
    """A weight mask does not match the model's parameters (names or shapes)."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class CheckpointError(DeepCleanError, ValueError):
    """A checkpoint is missing, truncated, corrupt or does not fit the model."""


class SplitMismatchError(DeepCleanError, ValueError):
    """A model was trained on a different forget/retain split than the one being evaluated."""


class BusyError(DeepCleanError, RuntimeError):
    """An output folder or cache entry is held by another DeepClean process."""


class DivergenceError(DeepCleanError, FloatingPointError):
    """An unlearning method produced non-finite weights or outputs (it diverged)."""
