"""The one evaluation entry: the paper's metrics of a model on a split and, given the gold
reference, the MIA family and the distances to gold (section 4 of the paper, GUIDE.md section 4).

:func:`evaluate` is what every caller uses (the run, the sweep, tuning); :func:`paper_metrics`
computes the four paper metrics from probabilities and is shared with the gold-free audit
(:func:`deepclean.harness.audit.evaluate_for_audit`).
"""

from __future__ import annotations

from typing import Any

import torch

from deepclean.data.splits import ForgetSplit
from deepclean.evaluation.metrics import accuracy, entropy_mia, predict_proba
from deepclean.evaluation.outputs import (
    GoldReference,
    ModelOutputs,
    extended_metrics,
    model_outputs,
)

__all__ = ["evaluate", "evaluate_model", "paper_metrics"]


def paper_metrics(p_retain: torch.Tensor, y_retain: torch.Tensor, p_forget: torch.Tensor,
                  y_forget: torch.Tensor, p_test: torch.Tensor, y_test: torch.Tensor
                  ) -> dict[str, float]:
    """Acc_Dr, Acc_Df, Acc_test (%) and the paper's entropy MIA (% of D_f called member, the
    attack fitted on D_r against test) from softmax outputs ``(N, K)`` and labels ``(N,)``."""
    return {
        "acc_retain": accuracy(p_retain, y_retain),
        "acc_forget": accuracy(p_forget, y_forget),
        "acc_test": accuracy(p_test, y_test),
        "mia": entropy_mia(p_retain, p_test, p_forget),
    }


def evaluate_model(
    model: torch.nn.Module,
    *,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    split: ForgetSplit,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    device: torch.device | str | None = None,
    outputs: ModelOutputs | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """The paper's metrics of one model.

    Args:
        outputs: the model's logits on ``x_train`` and ``x_test`` when already computed
            (:func:`deepclean.evaluation.outputs.model_outputs`); the same softmax is applied.
        precision: ``"fp32"`` or ``"bf16"``: the forward passes when ``outputs`` is not given
            (:func:`deepclean.evaluation.metrics.predict_logits`; the logits are float32 either way).

    Returns:
        ``acc_retain``, ``acc_forget``, ``acc_test`` (accuracy in % on D_r, D_f, test) and ``mia``
        (% of D_f called member by the entropy attack fitted on D_r vs test).
    """
    if outputs is None:
        probs_train = predict_proba(model, x_train, device=device, precision=precision)
        probs_test = predict_proba(model, x_test, device=device, precision=precision)
    else:
        probs_train, probs_test = outputs.probs_train, outputs.probs_test
    return paper_metrics(probs_train[split.retain], y_train[split.retain],
                         probs_train[split.forget], y_train[split.forget], probs_test, y_test)


def evaluate(
    model: torch.nn.Module,
    *,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    split: ForgetSplit,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    reference: GoldReference | None = None,
    outputs: ModelOutputs | None = None,
    seed: int = 0,
    is_gold: bool = False,
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> tuple[dict[str, float], dict[str, Any]]:
    """Everything reported about one model.

    Args:
        x_train, y_train: the training subset ``(N, ...)`` / ``(N,)``; ``split`` indexes it.
        x_test, y_test: the test set (or the half of it that is reported).
        reference: the gold reference (:func:`deepclean.evaluation.outputs.build_reference`);
            without it only the paper's metrics are computed.
        outputs: the model's logits when already computed (e.g. the gold model's).
        seed: seeds the attacks' subsampling.
        is_gold: the evaluated model is the gold model itself (LiRA then uses the other gold
            models only).

    Returns:
        ``(metrics, extended)``: the paper's metrics (:func:`evaluate_model`) and, with a
        reference, ``{"mia_family": ..., "distances": ...}`` (else ``{}``).
    """
    metrics = evaluate_model(model, x_train=x_train, y_train=y_train, split=split, x_test=x_test,
                             y_test=y_test, device=device, outputs=outputs, precision=precision)
    if reference is None:
        return metrics, {}
    if outputs is None:
        outputs = model_outputs(model, x_train, x_test, device, precision=precision)
    return metrics, extended_metrics(model, outputs, reference, split=split, y_train=y_train,
                                     y_test=y_test, seed=seed, is_gold=is_gold)
