"""``deepclean tune``: every method tuned with the same budget, on data that is never reported.

For a run configuration (data set, model, scenarios, methods) :func:`run_tuning`

1. trains the original model of the *tuning seed* (not one of the reported seeds: another
   training subset and another forget split) and, per scenario, its gold model on D_r;
2. splits the test set into a validation half and a report half (:func:`deepclean.harness.tuning.test_halves`);
3. gives each method the same number of trials over the search space it declares
   (:meth:`Unlearner.search_space`, epochs capped at ``max_passes`` passes over D_r), scoring each
   trial by Avg. Gap to the gold model over Acc_Df, Acc_Dr, Acc_val and the entropy MIA, all on
   the tuning seed's split and the *validation* half;
4. writes ``hyperparameters.json`` (the best values per scenario and method, read by
   ``deepclean run --hp-file``), one ``tuning/<scenario>_<method>.json`` per search with every
   trial, and ``tuning.md``, a table of the chosen values, scores and tuning times.

``deepclean run --hp-file`` then reports on other seeds and on the report half of the test set
only, so nothing is tuned on what is reported.

An interrupted ``deepclean tune`` started again with the same options and ``--out`` reuses every
finished search (keyed by the configuration, the search space and the budget) and runs the rest;
the trained models come from the model cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from deepclean._version import __version__
from deepclean.checkpoint import atomic_write_text
from deepclean.errors import ConfigurationError
from deepclean.evaluation.evaluate import evaluate_model
from deepclean.evaluation.summaries import avg_gap
from deepclean.fisher.train_fisher import precompute_train_fisher
from deepclean.harness import cache, config
from deepclean.harness.config import TEST_HALVES_SEED
from deepclean.harness.experiment import out_dir_lock
from deepclean.harness.resume import method_key
from deepclean.harness.tuning import TuneResult, test_halves, tune, write_hp_file
from deepclean.methods import make_method, method_class
from deepclean.methods.space import SpaceContext

__all__ = ["DEFAULT_TUNE_SEED", "TEST_HALVES_SEED", "run_tuning", "validation_score"]

#: The seed of the tuning run (its split, original and gold model) unless one is given.
DEFAULT_TUNE_SEED = 100


def validation_score(metrics: dict[str, float], gold_metrics: dict[str, float]) -> float:
    """Avg. Gap to gold (points) over Acc_Df, Acc_Dr, Acc_val and MIA, where ``acc_test`` and the
    MIA's non-members are the validation half of the test set."""
    return avg_gap(metrics, gold_metrics)


