"""Evaluation metrics of the paper: accuracies and the entropy membership-inference attack.

Paper (Shi et al., arXiv 2311.10448, section 4): Acc_Dr, dAcc_Df = Acc_Df(unlearned) - Acc_Df(gold),
dMIA = MIA(unlearned) - MIA(gold). The MIA is a logistic regression with balanced class weights on
one feature, the entropy of the softmax output, fitted on D_r (members, label 1) against the test
set (non-members, label 0); MIA is the share of D_f predicted "member", in %. The target is the gold
model's value, not 0.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from deepclean.data.datasets import (
    as_tensors,
    check_loader_options,
    dataset_size,
    in_memory,
    iterate_batches,
    stream_batches,
)
from deepclean.distributed import all_gather_rows, shard_indices, use_distributed
from deepclean.errors import ConfigurationError, DataError
from deepclean.fisher.diagonal import eval_mode
from deepclean.precision import autocast

__all__ = ["predict_logits", "predict_proba", "sample_logits", "dataset_labels", "accuracy",
           "entropy", "entropy_mia", "membership_attack"]

def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigurationError(f"batch_size must be an int >= 1, got {batch_size!r}; e.g. 1000")


def _model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _per_sample(
    model: nn.Module | None, data: torch.Tensor | Dataset, *, batch_size: int,
    device: torch.device | str | None, precision: str, num_workers: int, pin_memory: bool,
    distributed: bool | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(logits (N, K) float32 CPU or None without a model, labels (N,) int64 CPU or None for a
    tensor of inputs)``; sharded and gathered under a process group (see
    :func:`predict_logits`)."""
    _check_batch_size(batch_size)
    check_loader_options(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False)
    sharded = use_distributed(distributed)
    if isinstance(data, torch.Tensor):
        x, y = data, None
        n = int(x.shape[0]) if x.ndim else 0
    elif in_memory(data):
        x, y = as_tensors(data)
        n = int(x.shape[0])
    else:
        x, y = None, None
        n = dataset_size(data)
    if n == 0:
        raise DataError("no samples to evaluate; expected at least one input")
    own = shard_indices(n) if sharded else range(n)
    dev = _model_device(model, device) if model is not None else None
    logits: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    error: BaseException | None = None
    try:
        # eval mode and autocast also on a rank without samples: a bad precision fails alike
        with (eval_mode(model) if model is not None else nullcontext(),
              autocast(dev, precision) if model is not None else nullcontext()):
            if x is not None:
                if model is not None and len(own):
                    part = x[own.start:own.stop]
                    logits = torch.cat([
                        model(xb).float().cpu() for _, xb, _ in iterate_batches(
                            part, torch.zeros(part.shape[0]), batch_size=batch_size, device=dev)])
            elif len(own):
                out, ys = [], []
                for xb, yb in stream_batches(Subset(data, own) if sharded else data,
                                             batch_size=batch_size, num_workers=num_workers,
                                             pin_memory=pin_memory):
                    if model is not None:
                        out.append(model(xb.to(dev, non_blocking=pin_memory)).float().cpu())
                    ys.append(yb)
                logits = torch.cat(out) if out else None
                labels = torch.cat(ys)
    except Exception as exc:  # under a process group every rank must learn of it
        if not sharded:
            raise
        error = exc
    if sharded:
        what = "the per-sample outputs"
        if model is not None:
            logits = all_gather_rows(logits, error=error, total=n, what=what)
            error = None
        if x is None:
            labels = all_gather_rows(labels, error=error, total=n, what="the labels")
    return logits, (y if x is not None else labels)


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor | Dataset, *, batch_size: int = 1000,
    device: torch.device | str | None = None, precision: str = "fp32", num_workers: int = 0,
    pin_memory: bool = False, distributed: bool | None = None,
) -> torch.Tensor:
    """Logits ``(N, K)`` (float32, CPU) of ``model`` in eval mode on ``N`` inputs, in their order.

    ``x``: inputs ``(N, ...)``, or a ``Dataset`` of ``(x, y)`` pairs (the labels are not used
    here; :func:`sample_logits` returns them too).

    With ``precision="bf16"`` the forward passes run under bfloat16 autocast
    (:func:`deepclean.precision.autocast`) and the logits are converted to float32; so are those
    computed inside an autocast context of the caller. The model's modes are restored afterwards.
    ``batch_size`` samples per forward pass (the result does not depend on it beyond rounding).

    Data: a tensor of inputs ``(N, ...)`` (sliced directly), a ``TensorDataset`` of ``(x, y)`` or a
    ``Subset`` of one (sliced directly, the same numbers as its tensors), or any other map-style
    ``Dataset`` of ``(x, y)`` pairs, read through a ``DataLoader`` in the data set's own order
    (``num_workers``, ``pin_memory``), so memory holds one batch of inputs at a time; the outputs
    are in the data set's order either way.

    Under ``torch.distributed`` (``distributed=None`` and an initialised process group of more
    than one rank, or ``distributed=True``) every rank must pass the same model and the same
    *whole* data: rank r computes only its contiguous block
    :func:`deepclean.distributed.shard_indices` (no padding: every sample exactly once; blocks
    may differ by one, some may be empty), and the per-sample rows are all-gathered in data-set
    order (:func:`deepclean.distributed.all_gather_rows`), so every rank returns the whole
    ``(N, ...)`` result, equal to one process's up to rounding. A failure on one rank raises on
    every rank. ``distributed=False``: every rank computes everything alone.

    Raises:
        ConfigurationError: ``precision`` is not ``"fp32"`` or ``"bf16"``; ``batch_size`` not an
            int >= 1; bad loader options; ``distributed=True`` without a process group; under
            one, ranks that passed data of different lengths.
        DataError: no samples; an item of a Dataset that is not an ``(x, y)`` pair with an
            integer label.
    """
    return _per_sample(model, x, batch_size=batch_size, device=device, precision=precision,
                       num_workers=num_workers, pin_memory=pin_memory, distributed=distributed)[0]


