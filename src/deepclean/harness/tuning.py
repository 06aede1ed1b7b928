"""One tuning budget for every method: search spaces, the trial loop and the hyperparameter file.

The protocol (GUIDE.md section 8; the Deep Unlearn benchmark's fair tuning):

- every method declares its search space (:meth:`Unlearner.search_space`): learning rates
  log-uniform, epochs capped by a share of the original training (``max_passes`` passes over D_r),
  method coefficients over declared ranges;
- every method gets the same number of trials (:func:`tune`, Optuna's seeded TPE sampler);
- tuning runs on its own seed (another split, with its own gold model) and on the *validation
  half* of the test set (:func:`test_halves`); it minimises Avg. Gap to gold over Acc_Df, Acc_Dr,
  Acc_val and the entropy MIA (the MIA's non-members are the validation half too);
- reported results come from other seeds and the other half of the test set, so nothing is tuned
  on what is reported. The chosen values go to a file (:func:`write_hp_file`) that
  ``deepclean run --hp-file`` reads (:func:`read_hp_file`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepclean.checkpoint import atomic_write_text
from deepclean.errors import CheckpointError, ConfigurationError, DataError, DeepCleanError
from deepclean.methods.space import (
    Choice,
    IntRange,
    LogUniform,
    Param,
    SpaceContext,
    Uniform,
    check_space,
)

__all__ = [
    "HP_FILE_FORMAT",
    "Choice",
    "IntRange",
    "LogUniform",
    "SpaceContext",
    "TrialRecord",
    "TuneResult",
    "Uniform",
    "check_space",
    "read_hp_file",
    "read_hp_files",
    "test_halves",
    "tune",
    "write_hp_file",
]

#: The ``format`` field of a hyperparameter file.
HP_FILE_FORMAT = "deepclean-hp/1"


def test_halves(n_test: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split test-set indices into a validation half (tuning, auto-gamma) and a report half.

    The split is a permutation drawn from its own generator (``seed``), so every run of a
    project splits the test set the same way: the validation half gets ``n_test // 2`` samples,
    the report half the rest. Both are sorted.

    Returns:
        ``(validation, report)``: int64 index tensors, disjoint, together ``0 .. n_test - 1``.

    Raises:
        DataError: fewer than 2 test samples.
    """

    if not isinstance(n_test, int) or n_test < 2:
        raise DataError(f"splitting the test set into two halves needs >= 2 samples, got {n_test}")
    perm = torch.randperm(n_test, generator=torch.Generator().manual_seed(7_919 + seed))
    half = n_test // 2
    return perm[:half].sort().values, perm[half:].sort().values


test_halves.__test__ = False  # not a pytest test, despite the name


@dataclass
class TrialRecord:
    """One trial: the values tried, the objective (Avg. Gap to gold, points) and its time (s)."""

    number: int
    params: dict[str, Any]
    score: float | None
    time_s: float
    state: str  # "complete" or "failed"
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "params": self.params, "score": self.score,
                "time_s": self.time_s, "state": self.state, "error": self.error,
                "metrics": self.metrics}


@dataclass
class TuneResult:
    """The outcome of :func:`tune`: the best values (``{}`` and ``best_score=None`` when every
    trial failed), all trials in order, and the wall time of the whole search (s)."""

    best: dict[str, Any]
    best_score: float | None
    trials: list[TrialRecord]
    time_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_score": self.best_score, "time_s": self.time_s,
                "trials": [t.to_dict() for t in self.trials]}


def tune(
    objective: Callable[[dict[str, Any]], tuple[float, dict[str, float]]],
    space: Mapping[str, Param],
    *,
    n_trials: int = 12,
    seed: int = 0,
    fixed: Mapping[str, Any] | None = None,
) -> TuneResult:
    """Minimise ``objective`` over ``space`` in ``n_trials`` trials of Optuna's seeded TPE sampler.

    Args:
        objective: ``params -> (score, metrics)``; lower ``score`` is better. A
            :class:`~deepclean.errors.DeepCleanError`, ``FloatingPointError`` or ``RuntimeError``
            raised by it, or a non-finite score, marks that trial failed (recorded with the
            reason); the search goes on.
        space: ``{hyperparameter: Param}``. An empty space runs one trial at ``fixed``.
        n_trials: number of trials (the same for every method).
        seed: seeds the sampler, so the same objective gives the same trials.
        fixed: values passed with every trial and not searched.

    Returns:
        A :class:`TuneResult`; its ``best`` includes ``fixed``.

    Raises:
        ConfigurationError: ``n_trials`` is not an integer >= 1.
    """
    import optuna

    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise ConfigurationError(f"n_trials must be an integer >= 1, got {n_trials!r}")
    fixed = dict(fixed or {})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(6, n_trials))
    study = optuna.create_study(direction="minimize", sampler=sampler)
    records: list[TrialRecord] = []
    start = time.perf_counter()
    for number in range(n_trials if space else 1):
        trial = study.ask()
        params = {k: p.suggest(trial, k) for k, p in space.items()}
        t0 = time.perf_counter()
        try:
            score, metrics = objective(fixed | params)
            if not math.isfinite(score):
                raise FloatingPointError(f"the objective is {score}")
        except (DeepCleanError, FloatingPointError, RuntimeError) as exc:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            records.append(TrialRecord(number, params, None, time.perf_counter() - t0, "failed",
                                       f"{type(exc).__name__}: {exc}"))
            continue
        study.tell(trial, score)
        records.append(TrialRecord(number, params, float(score), time.perf_counter() - t0,
                                   "complete", None, dict(metrics)))
    done = [r for r in records if r.state == "complete"]
    best = min(done, key=lambda r: (r.score, r.number)) if done else None
    return TuneResult(
        best=(fixed | best.params) if best else {},
        best_score=best.score if best else None,
        trials=records,
        time_s=time.perf_counter() - start,
    )


