"""Evaluating a model against its gold model and writing its records: metrics, gaps, the MIA
family and distances, failed runs, resume keys and audit records."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from deepclean._version import __version__
from deepclean.data.splits import ForgetSplit
from deepclean.distributed import broadcast_from_main, is_main_process
from deepclean.errors import DataError, DivergenceError
from deepclean.evaluation.evaluate import evaluate
from deepclean.evaluation.outputs import (
    ModelOutputs,
    build_reference,
    model_outputs,
)
from deepclean.harness.audit import audit_record, write_audit
from deepclean.harness.cache import _Context, _gold_model, _write_json, gold_seed
from deepclean.harness.config import ExperimentConfig
from deepclean.harness.resume import (
    load_finished,
    method_key,
)


def _gaps(metrics: dict[str, float], gold_metrics: dict[str, float]) -> dict[str, float]:
    """dAcc_Df, dAcc_Dr, dAcc_test and dMIA: the method's value minus the gold model's, in
    points (paper section 4)."""
    return {
        "d_acc_forget": metrics["acc_forget"] - gold_metrics["acc_forget"],
        "d_acc_retain": metrics["acc_retain"] - gold_metrics["acc_retain"],
        "d_acc_test": metrics["acc_test"] - gold_metrics["acc_test"],
        "d_mia": metrics["mia"] - gold_metrics["mia"],
    }




def _forgotten_text(cfg: ExperimentConfig, scenario: str, split: ForgetSplit) -> str:
    """What the scenario forgets, in words, for the report and the audit record."""
    n_f, n = int(split.forget.numel()), int(split.n)
    share = f"{n_f} of {n} training samples ({100.0 * n_f / n:.1f} %)"
    if scenario == "class":
        classes = ", ".join(str(c) for c in cfg.forget_classes)
        return f"class {classes}: {share}" if len(cfg.forget_classes) == 1 else \
            f"classes {classes}: {share}"
    if scenario == "random":
        return f"a random {100.0 * cfg.forget_fraction:g} % of the training samples: {share}"
    return f"the requested training indices: {share}"


def _evaluate_unlearned(evaluate: Callable, model: torch.nn.Module, name: str):
    """``evaluate(model)``; outputs with NaN or infinity (finite but huge weights) are a
    divergence of the method, not bad input: the inputs were checked before any work."""

    try:
        return evaluate(model)
    except DataError as exc:
        if "NaN or infinity" not in str(exc):
            raise
        raise DivergenceError(f"{name}: the unlearned model's outputs are not finite ({exc})") \
            from exc


def _failed_record(ctx: _Context, base: dict[str, Any], stem: str, name: str, seed: int,
                   exc: DivergenceError, method: Any, source: str, resume_key: str
                   ) -> dict[str, Any]:
    """Record a method that failed (diverged): ``status`` "failed" and the reason, no metrics.
    The other methods and scenarios still run; ``deepclean run`` exits with status 4."""
    rec = base | {"method": name, "status": "failed", "failure": str(exc), "metrics": None,
                  "time_s": None, "hyperparameters": method.hyperparameters(),
                  "hp_source": source, "resume_key": resume_key}
    if is_main_process():  # under torch.distributed every rank failed alike; rank 0 writes
        _write_json(ctx.out_dir / "results" / f"{stem}_{name}_seed{seed}.json", rec)
    ctx.log(f"  {name}: FAILED: {exc}")
    return rec


def failed_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of methods that failed (``status == "failed"``)."""
    return [r for r in records if r.get("status") == "failed"]


