"""DeepClean over a range of gamma, with the two Fisher diagonals computed once (paper Figs. 3, 4).

:func:`sweep_gamma` is what ``deepclean sweep-gamma`` calls. For every seed, model and scenario of
the configuration it takes the original model, the split and the gold model from the same
machinery (and cache) as ``deepclean run``, computes I_Df and I_Dr once
(:meth:`DeepClean.fisher_pair`), and for each gamma applies the selection, reset and fine-tune to a
fresh copy of the original model (:meth:`DeepClean.apply_selection`). Each gamma is evaluated like
a method of the run (paper metrics, gaps to gold, optionally the MIA family and distances) and
written to ``<out_dir>/sweep/<dataset>_<model>_<scenario>_seed<seed>_gamma<gamma>.json``; the
figures and the HTML report are then rebuilt (:func:`deepclean.report.tables.build_report`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import TensorDataset

from deepclean.errors import ConfigurationError
from deepclean.evaluation.summaries import summary
from deepclean.harness.cache import (
    _make_context,
    _original_model,
    _split_and_gold,
    _train_fisher,
    _training_subset,
    _write_json,
)
from deepclean.harness.config import _method_kwargs
from deepclean.harness.experiment import out_dir_lock
from deepclean.harness.records import _evaluator, _gaps
from deepclean.methods import make_method
from deepclean.methods.base import prepare_inputs
from deepclean.precision import autocast
from deepclean.report.build import build_report
from deepclean.training import synchronize

__all__ = ["DEFAULT_GAMMAS", "sweep_gamma"]

#: The paper's grid (Figs. 3 and 4).
DEFAULT_GAMMAS = (1.0, 1.1, 1.2, 1.5, 1.7, 2.0, 2.2, 2.5, 2.7, 3.0)


def sweep_gamma(
    config,
    *,
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    extended: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run DeepClean for every gamma of ``gammas`` on every (seed, model, scenario) of ``config``.

    Args:
        config: an :class:`deepclean.harness.experiment.ExperimentConfig` (its ``methods`` are ignored;
            DeepClean's other hyperparameters come from ``unlearn_epochs``, ``unlearn_lr`` and
            ``hyperparameters["deepclean"]``).
        gammas: thresholds, each > 0.
        extended: also compute the MIA family and the distances to gold per gamma.

    Returns:
        The sweep records, one per (seed, model, scenario, gamma). Each has the paper metrics,
        gaps to gold, ``n_reset`` / ``n_weights`` / ``share_reset``, ``fisher_time_s`` (the two
        Fisher passes, shared by every gamma), ``selection_time_s`` (selection, reset and
        fine-tune of this gamma) and ``time_s`` (their sum: one DeepClean run).

    Raises:
        ConfigurationError: an empty or non-positive gamma list, or an invalid configuration.
    """

    gammas = tuple(float(g) for g in gammas)
    if not gammas or not all(g > 0 for g in gammas):
        raise ConfigurationError(f"gammas must be a non-empty list of numbers > 0, got {gammas}")
    config.validate()
    with out_dir_lock(config.out_dir, "deepclean sweep-gamma"):
        return _sweep_locked(config, gammas, extended=extended, log=log)