def _check_finite(model: torch.nn.Module, method: str) -> None:
    bad = [n for n, t in model.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise FloatingPointError(
            f"{method} produced non-finite weights in {len(bad)} tensors (first: {bad[0]}): "
            "the method diverged"
        )


def run_tuning(
    config: Any,
    *,
    tune_seed: int = DEFAULT_TUNE_SEED,
    n_trials: int = 12,
    max_passes: int = 3,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tune every method of ``config`` (an :class:`~deepclean.harness.experiment.ExperimentConfig`) with
    the same budget and write the chosen values into ``config.out_dir``.

    Args:
        config: the run to tune for; its ``seeds`` are the seeds that will be *reported* and
            must not contain ``tune_seed``. Its ``methods`` are tuned (methods that declare no
            search space, like ``retrain``, are skipped).
        tune_seed: the tuning run's seed (split, original and gold model).
        n_trials: trials per method and scenario (the same for every method).
        max_passes: cap on unlearning work, in passes over D_r (bounds every epoch range).

    Returns:
        ``{"tuned": {scenario: {method: values}}, "searches": {scenario: {method: TuneResult
        dict}}, "path": hyperparameters file}``.

    Raises:
        ConfigurationError: ``tune_seed`` among the reported seeds, more than one model, bad
            ``n_trials`` / ``max_passes``; before any training.
    """
    if not isinstance(max_passes, int) or isinstance(max_passes, bool) or max_passes < 1:
        raise ConfigurationError(f"max_passes must be an integer >= 1, got {max_passes!r}")
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise ConfigurationError(f"n_trials must be an integer >= 1, got {n_trials!r} (--trials)")
    if not isinstance(tune_seed, int) or isinstance(tune_seed, bool) or tune_seed < 0:
        raise ConfigurationError(f"tune_seed must be an integer >= 0, got {tune_seed!r}")
    if tune_seed in config.seeds:
        raise ConfigurationError(
            f"the tuning seed {tune_seed} is also a reported seed {list(config.seeds)}; results "
            "would be tuned on what they report. Pass another --tune-seed"
        )
    if len(config.models) != 1:
        raise ConfigurationError(
            f"deepclean tune tunes one model at a time, got {list(config.models)}; pass one "
            "--models value"
        )
    cfg = replace(config, seeds=(tune_seed,))
    cfg.validate()
    with out_dir_lock(cfg.out_dir, "deepclean tune"):
        return _run_tuning(cfg, tune_seed=tune_seed, n_trials=n_trials, max_passes=max_passes,
                           log=log)


def _run_tuning(cfg: Any, *, tune_seed: int, n_trials: int, max_passes: int,
                log: Callable[[str], None]) -> dict[str, Any]:
    ctx = cache._make_context(cfg, log)
    config._precheck(cfg, ctx.data)
    val_idx, _ = test_halves(int(ctx.data.test_x.shape[0]), seed=TEST_HALVES_SEED)
    x_val, y_val = ctx.data.test_x[val_idx], ctx.data.test_y[val_idx]
    model_name = cfg.models[0]
    subset, x_train, y_train = cache._training_subset(ctx, tune_seed)
    original, _ = cache._original_model(ctx, model_name=model_name, seed=tune_seed, subset=subset,
                                     x_train=x_train, y_train=y_train)
    # Methods that accept a training-set Fisher get I_D once for all their trials: each trial
    # then runs the Fisher pass over D_f only (I_Dr follows exactly, the same selection).
    train_fisher = None
    if any(method_class(m).accepts_train_fisher and method_class(m).search_space(SpaceContext())
           for m in cfg.methods):
        train_fisher = precompute_train_fisher(original, TensorDataset(x_train, y_train),
                                               device=ctx.device)
    tuned: dict[str, dict[str, dict[str, Any]]] = {}
    searches: dict[str, dict[str, Any]] = {}

    def write_outputs(complete: bool) -> Path:
        """hyperparameters.json and tuning.md from the searches finished so far: after every
        search, so an interrupted tune leaves a usable (partial) --hp-file."""
        protocol = {
            "tune_seed": tune_seed, "n_trials": n_trials, "max_passes": max_passes,
            "objective": "avg_gap over acc_forget, acc_retain, acc_val, mia (validation half)",
            "test_halves_seed": TEST_HALVES_SEED, "dataset": cfg.dataset, "model": model_name,
            "width": cfg.width, "train_size": cfg.train_size, "scenarios": list(cfg.scenarios),
            "sampler": "optuna TPESampler(seed=tune_seed)",
            "time_s": {s: {m: r["time_s"] for m, r in v.items()} for s, v in searches.items()},
            "complete": complete,
        }
        path = write_hp_file(ctx.out_dir / "hyperparameters.json", tuned, protocol)
        atomic_write_text(ctx.out_dir / "tuning.md", tuning_table(searches))
        return path
    for scenario in cfg.scenarios:
        split, gold, _ = cache._split_and_gold(ctx, scenario=scenario, seed=tune_seed,
                                            model_name=model_name, subset=subset,
                                            x_train=x_train, y_train=y_train)

        def metrics_of(model: torch.nn.Module, split=split) -> dict[str, float]:
            return evaluate_model(model, x_train=x_train, y_train=y_train, split=split,
                                     x_test=x_val, y_test=y_val, device=ctx.device,
                                     precision=cfg.precision)

        gold_metrics = metrics_of(gold)
        forget = TensorDataset(x_train[split.forget], y_train[split.forget])
        retain = TensorDataset(x_train[split.retain], y_train[split.retain])
        context = SpaceContext(max_passes=max_passes, n_forget=int(split.forget.numel()),
                               n_retain=int(split.retain.numel()), scenario=scenario)
        tuned[scenario], searches[scenario] = {}, {}
        for name in cfg.methods:
            space = method_class(name).search_space(context)
            if not space:
                log(f"  {scenario} / {name}: declares nothing to tune; runs at its defaults")
                continue
            objective = partial(
                _objective, name=name, original=original, forget=forget, retain=retain,
                metrics_of=metrics_of, gold_metrics=gold_metrics,
                base_kwargs=config._method_kwargs(cfg, name, scenario, tune_seed, ctx.device,
                                                  model_name, ctx.data, train_fisher),
            )
            space_record = {k: p.to_dict() for k, p in space.items()}
            key = search_key(cfg, scenario=scenario, method=name, space=space_record,
                             tune_seed=tune_seed, n_trials=n_trials, max_passes=max_passes)
            path = ctx.out_dir / "tuning" / f"{scenario}_{name}.json"
            done = _finished_search(path, key)
            if done is not None:
                log(f"  {scenario} / {name}: reused the finished search in {path}")
                searches[scenario][name] = done
                if done["best"]:
                    tuned[scenario][name] = {k: done["best"][k] for k in space}
                write_outputs(complete=False)
                continue
            log(f"  {scenario} / {name}: {n_trials} trials over {sorted(space)}")
            shared = method_class(name).tuning_collaborators(original, forget, retain,
                                                             device=ctx.device)
            if shared:  # work no searched value changes, done once for every trial
                log(f"  {scenario} / {name}: computed once for all trials: {sorted(shared)}")
                objective = partial(objective, base_kwargs=objective.keywords["base_kwargs"]
                                    | shared)
            result = tune(objective, space, n_trials=n_trials, seed=tune_seed)
            _log_result(log, scenario, name, result)
            if result.best:
                tuned[scenario][name] = {k: result.best[k] for k in space}
            searches[scenario][name] = result.to_dict() | {
                "space": space_record, "gold_metrics": gold_metrics, "search_key": key,
            }
            atomic_write_text(path, json.dumps(searches[scenario][name], indent=2,
                                               sort_keys=True) + "\n")
            write_outputs(complete=False)
    path = write_outputs(complete=True)
    log(tuning_table(searches))
    log(f"tuned values written to {path}; use them with: deepclean run --hp-file {path}")
    return {"tuned": tuned, "searches": searches, "path": str(path)}


def search_key(cfg: Any, *, scenario: str, method: str, space: dict[str, Any], tune_seed: int,
               n_trials: int, max_passes: int) -> str:
    """The key of one search: everything its result depends on. Not the other methods or
    scenarios of the run, the output folder, progress bars or DataLoader workers, so a search
    finished by one ``deepclean tune`` is reused by another that tunes more (or fewer) methods or
    scenarios, in any order."""
    config_record = {k: v for k, v in cfg.to_dict().items()
                     if k not in ("num_workers", "out_dir", "progress", "methods", "scenarios")}
    return method_key({"config": config_record, "scenario": scenario, "method": method,
                       "space": space, "tune_seed": tune_seed, "n_trials": n_trials,
                       "max_passes": max_passes, "version": __version__})


def _finished_search(path: Path, key: str) -> dict[str, Any] | None:
    """The search recorded in ``path`` when it was made with the same configuration, space and
    budget (``search_key``), so an interrupted ``deepclean tune`` resumes; else None."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("search_key") == key else None


def _objective(params: dict[str, Any], *, name: str, original: torch.nn.Module,
               forget: TensorDataset, retain: TensorDataset,
               metrics_of: Callable[[torch.nn.Module], dict[str, float]],
               gold_metrics: dict[str, float], base_kwargs: dict[str, Any]
               ) -> tuple[float, dict[str, float]]:
    """One trial: unlearn with ``params`` on top of the harness's arguments, score on the
    validation half. Non-finite weights raise ``FloatingPointError`` (the trial fails)."""
    method = make_method(name, **(base_kwargs | params))
    unlearned = method.unlearn(original, forget, retain)
    _check_finite(unlearned, name)
    metrics = metrics_of(unlearned)
    return validation_score(metrics, gold_metrics), metrics


def _log_result(log: Callable[[str], None], scenario: str, name: str, result: TuneResult) -> None:
    failed = sum(t.state == "failed" for t in result.trials)
    if result.best_score is None:
        log(f"  {scenario} / {name}: every trial failed ({failed}); no tuned values")
        return
    log(f"  {scenario} / {name}: best Avg. Gap {result.best_score:.2f} with {result.best}"
        f" ({len(result.trials)} trials, {failed} failed, {result.time_s:.1f} s)")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def tuning_table(searches: dict[str, dict[str, Any]]) -> str:
    """A Markdown table per scenario: method, chosen values, validation Avg. Gap (points) of the
    best trial and of the worst, the separation Acc_Dr - Acc_Df (points, validation) of the best
    trial and the largest of any trial against the gold model's (a search whose largest
    separation stays far below gold's found no setting that forgets D_f more than it damages
    D_r), trials failed, tuning time (s)."""

    def separation(metrics: Any) -> float | None:
        ok = isinstance(metrics, dict) and all(
            isinstance(metrics.get(k), (int, float)) for k in ("acc_retain", "acc_forget"))
        return metrics["acc_retain"] - metrics["acc_forget"] if ok else None

    lines = ["# Tuning", ""]
    for scenario, methods in searches.items():
        lines += [f"## {scenario} forgetting", "",
                  "| Method | Chosen values | Avg. Gap (val) best | worst | Acc_Dr - Acc_Df best "
                  "trial | largest | gold | Failed | Time (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in methods.items():
            scores = [t["score"] for t in r["trials"] if t["score"] is not None]
            failed = sum(t["state"] == "failed" for t in r["trials"])
            chosen = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(r["best"].items())
                               if k in r["space"]) or "none (every trial failed)"
            best = f"{r['best_score']:.2f}" if r["best_score"] is not None else "-"
            worst = f"{max(scores):.2f}" if scores else "-"
            seps = [s for t in r["trials"] if (s := separation(t.get("metrics"))) is not None]
            best_trial = min((t for t in r["trials"] if t["score"] is not None),
                             key=lambda t: t["score"], default=None)
            best_sep = separation(best_trial.get("metrics")) if best_trial else None
            gold_sep = separation(r.get("gold_metrics"))
            cols = [f"{v:.2f}" if v is not None else "-"
                    for v in (best_sep, max(seps) if seps else None, gold_sep)]
            lines.append(f"| {name} | {chosen} | {best} | {worst} | {' | '.join(cols)} | "
                         f"{failed}/{len(r['trials'])} | {r['time_s']:.1f} |")
        lines.append("")
    return "\n".join(lines)