def _evaluator(ctx: _Context, *, seed: int, model_name: str, subset: torch.Tensor,
               split: ForgetSplit, x_train: torch.Tensor, y_train: torch.Tensor,
               original: torch.nn.Module, gold: torch.nn.Module):
    """``(evaluate, gold_spread)``.

    ``evaluate(model, is_gold=False, extended=True) -> (paper metrics, {"mia_family",
    "distances"})`` (the second dict empty with ``extended=False``). ``gold_spread(gold_metrics)
    -> list`` gives, for each extra gold model, its paper metrics minus the gold model's (the
    :func:`_gaps` of a model that is itself a valid retrain: the gold-versus-gold spread, in
    points; empty with one gold model).

    Trains (or loads) the ``gold_seeds - 1`` extra gold models first; every model's logits are
    computed once per call.
    """
    data, device = ctx.data, ctx.device
    outputs = lambda m: model_outputs(m, x_train, data.test_x, device,  # noqa: E731
                                      precision=ctx.cfg.precision)
    extra = []
    for j in range(1, ctx.cfg.gold_seeds):
        other, _ = _gold_model(ctx, model_name=model_name, seed=gold_seed(seed, j),
                               subset=subset, split=split, x_train=x_train, y_train=y_train)
        extra.append((other, outputs(other)))
    reference = build_reference(gold=gold, gold_outputs=outputs(gold), split=split,
                                original=original, extra=extra)

    def evaluate_one(model: torch.nn.Module, *, is_gold: bool = False, extended: bool = True,
                     out: ModelOutputs | None = None) -> tuple[dict, dict]:
        if out is None:
            out = reference.gold_outputs if model is gold else outputs(model)
        return evaluate(model, x_train=x_train, y_train=y_train, split=split,
                        x_test=data.test_x, y_test=data.test_y, outputs=out,
                        reference=reference if extended else None, seed=seed, is_gold=is_gold,
                        device=device, precision=ctx.cfg.precision)

    def gold_spread(gold_metrics: dict[str, float]) -> list[dict[str, float]]:
        # the extra gold models' outputs were computed above: no second forward pass
        return [_gaps(evaluate_one(other, extended=False, out=other_out)[0], gold_metrics)
                for other, other_out in extra]

    return evaluate_one, gold_spread


def _resume_key(base: dict[str, Any], original_sha: str, method: str,
                hyperparameters: dict[str, Any]) -> str:
    """Hash of everything one method's result depends on (see :mod:`deepclean.harness.resume`)."""

    return method_key({
        "base": {k: v for k, v in base.items() if k not in ("gold_metrics", "gold_time_s", "gold_spread")},
        "original_sha256": original_sha, "method": method, "hyperparameters": hyperparameters,
        "deepclean_version": __version__,
    })


def _reuse_finished(ctx: _Context, name: str, key: str) -> dict[str, Any] | None:
    """The finished result ``name`` of an earlier run with the same key, else ``None``.

    Under ``torch.distributed`` rank 0 alone reads the output folder and sends its decision (the
    record, or None) to the other ranks, so every rank reuses or recomputes alike; a collective.
    """

    record, error = None, None
    if is_main_process():
        try:
            record, why = load_finished(
                ctx.out_dir / "results" / f"{name}.json",
                ctx.out_dir / "checkpoints" / f"{name}.safetensors", key,
                audit_path=ctx.out_dir / "audit" / f"{name}.json",
            )
            if record is None and why != "no result yet":
                ctx.log(f"  {name}: recomputing ({why})")
        except Exception as exc:
            error = exc
    return broadcast_from_main(record, error=error, what=f"reading the earlier result {name}")


def _write_audit(ctx: _Context, name: str, audit: dict[str, Any], *, original: torch.nn.Module,
                 unlearned: torch.nn.Module, split: ForgetSplit, metrics: dict[str, float],
                 gold_metrics: dict[str, float], rec: dict[str, Any]) -> None:

    report = audit_record(
        before=original, after=unlearned, forget_indices=split.forget, n_train=split.n,
        method=audit["method"], metrics=metrics, gold_metrics=gold_metrics,
        started_at=audit["started_at"], finished_at=audit["finished_at"],
        duration_s=audit["duration_s"], store_indices=ctx.cfg.store_indices,
        extra={"dataset": rec["dataset"], "model": rec["model"], "scenario": rec["scenario"],
               "seed": rec["seed"], "forget_sha256": split.digest,
               "indices_refer_to": "the training subset (see splits/ for its map to the data set)",
               "checkpoint": f"checkpoints/{name}.safetensors",
               "result": f"results/{name}.json", "device": str(ctx.device),
               "precision": ctx.cfg.precision, "channels_last": ctx.cfg.channels_last,
               **({"fisher_mode": rec["fisher_mode"]} if "fisher_mode" in rec else {}),
               **({"precompute_time_s": rec["precompute_time_s"]}
                  if "precompute_time_s" in rec else {})},
    )
    if "verdict" in rec:  # judged without the gold model: what a deletion request can show
        report["evaluation"]["verdict"] = rec["verdict"]
    if "auto_gamma" in rec:
        report["method"]["auto_gamma"] = rec["auto_gamma"]
    write_audit(report, ctx.out_dir / "audit", name)