def _sweep_locked(config: Any, gammas: tuple[float, ...], *, extended: bool,
                  log: Callable[[str], None]) -> list[dict[str, Any]]:

    ctx = _make_context(config, log)
    data, device, out_dir = ctx.data, ctx.device, ctx.out_dir
    _write_json(out_dir / "sweep_config.json",
                config.to_dict() | {"gammas": list(gammas), "device_used": str(device)})
    records: list[dict[str, Any]] = []
    for seed in config.seeds:
        subset, x_train, y_train = _training_subset(ctx, seed)
        for model_name in config.models:
            original, original_meta = _original_model(
                ctx, model_name=model_name, seed=seed, subset=subset, x_train=x_train,
                y_train=y_train)
            train_fisher = _train_fisher(ctx, model_name=model_name, original=original,
                                         original_meta=original_meta, x_train=x_train,
                                         y_train=y_train)
            for scenario in config.scenarios:
                split, gold, gold_meta = _split_and_gold(
                    ctx, scenario=scenario, seed=seed, model_name=model_name, subset=subset,
                    x_train=x_train, y_train=y_train)
                evaluate, _ = _evaluator(ctx, seed=seed, model_name=model_name, subset=subset,
                                         split=split, x_train=x_train, y_train=y_train,
                                         original=original, gold=gold)
                gold_metrics, _ = evaluate(gold, is_gold=True, extended=False)
                kwargs = _method_kwargs(config, "deepclean", scenario, seed, device, model_name,
                                        data, train_fisher)
                forget = TensorDataset(x_train[split.forget], y_train[split.forget])
                retain = TensorDataset(x_train[split.retain], y_train[split.retain])
                method = make_method("deepclean", **kwargs)
                work, xf, yf, xr, yr, dev = prepare_inputs(original, forget, retain,
                                                           method.device)
                ctx.log(f"  sweep {scenario}: Fisher diagonals on D_f and D_r (once)")
                synchronize(dev)
                start = time.perf_counter()
                with autocast(dev, config.precision):  # the Fisher itself stays exact
                    fisher_f, fisher_r = method.fisher_pair(work, xf, yf, xr, yr, dev)
                synchronize(dev)
                fisher_time = time.perf_counter() - start
                for gamma in gammas:
                    m = make_method("deepclean", **(kwargs | {"gamma": gamma}))
                    fresh = copy.deepcopy(original).to(dev)
                    synchronize(dev)
                    start = time.perf_counter()
                    with autocast(dev, config.precision):
                        unlearned = m.apply_selection(fresh, fisher_f, fisher_r, xr, yr,
                                                      dev).eval()
                    synchronize(dev)
                    seconds = time.perf_counter() - start
                    metrics, ext = evaluate(unlearned, extended=extended)
                    rec: dict[str, Any] = {
                        "kind": "gamma_sweep",
                        "dataset": config.dataset,
                        "model": model_name,
                        "width": config.width,
                        "scenario": scenario,
                        "seed": seed,
                        "method": "deepclean",
                        "gamma": gamma,
                        "n_train": int(x_train.shape[0]),
                        "n_forget": int(split.forget.numel()),
                        "n_retain": int(split.retain.numel()),
                        "forget_sha256": split.digest,
                        "metrics": metrics,
                        "gold_metrics": gold_metrics,
                        "gold_time_s": gold_meta["train_time_s"],
                        "gaps": _gaps(metrics, gold_metrics),
                        "fisher_time_s": fisher_time,
                        **({"precompute_time_s": train_fisher.time_s} if train_fisher else {}),
                        "selection_time_s": seconds,
                        "time_s": fisher_time + seconds,
                        "hyperparameters": m.hyperparameters(),
                        "precision": config.precision,
                        "channels_last": config.channels_last,
                        "torch_version": torch.__version__,
                        **{k: v for k, v in m.info_.items() if isinstance(v, (int, float, str))},
                    }
                    rec["summary"] = summary(metrics, gold_metrics, time_s=rec["time_s"],
                                             gold_time_s=gold_meta["train_time_s"])
                    rec.update(ext)
                    name = (f"{config.dataset}_{model_name}_{scenario}_seed{seed}_"
                            f"gamma{gamma:g}")
                    _write_json(out_dir / "sweep" / f"{name}.json", rec)
                    records.append(rec)
                    ctx.log(f"  gamma {gamma:g}: |W_f| {rec['n_reset']} "
                            f"({100 * rec['share_reset']:.2f} %)  Acc_Dr "
                            f"{metrics['acc_retain']:.2f}  Acc_Df {metrics['acc_forget']:.2f}  "
                            f"MIA {metrics['mia']:.2f}")
    build_report(out_dir)
    return records
