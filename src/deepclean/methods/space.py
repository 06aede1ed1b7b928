"""Search spaces: the ranges over which ``deepclean tune`` searches a method's hyperparameters.

Each method declares its space in :meth:`deepclean.methods.base.Unlearner.search_space`, built
from the four range types here. The protocol that uses them is in :mod:`deepclean.harness.tuning`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deepclean.errors import ConfigurationError

__all__ = ["Choice", "IntRange", "LogUniform", "Param", "SpaceContext", "Uniform", "check_space"]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class LogUniform:
    """A float drawn log-uniformly from ``[low, high]`` (``0 < low < high``), e.g. a learning rate."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (_number(self.low) and _number(self.high) and 0 < self.low < self.high):
            raise ConfigurationError(
                f"LogUniform needs 0 < low < high, got low={self.low!r}, high={self.high!r}"
            )

    def suggest(self, trial: Any, name: str) -> float:
        return float(trial.suggest_float(name, self.low, self.high, log=True))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "log_uniform", "low": self.low, "high": self.high}


@dataclass(frozen=True)
class Uniform:
    """A float drawn uniformly from ``[low, high]`` (``low < high``)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (_number(self.low) and _number(self.high) and self.low < self.high):
            raise ConfigurationError(
                f"Uniform needs low < high, got low={self.low!r}, high={self.high!r}"
            )

    def suggest(self, trial: Any, name: str) -> float:
        return float(trial.suggest_float(name, self.low, self.high))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "uniform", "low": self.low, "high": self.high}


@dataclass(frozen=True)
class IntRange:
    """An integer drawn uniformly from ``{low, ..., high}`` (``low <= high``), e.g. epochs."""

    low: int
    high: int

    def __post_init__(self) -> None:
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high))
        if not ok or self.low > self.high:
            raise ConfigurationError(
                f"IntRange needs integers low <= high, got low={self.low!r}, high={self.high!r}"
            )

    def suggest(self, trial: Any, name: str) -> int:
        return int(trial.suggest_int(name, self.low, self.high))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "int", "low": self.low, "high": self.high}


@dataclass(frozen=True)
class Choice:
    """One of a few JSON values (str, int, float or bool)."""

    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not self.values or not all(isinstance(v, (str, int, float, bool)) for v in self.values):
            raise ConfigurationError(
                f"Choice needs at least one str/int/float/bool value, got {self.values!r}"
            )

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.values))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "choice", "values": list(self.values)}


Param = LogUniform | Uniform | IntRange | Choice


@dataclass(frozen=True)
class SpaceContext:
    """What a method's search space may depend on.

    Attributes:
        max_passes: the cap on unlearning work, in passes over D_r (epochs are capped by it).
        n_forget: |D_f|, samples.
        n_retain: |D_r|, samples.
        scenario: ``"random"``, ``"class"`` or ``"indices"``.
    """

    max_passes: int = 3
    n_forget: int = 1
    n_retain: int = 1
    scenario: str = "random"


def check_space(name: str, space: Mapping[str, Param], accepted: list[str]) -> None:
    """Refuse a search space that names no hyperparameter of the method or holds a non-range.

    Raises:
        ConfigurationError: a key the method's constructor does not take, or a value that is not
            one of :class:`LogUniform`, :class:`Uniform`, :class:`IntRange`, :class:`Choice`.
    """
    for key, param in space.items():
        if key not in accepted:
            raise ConfigurationError(
                f"the search space of {name!r} names {key!r}, which is not one of its "
                f"hyperparameters {accepted}"
            )
        if not isinstance(param, (LogUniform, Uniform, IntRange, Choice)):
            raise ConfigurationError(
                f"the search space of {name!r} gives {key!r} as {param!r}; expected LogUniform, "
                "Uniform, IntRange or Choice"
            )