@torch.no_grad()
def sample_logits(
    model: nn.Module, data: Dataset, *, batch_size: int = 1000,
    device: torch.device | str | None = None, precision: str = "fp32", num_workers: int = 0,
    pin_memory: bool = False, distributed: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, K)`` (float32, CPU) and labels ``(N,)`` (int64, CPU) of a ``Dataset`` of
    ``(x, y)`` pairs, row ``i`` for sample ``i``: one pass over the data (options as
    :func:`predict_logits`). Data, streaming and ``torch.distributed``: as
    :func:`predict_logits`.

    Raises:
        DataError: ``data`` is a tensor (pass ``TensorDataset(x, y)``), not a sized Dataset, or
            empty; an item that is not an ``(x, y)`` pair with an integer label.
        ConfigurationError: as :func:`predict_logits`.
    """
    if isinstance(data, torch.Tensor):
        raise DataError("sample_logits needs a Dataset of (x, y) pairs, got a tensor; pass "
                        "torch.utils.data.TensorDataset(x, y)")
    logits, labels = _per_sample(model, data, batch_size=batch_size, device=device,
                                 precision=precision, num_workers=num_workers,
                                 pin_memory=pin_memory, distributed=distributed)
    return logits, labels


def dataset_labels(data: Dataset, *, batch_size: int = 1000, num_workers: int = 0,
                   distributed: bool | None = None) -> torch.Tensor:
    """Labels ``(N,)`` (int64, CPU) of a ``Dataset`` of ``(x, y)`` pairs, in its order: sliced
    from memory for a ``TensorDataset`` (or a ``Subset`` of one), else read once through a
    ``DataLoader`` (one batch in memory; under a process group each rank reads its block and
    the labels are gathered, as :func:`predict_logits` does)."""
    return _per_sample(None, data, batch_size=batch_size, device=None, precision="fp32",
                       num_workers=num_workers, pin_memory=False, distributed=distributed)[1]


def predict_proba(
    model: nn.Module, x: torch.Tensor | Dataset, *, batch_size: int = 1000,
    device: torch.device | str | None = None, precision: str = "fp32", num_workers: int = 0,
    pin_memory: bool = False, distributed: bool | None = None,
) -> torch.Tensor:
    """Softmax outputs ``(N, K)`` (float32, CPU) of ``model`` in eval mode on inputs ``(N, ...)``
    or a ``Dataset`` of ``(x, y)`` pairs: ``softmax(predict_logits(...))``, the softmax in
    float32 whatever ``precision``. Options, streaming, distribution and errors as
    :func:`predict_logits`. The model's modes are restored afterwards."""
    return torch.softmax(predict_logits(model, x, batch_size=batch_size, device=device,
                                        precision=precision, num_workers=num_workers,
                                        pin_memory=pin_memory, distributed=distributed), dim=1)


