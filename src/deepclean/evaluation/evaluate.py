"""The one evaluation entry: the paper's metrics of a model on a split and, given the gold
reference, the MIA family and the distances to gold (section 4 of the paper, GUIDE.md section 4).

:func:`evaluate` is what every caller uses (the run, the sweep, tuning); :func:`paper_metrics`
computes the four paper metrics from probabilities and is shared with the gold-free audit
(:func:`deepclean.harness.audit.evaluate_for_audit`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from deepclean.data.splits import ForgetSplit
from deepclean.errors import ConfigurationError
from deepclean.evaluation.metrics import accuracy, dataset_labels, entropy_mia, predict_proba
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


def _labels(x: torch.Tensor | Dataset, y: torch.Tensor | None, known: torch.Tensor | None,
            name: str) -> torch.Tensor:
    """The labels of ``x``: ``y`` for tensors of inputs, else the Dataset's own."""
    if isinstance(x, torch.Tensor):
        if y is None:
            raise ConfigurationError(f"y_{name} is required with a tensor x_{name}; or pass "
                                     f"x_{name} as a Dataset of (x, y) pairs")
        return y
    if y is not None:
        raise ConfigurationError(f"x_{name} is a Dataset, whose labels are used: pass "
                                 f"y_{name}=None")
    return known if known is not None else dataset_labels(x)


def evaluate_model(
    model: torch.nn.Module,
    *,
    x_train: torch.Tensor | Dataset,
    y_train: torch.Tensor | None = None,
    split: ForgetSplit,
    x_test: torch.Tensor | Dataset,
    y_test: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    outputs: ModelOutputs | None = None,
    precision: str = "fp32",
    num_workers: int = 0,
    pin_memory: bool = False,
    distributed: bool | None = None,
) -> dict[str, float]:
    """The paper's metrics of one model.

    Args:
        x_train, y_train: the training subset: inputs ``(N, ...)`` and labels ``(N,)``, or a
            ``Dataset`` of ``(x, y)`` pairs and ``y_train=None``; ``split`` indexes it.
        x_test, y_test: the test set, likewise.
        outputs: the model's logits on ``x_train`` and ``x_test`` when already computed
            (:func:`deepclean.evaluation.outputs.model_outputs`); the same softmax is applied.
        precision: ``"fp32"`` or ``"bf16"``: the forward passes when ``outputs`` is not given
            (:func:`deepclean.evaluation.metrics.predict_logits`; the logits are float32 either way).
        num_workers, pin_memory: ``DataLoader`` options for a ``Dataset`` that is not in memory
            (read one batch at a time).
        distributed: under ``torch.distributed`` (``None``: automatic) each rank computes the
            outputs of its block of the samples and every rank gets all of them (gathered in
            order), so every rank returns the same metrics; ``False``: each rank computes all.

    Returns:
        ``acc_retain``, ``acc_forget``, ``acc_test`` (accuracy in % on D_r, D_f, test) and ``mia``
        (% of D_f called member by the entropy attack fitted on D_r vs test).

    Raises:
        ConfigurationError: a tensor ``x_*`` without its labels, or a ``Dataset`` with them.
        DataError: empty or malformed data (see
            :func:`deepclean.evaluation.metrics.predict_logits`).
    """
    options = dict(device=device, precision=precision, num_workers=num_workers,
                   pin_memory=pin_memory, distributed=distributed)
    streamed = not (isinstance(x_train, torch.Tensor) and isinstance(x_test, torch.Tensor))
    if outputs is None and streamed:
        outputs = model_outputs(model, x_train, x_test, **options)
    if outputs is None:
        probs_train = predict_proba(model, x_train, **options)
        probs_test = predict_proba(model, x_test, **options)
    else:
        probs_train, probs_test = outputs.probs_train, outputs.probs_test
    y_train = _labels(x_train, y_train, outputs.y_train if outputs else None, "train")
    y_test = _labels(x_test, y_test, outputs.y_test if outputs else None, "test")
    return paper_metrics(probs_train[split.retain], y_train[split.retain],
                         probs_train[split.forget], y_train[split.forget], probs_test, y_test)


def evaluate(
    model: torch.nn.Module,
    *,
    x_train: torch.Tensor | Dataset,
    y_train: torch.Tensor | None = None,
    split: ForgetSplit,
    x_test: torch.Tensor | Dataset,
    y_test: torch.Tensor | None = None,
    reference: GoldReference | None = None,
    outputs: ModelOutputs | None = None,
    seed: int = 0,
    is_gold: bool = False,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    num_workers: int = 0,
    pin_memory: bool = False,
    distributed: bool | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Everything reported about one model.

    Args:
        x_train, y_train: the training subset ``(N, ...)`` / ``(N,)``, or a ``Dataset`` of
            ``(x, y)`` pairs and ``y_train=None``; ``split`` indexes it.
        x_test, y_test: the test set (or the half of it that is reported), likewise.
        reference: the gold reference (:func:`deepclean.evaluation.outputs.build_reference`);
            without it only the paper's metrics are computed.
        outputs: the model's logits when already computed (e.g. the gold model's).
        seed: seeds the attacks' subsampling.
        is_gold: the evaluated model is the gold model itself (LiRA then uses the other gold
            models only).
        num_workers, pin_memory, distributed: as :func:`evaluate_model` (a ``Dataset`` is read
            once per model, one batch at a time; under a process group each rank computes its
            block and the attacks see every sample exactly once, on every rank).

    Returns:
        ``(metrics, extended)``: the paper's metrics (:func:`evaluate_model`) and, with a
        reference, ``{"mia_family": ..., "distances": ...}`` (else ``{}``).

    Raises:
        ConfigurationError, DataError: as :func:`evaluate_model`.
    """
    options = dict(device=device, precision=precision, num_workers=num_workers,
                   pin_memory=pin_memory, distributed=distributed)
    streamed = not (isinstance(x_train, torch.Tensor) and isinstance(x_test, torch.Tensor))
    if outputs is None and streamed:
        outputs = model_outputs(model, x_train, x_test, **options)
    metrics = evaluate_model(model, x_train=x_train, y_train=y_train, split=split, x_test=x_test,
                             y_test=y_test, outputs=outputs, **options)
    if reference is None:
        return metrics, {}
    if outputs is None:
        outputs = model_outputs(model, x_train, x_test, **options)
    y_train = _labels(x_train, y_train, outputs.y_train, "train")
    y_test = _labels(x_test, y_test, outputs.y_test, "test")
    return metrics, extended_metrics(model, outputs, reference, split=split, y_train=y_train,
                                     y_test=y_test, seed=seed, is_gold=is_gold)