def write_hp_file(path: str | Path, tuned: Mapping[str, Mapping[str, Mapping[str, Any]]],
                  protocol: Mapping[str, Any]) -> Path:
    """Write the tuned values ``{scenario: {method: {name: value}}}`` and the protocol that chose
    them (seed, trials, cap, objective) as JSON, atomically.

    Raises:
        ConfigurationError: a value that is not JSON (str, int, float, bool, None).
    """

    for scenario, methods in tuned.items():
        for method, values in methods.items():
            for key, value in values.items():
                if not isinstance(value, (str, int, float, bool, type(None))):
                    raise ConfigurationError(
                        f"tuned value {scenario}/{method}.{key} = {value!r} is not a JSON value"
                    )
    payload = {"format": HP_FILE_FORMAT, "tuned": tuned, "protocol": dict(protocol)}
    path = Path(path)
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


def read_hp_file(path: str | Path) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, Any]]:
    """Read a file written by :func:`write_hp_file` (``deepclean tune``).

    Returns:
        ``(tuned, protocol)``: ``{scenario: {method: {name: value}}}`` and the protocol record.

    Raises:
        CheckpointError: the file is missing, not JSON, or not a ``deepclean-hp/1`` file; the
            message names the file and says how to make one (``deepclean tune``).
    """
    path = Path(path)
    fix = "write one with `deepclean tune --out DIR` (it writes DIR/hyperparameters.json)"
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"hyperparameter file {path} does not exist; {fix}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"hyperparameter file {path} is not readable JSON ({exc}); {fix}") \
            from exc
    if not isinstance(payload, dict) or payload.get("format") != HP_FILE_FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not a DeepClean hyperparameter file (format {got!r}, expected "
            f"{HP_FILE_FORMAT!r}); {fix}"
        )
    tuned = payload.get("tuned")
    ok = isinstance(tuned, dict) and all(
        isinstance(m, dict) and all(isinstance(v, dict) for v in m.values())
        for m in tuned.values()
    )
    if not ok:
        raise CheckpointError(
            f"{path}: 'tuned' must map scenario -> method -> {{name: value}}; {fix}"
        )
    return tuned, dict(payload.get("protocol") or {})


def read_hp_files(paths: list[str | Path]) -> tuple[dict[str, dict[str, dict[str, Any]]],
                                                    dict[str, Any]]:
    """Read and merge several hyperparameter files (searches made in separate ``deepclean tune``
    runs). The protocol returned is the first file's.

    Raises:
        CheckpointError: a file cannot be read (see :func:`read_hp_file`).
        ConfigurationError: two files tune the same method in the same scenario, or were tuned on
            different seeds.
    """
    merged: dict[str, dict[str, dict[str, Any]]] = {}
    first: dict[str, Any] | None = None
    for path in paths:
        tuned, protocol = read_hp_file(path)
        if first is None:
            first = protocol
        elif protocol.get("tune_seed") != first.get("tune_seed"):
            raise ConfigurationError(
                f"{path} was tuned on seed {protocol.get('tune_seed')} and {paths[0]} on seed "
                f"{first.get('tune_seed')}; merge files of one tuning seed only"
            )
        for scenario, methods in tuned.items():
            for method, values in methods.items():
                if method in merged.setdefault(scenario, {}):
                    raise ConfigurationError(
                        f"{method} is tuned for {scenario} forgetting in two files (the second: "
                        f"{path}); pass each search once"
                    )
                merged[scenario][method] = values
    return merged, first or {}
