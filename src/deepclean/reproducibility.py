"""Reproducibility: a determinism switch, and a guard that keeps the caller's random state intact.

Every random draw in DeepClean comes from its own ``torch.Generator`` seeded from an explicit seed
(splits, training-subset draws, shuffling, augmentation, random labels, model initialisation under
``fork_rng``). On the CPU the same command with the same seed therefore gives bitwise-identical
splits, Fisher diagonals, masks and weights. On CUDA, some kernels are non-deterministic unless
:func:`set_deterministic` is switched on (``deepclean run --deterministic``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from deepclean.errors import ConfigurationError

__all__ = ["set_deterministic", "deterministic", "preserve_global_rng", "CUBLAS_WORKSPACE"]

CUBLAS_WORKSPACE = ":4096:8"


def set_deterministic(enabled: bool = True, *, warn_only: bool = False) -> dict[str, Any]:
    """Switch torch's deterministic mode on (or off) for this process.

    On: ``torch.use_deterministic_algorithms(True, warn_only=warn_only)``,
    ``torch.backends.cudnn.deterministic = True``, ``torch.backends.cudnn.benchmark = False`` and,
    unless already set, ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (needed by cuBLAS for deterministic
    matrix products on CUDA >= 10.2; it must be set before the first cuBLAS call). Off: the first
    two are switched off again (benchmark mode stays off; turn it on yourself if wanted).

    Args:
        enabled: on or off.
        warn_only: with ``True``, an operation without a deterministic implementation warns instead
            of raising.

    Returns:
        The previous settings, for :func:`deterministic` to restore.
    """
    previous = {
        "algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cublas_workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    if not isinstance(enabled, bool):

        raise ConfigurationError(f"enabled must be True or False, got {enabled!r}")
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.backends.cudnn.deterministic = enabled
    if enabled:
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    return previous


def _restore(previous: dict[str, Any]) -> None:
    torch.use_deterministic_algorithms(previous["algorithms"], warn_only=previous["warn_only"])
    torch.backends.cudnn.deterministic = previous["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = previous["cudnn_benchmark"]
    if previous["cublas_workspace"] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = previous["cublas_workspace"]


@contextmanager
def deterministic(enabled: bool = True, *, warn_only: bool = False) -> Iterator[None]:
    """:func:`set_deterministic` for the duration of a ``with`` block; the previous settings are
    restored afterwards."""
    previous = set_deterministic(enabled, warn_only=warn_only)
    try:
        yield
    finally:
        _restore(previous)


@contextmanager
def preserve_global_rng() -> Iterator[None]:
    """Save the global random states of torch (CPU and every CUDA device), NumPy and Python's
    ``random`` module, and restore them when the block ends, whatever ran inside."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
