"""The paper's experiment as one library call: original model, gold model, unlearning, metrics.

:func:`run_experiment` is what ``deepclean run`` calls. For every seed, model and scenario it

1. trains the original model on the training set (or reuses a cached one),
2. draws the forget/retain split and writes its manifest,
3. retrains the gold model from scratch on D_r with the same recipe (or reuses a cached one),
4. runs each unlearning method on the original model and times the unlearning step alone,
5. judges every model without the gold model: D_f against held-out samples drawn like it, the
   forgetting verdict of :func:`deepclean.evaluation.verdict.forgetting_verdict` on the held-out
   pool of :mod:`deepclean.harness.holdout` (console, results JSON, results.md, report.html and
   the audit record),
6. evaluates every model (Acc_Dr, Acc_Df, Acc_test, the paper's entropy MIA, gaps to gold; the
   MIA family of :mod:`deepclean.evaluation.mia`, the distances to gold of :mod:`deepclean.evaluation.distances` and the
   summaries of :mod:`deepclean.evaluation.summaries`) and writes one JSON file per (dataset, model,
   scenario, method, seed), plus the tables, figures and HTML report (:func:`build_report`).

Cached models live under ``cache_dir`` with a key of everything that determines them (data set,
training subset, split, architecture, width, recipe, seed, and ``precision`` / ``channels_last``
when they are not the defaults), as safetensors files.

With ``precision="bf16"`` the training of the original and gold models, every unlearning method
(inside its timed region) and the evaluation run under bfloat16 autocast; the Fisher diagonals stay
in full precision (:mod:`deepclean.precision`). With ``channels_last`` every model is converted to
``torch.channels_last`` before it is trained, unlearned or evaluated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from deepclean.checkpoint import (
    save_checkpoint,
)
from deepclean.distributed import agree_on_errors, is_main_process, world_size
from deepclean.errors import DataError, DivergenceError
from deepclean.evaluation.evaluate import evaluate_model
from deepclean.evaluation.memorisation import memorisation
from deepclean.evaluation.summaries import summary as summary_of
from deepclean.evaluation.verdict import forgetting_verdict
from deepclean.harness.audit import utc_now
from deepclean.harness.cache import (
    _Context,
    _make_context,
    _original_model,
    _split_and_gold,
    _state_sha,
    _train_fisher,
    _training_subset,
    _write_json,
    gold_seed,
)
from deepclean.harness.config import (
    NOT_IN_HP_FILE,
    PRESETS,
    TEST_HALVES_SEED,
    ExperimentConfig,
    _method_kwargs,
    _precheck,
    _precision_determinants,
    default_cache_dir,
    fisher_methods,
    hp_source,
    parse_seeds,
    preset,
    with_overrides,
)
from deepclean.harness.holdout import HeldOut, held_out
from deepclean.harness.locking import exclusive_lock
from deepclean.harness.records import (
    _evaluate_unlearned,
    _evaluator,
    _failed_record,
    _forgotten_text,
    _gaps,
    _resume_key,
    _reuse_finished,
    _write_audit,
    failed_records,
)
from deepclean.harness.resume import (
    check_cache_dir,
    check_out_dir,
    check_writable,
    remove_stale_temporaries,
)
from deepclean.methods import make_method, method_class
from deepclean.precision import (
    autocast,
)
from deepclean.report.build import build_report
from deepclean.reproducibility import deterministic, preserve_global_rng
from deepclean.training import resolve_device, synchronize

__all__ = [
    "PRESETS",
    "TEST_HALVES_SEED",
    "ExperimentConfig",
    "default_cache_dir",
    "evaluate_model",
    "failed_records",
    "fisher_methods",
    "gold_seed",
    "hp_source",
    "out_dir_lock",
    "parse_seeds",
    "preset",
    "run_experiment",
    "with_overrides",
]


def run_experiment(
    config: ExperimentConfig, *, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Run the experiment described by ``config`` (see :func:`_run_experiment` for the files).

    Under an initialised ``torch.distributed`` process group (``torchrun ... deepclean run``, or a
    caller that initialised one) every rank runs every step with the same seeds, so draws the same
    split and mask; the Fisher passes are split over the ranks and the masked fine-tunes run as
    DistributedDataParallel, the other methods and the evaluation run whole on every rank. Rank 0
    alone locks ``out_dir``, owns the model cache (trains or loads the original and gold models and
    sends their weights to the other ranks), decides what is resumed (and sends that decision),
    writes every file and logs; see ``docs/scale.md``. An error that rank 0 finds alone is
    raised on every rank.

    The caller's global random states (torch, NumPy, Python) are the same afterwards; with
    ``config.deterministic`` the run is under :func:`deepclean.reproducibility.deterministic`.
    An interrupted run started again with the same configuration and ``out_dir`` resumes: cached
    models and finished method results are reused (:mod:`deepclean.harness.resume`).
    """

    switch = deterministic(warn_only=True) if config.deterministic is True else nullcontext()
    config.validate()  # bad settings fail before the output folder is touched
    if not is_main_process():  # under torch.distributed rank 0 alone prints and shows progress
        log = _silent
        config = replace(config, progress=False)
    with preserve_global_rng(), switch, _main_process_lock(config.out_dir, "deepclean run"):
        return _run_experiment(config, log=log)