def accuracy(probs: torch.Tensor | nn.Module, y: torch.Tensor | Dataset, **options: Any) -> float:
    """Top-1 accuracy in % of predictions ``probs`` ``(N, K)`` against labels ``y`` ``(N,)``.

    Or ``accuracy(model, data, **options)``: the accuracy in % of ``model`` on a ``Dataset`` of
    ``(x, y)`` pairs, from the softmax of :func:`sample_logits` (``options``: its
    ``batch_size``, ``device``, ``precision``, ``num_workers``, ``pin_memory``,
    ``distributed``; a streamed data set is read one batch at a time, and under a process group
    each rank computes its block and every rank gets the whole set's accuracy).

    Raises:
        DataError: empty input or mismatched lengths.
        ConfigurationError: ``options`` with predictions rather than a model.
    """
    if isinstance(probs, nn.Module):
        logits, y = sample_logits(probs, y, **options)
        probs = torch.softmax(logits, 1)
    elif options:
        raise ConfigurationError(f"accuracy(probs, y) takes no options, got {sorted(options)}; "
                                 "they apply to accuracy(model, dataset, ...)")
    if probs.shape[0] == 0 or probs.shape[0] != y.shape[0]:
        raise DataError(
            f"accuracy needs as many predictions as labels (> 0); got {probs.shape[0]} and "
            f"{y.shape[0]}"
        )
    return float((probs.argmax(1) == y).double().mean() * 100.0)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of each row of ``probs`` ``(N, K)``; ``0 * log 0 = 0``, never NaN."""
    return torch.special.entr(probs.double()).sum(1)


def membership_attack(
    member: np.ndarray | torch.Tensor,
    non_member: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
) -> float:
    """Share (%) of ``target`` samples a balanced logistic regression calls "member".

    The attack standardises the features (``StandardScaler``: zero mean, unit variance on the
    fitting sets) and fits a logistic regression with ``class_weight="balanced"`` on ``member``
    (label 1) against ``non_member`` (label 0) feature values, shape ``(N,)`` or ``(N, d)``; it is
    then applied to ``target`` only (never scored on what it was fitted on).

    Standardising makes the result independent of the feature's scale: without it the L2
    penalty of the regression swamps features of size 1e-4 (entropies of a model that outputs
    nearly uniform probabilities), and perfectly separable members were called non-members.
    A target on the decision boundary (predicted probability exactly 0.5, as when members and
    non-members are identical) counts as half a member, so an attack that learnt nothing scores
    50 %, not 0 % or 100 %.

    Raises:
        DataError: an empty set, or features with NaN or infinity.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def as2d(a) -> np.ndarray:
        a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
        return a.reshape(len(a), -1) if len(a) else a.reshape(0, 1)

    m, n, t = as2d(member), as2d(non_member), as2d(target)
    for label, a in (("member", m), ("non-member", n), ("target", t)):
        if a.shape[0] == 0:
            raise DataError(f"the MIA's {label} set is empty; expected at least one sample")
        if not np.isfinite(a).all():
            raise DataError(f"the MIA's {label} features hold NaN or infinity")
    fit_x = np.concatenate([m, n])
    scaler = StandardScaler().fit(fit_x)
    clf = LogisticRegression(class_weight="balanced")
    clf.fit(scaler.transform(fit_x), np.concatenate([np.ones(len(m)), np.zeros(len(n))]))
    p_member = clf.predict_proba(scaler.transform(t))[:, 1]  # classes_ are [0, 1]
    called = np.where(np.isclose(p_member, 0.5, rtol=0.0, atol=1e-12), 0.5,
                      (p_member > 0.5).astype(np.float64))
    return float(called.mean() * 100.0)


def entropy_mia(
    probs_retain: torch.Tensor, probs_test: torch.Tensor, probs_forget: torch.Tensor
) -> float:
    """The paper's MIA (%): entropy feature, fitted on D_r vs test, share of D_f called member.

    Args:
        probs_retain: softmax outputs on D_r ``(N_r, K)``.
        probs_test: on the test set ``(N_t, K)``.
        probs_forget: on D_f ``(N_f, K)``.
    """
    return membership_attack(entropy(probs_retain), entropy(probs_test), entropy(probs_forget))