def _silent(text: str) -> None:
    """The log of the ranks other than 0 under torch.distributed: nothing."""


@contextmanager
def _main_process_lock(out_dir: str | Path, purpose: str) -> Iterator[None]:
    """:func:`out_dir_lock`, taken by rank 0 alone under torch.distributed; when rank 0 cannot
    take it (another run holds the folder), every rank raises its ``BusyError``."""
    with ExitStack() as stack:
        error = None
        if is_main_process():
            try:
                stack.enter_context(out_dir_lock(out_dir, purpose))
            except Exception as exc:
                error = exc
        agree_on_errors(error, what="locking the output folder (rank 0)")
        yield


def out_dir_lock(out_dir: str | Path, purpose: str):
    """An exclusive lock on an output folder (:func:`deepclean.harness.locking.exclusive_lock`): a second
    process writing into the same ``--out`` is refused at once (``BusyError``) instead of mixing
    its results with the first one's. A path that is a file is left to the folder checks."""

    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        return nullcontext()
    return exclusive_lock(path, purpose=purpose)


def _run_experiment(
    config: ExperimentConfig, *, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Run the experiment described by ``config`` and write its files into ``config.out_dir``.

    Files written (each atomically):

    - ``results/<dataset>_<model>_<scenario>_<method>_seed<seed>.json``: one per method, and one
      for ``gold`` and ``original``, with metrics, gaps to gold, time and hyperparameters;
    - ``splits/<dataset>_<scenario>_seed<seed>.json``: the split manifest (forget indices);
    - ``checkpoints/<...>.safetensors``: every model evaluated;
    - ``results.md``, ``results.csv``, ``tables/``, ``figures/``, ``report.html``: tables,
      figures and the report (:func:`deepclean.report.tables.build_report`).

    Each record holds, besides ``metrics`` and ``gaps``, ``mia_family`` (the four attacks of
    :func:`deepclean.evaluation.mia.mia_family`), ``distances`` (:func:`deepclean.evaluation.distances.distances_to_gold`)
    and ``summary`` (Avg. Gap, tug of war, RTE).
    - ``audit/<...>.json`` and ``.txt``: the audit record of every unlearning.

    Returns:
        The result records (the JSON payloads).

    Raises:
        ConfigurationError, DataError, DataNotFoundError: invalid configuration or data, an
            output folder that is a file or holds another configuration's results, before any
            training starts.
        SplitMismatchError: a gold model recorded for another split.
    """


    config.validate()
    out_dir = Path(config.out_dir)
    config_record = config.to_dict() | {"device_used": str(resolve_device(config.device))}
    error = None
    if is_main_process():  # rank 0 owns the output folder and the cache; the others wait
        try:
            check_cache_dir(Path(config.cache_dir) if config.cache_dir else default_cache_dir())
            resuming = check_out_dir(out_dir, config_record)
            check_writable(out_dir, "--out")
            if resuming:
                log(f"resuming in {out_dir}: finished results of this configuration are reused")
                remove_stale_temporaries(out_dir)
        except Exception as exc:
            error = exc
    agree_on_errors(error, what="checking the output and cache folders (rank 0)")
    ctx = _make_context(config, log)
    data, device, out_dir = ctx.data, ctx.device, ctx.out_dir
    _precheck(config, data)
    if is_main_process():
        _write_json(out_dir / "config.json", config_record)
    records: list[dict[str, Any]] = []
    for seed in config.seeds:
        subset, x_train, y_train = _training_subset(ctx, seed)
        for model_name in config.models:
            log(f"[seed {seed}] {config.dataset} / {model_name} (width {config.width}): "
                f"{x_train.shape[0]} training samples, device {device}")
            if torch.device(device).type == "cpu" and config.width >= 1.0 \
                    and model_name != "small_cnn" and x_train.shape[0] > 20_000:
                log("  warning: a full-width model on more than 20,000 training images on a CPU "
                    "takes hours per trained model (original, gold); the default preset "
                    "(--preset default) is sized for a CPU")
            original, original_meta = _original_model(
                ctx, model_name=model_name, seed=seed, subset=subset, x_train=x_train,
                y_train=y_train,
            )
            train_fisher = _train_fisher(ctx, model_name=model_name, original=original,
                                         original_meta=original_meta, x_train=x_train,
                                         y_train=y_train)
            pool = held_out(data, subset, seed=seed, test_half=config.test_half,
                            validation=ctx.validation)
            original_meta = original_meta | {
                "memorisation": _memorisation(ctx, original, pool, x_train, y_train, seed)}
            for scenario in config.scenarios:
                records += _run_scenario(
                    ctx, scenario=scenario, seed=seed, model_name=model_name, subset=subset,
                    x_train=x_train, y_train=y_train, original=original,
                    original_meta=original_meta, train_fisher=train_fisher, pool=pool,
                )
    if is_main_process():
        tables = build_report(out_dir, records=records)
        log(tables)
    return records


def _memorisation(ctx: _Context, original: torch.nn.Module, pool: HeldOut,
                  x_train: torch.Tensor, y_train: torch.Tensor, seed: int) -> dict[str, Any]:
    """How much the original model memorised (:func:`deepclean.evaluation.memorisation`): its
    training subset against held-out samples it never saw: the training images outside the
    subset when there are any, else the validation half of the test set (never the half that
    tuning leaves for reporting). Logged, with a warning when it is too small for random
    forgetting to test anything."""
    source = pool.source
    m = memorisation(original, x_train, y_train, pool.x, pool.y, seed=seed, device=ctx.device,
                     precision=ctx.cfg.precision) | {"holdout": source}
    ctx.log(f"  memorisation of the original model: train {m['acc_train']:.2f} % vs held-out "
            f"{m['acc_holdout']:.2f} % ({source}), loss-attack AUC {m['attack_auc']:.3f}")
    if m["too_small_for_random_forgetting"] and "random" in ctx.cfg.scenarios:
        ctx.log("  WARNING: the original model has hardly memorised its training data; random "
                "forgetting will look solved by any method (train longer or on fewer samples)")
    return m


def _run_scenario(
    ctx: _Context,
    *,
    scenario: str,
    seed: int,
    model_name: str,
    subset: torch.Tensor,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    original: torch.nn.Module,
    original_meta: dict[str, Any],
    train_fisher: Any = None,
    pool: HeldOut | None = None,
) -> list[dict[str, Any]]:
    cfg, data, device = ctx.cfg, ctx.data, ctx.device
    split, gold, gold_meta = _split_and_gold(
        ctx, scenario=scenario, seed=seed, model_name=model_name, subset=subset,
        x_train=x_train, y_train=y_train,
    )
    evaluate, gold_spread = _evaluator(ctx, seed=seed, model_name=model_name, subset=subset,
                                       split=split, x_train=x_train, y_train=y_train,
                                       original=original, gold=gold)
    gold_metrics, gold_extended = evaluate(gold, is_gold=True)
    spread = gold_spread(gold_metrics)
    for j, gaps in enumerate(spread, start=1):
        ctx.log(f"  gold model {j + 1} vs gold: dAcc_Dr {gaps['d_acc_retain']:+.2f}, dAcc_Df "
                f"{gaps['d_acc_forget']:+.2f}, dMIA {gaps['d_mia']:+.2f} points (the spread "
                "between two valid retrains)")
    base = {
        "dataset": cfg.dataset,
        "model": model_name,
        "width": cfg.width,
        "scenario": scenario,
        "seed": seed,
        "n_train": int(x_train.shape[0]),
        "n_forget": int(split.forget.numel()),
        "forgotten": _forgotten_text(cfg, scenario, split),
        "n_retain": int(split.retain.numel()),
        "forget_sha256": split.digest,
        "gold_metrics": gold_metrics,
        "gold_time_s": gold_meta["train_time_s"],
        "gold_seeds": cfg.gold_seeds,
        "gold_spread": spread,
        "recipe": cfg.train.to_dict(),
        "torch_version": torch.__version__,
        **_precision_determinants(cfg),
    }
    stem = f"{cfg.dataset}_{model_name}_{scenario}"
    records = []
    original_sha = original_meta.get("state_sha256") or _state_sha(original)

    def record(method: str, model: torch.nn.Module, evaluated: tuple[dict, dict],
               extra: dict, audit: dict | None = None) -> dict:
        metrics, extended = evaluated
        rec = base | {"method": method, "metrics": metrics, "precision": cfg.precision,
                      "channels_last": cfg.channels_last} | extended | extra
        rec["gaps"] = _gaps(metrics, gold_metrics)
        rec["summary"] = summary_of(metrics, gold_metrics, time_s=rec.get("time_s"),
                                    gold_time_s=gold_meta["train_time_s"])
        name = f"{stem}_{method}_seed{seed}"
        rec["state_sha256"] = _state_sha(model)
        records.append(rec)
        if not is_main_process():  # every rank computed it; rank 0 alone writes it
            return rec
        # checkpoint, then audit record, then result JSON (the mark of a finished method)
        save_checkpoint(ctx.out_dir / "checkpoints" / f"{name}.safetensors", model,
                        {"method": method, "forget_sha256": split.digest, "seed": seed,
                         "dataset": cfg.dataset, "model": model_name, "width": cfg.width})
        if audit is not None:
            _write_audit(ctx, name, audit, original=original, unlearned=model, split=split,
                         metrics=metrics, gold_metrics=gold_metrics, rec=rec)
        _write_json(ctx.out_dir / "results" / f"{name}.json", rec)
        return rec

    forget = TensorDataset(x_train[split.forget], y_train[split.forget])
    retain = TensorDataset(x_train[split.retain], y_train[split.retain])
    verdict_of = _verdict_judge(ctx, pool, forget, original, scenario, seed)
    record("original", original, evaluate(original),
           {"time_s": None, "train_time_s": original_meta["train_time_s"], "hyperparameters": {},
            "memorisation": original_meta.get("memorisation"), "verdict": verdict_of(original)})
    gold_verdict = verdict_of(gold)
    ctx.log(f"  gold: verdict {gold_verdict['summary']}")
    record("gold", gold, (gold_metrics, gold_extended),
           {"time_s": gold_meta["train_time_s"], "hyperparameters": cfg.train.to_dict(),
            "verdict": gold_verdict})
    for name in cfg.methods:
        uses_tf = train_fisher is not None and method_class(name).accepts_train_fisher
        method = make_method(name, **_method_kwargs(cfg, name, scenario, seed, device,
                                                    model_name, data,
                                                    train_fisher if uses_tf else None,
                                                    holdout=None if pool is None else pool.choice))
        resume_key = _resume_key(base, original_sha, name,
                                 method.hyperparameters() | {"precomputed_fisher": uses_tf})
        done = _reuse_finished(ctx, f"{stem}_{name}_seed{seed}", resume_key)
        if done is not None:
            records.append(done)
            ctx.log(f"  {name}: reused the finished result of an earlier run")
            continue
        ctx.log(f"  unlearning with {name} ...")
        if hp_source(cfg, name, scenario) == NOT_IN_HP_FILE:
            ctx.log(f"  {name}: warning: the hyperparameter file holds no values of {name} for "
                    f"{scenario} forgetting; it runs at its defaults (tune it with deepclean "
                    "tune, or drop it from --methods)")
        started_at = utc_now()
        synchronize(device)
        start = time.perf_counter()
        try:
            with autocast(device, cfg.precision):  # its overhead is part of the unlearning time
                unlearned = method.unlearn(original, forget, retain)
            synchronize(device)
            seconds = time.perf_counter() - start
            finished_at = utc_now()
            evaluated = _evaluate_unlearned(evaluate, unlearned, name)
        except DivergenceError as exc:
            records.append(_failed_record(ctx, base, stem, name, seed, exc, method,
                                          hp_source(cfg, name, scenario), resume_key))
            continue
        metrics = evaluated[0]
        rec = record(name, unlearned, evaluated, {
            "time_s": seconds,
            **({"precompute_time_s": train_fisher.time_s} if uses_tf else {}),
            "hyperparameters": method.hyperparameters(),
            "hp_source": hp_source(cfg, name, scenario),
            "resume_key": resume_key,
            "world_size": world_size(),  # processes that ran it (torchrun); not in the key
            **{k: v for k, v in method.info_.items() if isinstance(v, (int, float, str))},
            **({"auto_gamma": method.info_["auto_gamma"]} if "auto_gamma" in method.info_
               else {}),
            "verdict": verdict_of(unlearned),
        }, audit={"method": method, "started_at": started_at, "finished_at": finished_at,
                  "duration_s": seconds})
        ctx.log(f"  {name}: Acc_Dr {metrics['acc_retain']:.2f}  Acc_Df {metrics['acc_forget']:.2f}"
                f"  MIA {metrics['mia']:.2f}  dAcc_Df {rec['gaps']['d_acc_forget']:+.2f}"
                f"  time {seconds:.1f} s")
        if "auto_gamma" in rec:
            where = "" if pool is None else f" ({len(pool.choice)} samples, {pool.source})"
            how = ("" if rec["auto_gamma"].get("candidates") else
                   "; no candidate tried: the original already treats D_f like held-out data, "
                   "so the smallest reset share of the grid")
            ctx.log(f"  {name}: gamma chosen on held-out data{where}: {rec['gamma']:.4g} "
                    f"({100 * rec['share_reset']:.2f} % of the weights reset{how})")
        ctx.log(f"  {name}: verdict {rec['verdict']['summary']}")
    return records


def _verdict_judge(ctx: _Context, pool: HeldOut | None, forget: TensorDataset,
                   original: torch.nn.Module, scenario: str,
                   seed: int) -> Callable[[torch.nn.Module], dict[str, Any]]:
    """``verdict_of(model) -> dict``: the forgetting verdict of ``model`` on the ``verdict`` half
    of the held-out pool (:meth:`ForgettingVerdict.to_dict`), or ``{"summary": "not measurable:
    ...", "passed": None}`` when the pool cannot judge it (no pool, or a class of D_f with no
    held-out sample). Class forgetting judges utility on held-out samples of the other classes;
    random forgetting and a deletion request on held-out samples of every class."""
    if pool is None:
        return lambda model: {"summary": "not measurable: no held-out data", "passed": None}
    xv, yv = pool.verdict.tensors
    if scenario == "class":
        keep = ~torch.isin(yv, forget.tensors[1].unique())
        retained = TensorDataset(xv[keep], yv[keep])
    else:
        retained = pool.verdict

    def judge(model: torch.nn.Module) -> dict[str, Any]:
        try:
            v = forgetting_verdict(model, forget, pool.verdict, original=original,
                                   retained_holdout=retained, seed=seed, device=ctx.device)
        except DataError as exc:
            return {"summary": f"not measurable: {exc}", "passed": None}
        return v.to_dict() | {"holdout": pool.source}

    base = judge(original)
    if not base.get("forgotten"):
        return lambda model: base if model is original else judge(model)

    # The original already treats D_f like held-out data: it memorised too little of D_f for
    # the verdict to tell an unlearned model from an unchanged one, so no model passes. What
    # can still be measured fails as before: utility lost, or D_f now told apart from held-out
    # data (NOT FORGOTTEN) where the original's was not.
    def cannot_tell(model: torch.nn.Module) -> dict[str, Any]:
        v = base if model is original else judge(model)
        if v.get("passed") is None or not v.get("forgotten"):
            return v
        rest = v["summary"].split(": ", 1)[-1]
        if not v.get("utility_kept"):
            return v | {"passed": False, "passed_as_measured": False,
                        "summary": CANNOT_TELL_UTILITY_LOST + rest}
        return v | {"passed": None, "passed_as_measured": v["passed"],
                    "summary": CANNOT_TELL + rest}

    return cannot_tell


#: Head of a verdict when the original model itself passes (GUIDE.md section 9: the verdict
#: must be able to fail the original for its pass to mean anything).
CANNOT_TELL = ("CANNOT TELL (the original model already treats D_f like held-out data: it "
               "memorised too little of D_f for forgetting to be measured): ")
#: Head of such a verdict when held-out accuracy on the retained classes dropped beyond its
#: tolerance: a failure, whatever the forgetting check says.
CANNOT_TELL_UTILITY_LOST = ("CANNOT TELL, UTILITY LOST (the original model already treats D_f "
                            "like held-out data, so forgetting cannot be measured; held-out "
                            "accuracy on the retained classes dropped): ")


# --- shared with the gamma sweep (deepclean.harness.sweep): data, original, split, gold, evaluation ---


