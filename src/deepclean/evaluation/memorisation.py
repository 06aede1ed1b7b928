"""How much a trained model memorised its training data (the paper's second limitation: no
measure of how saturated the pretrained model is).

A model that treats its training samples like unseen ones has nothing to forget under random
forgetting: a retrained gold model behaves almost the same on D_f, and every method looks right.
:func:`memorisation` compares the model on (a sample of) its training data with held-out samples
it never saw: the accuracy gap, the per-example loss gap and the AUC of a loss-threshold attack
(training = positive), with a flag when the gap is too small for random forgetting to test
anything.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from deepclean.errors import DataError
from deepclean.evaluation.metrics import accuracy, predict_logits

__all__ = ["MIN_ACC_GAP", "MIN_ATTACK_AUC", "memorisation"]

#: Below both thresholds the model has hardly memorised: a train/held-out accuracy gap under 2
#: points and a loss attack AUC under 0.55.
MIN_ACC_GAP = 2.0
MIN_ATTACK_AUC = 0.55


def memorisation(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_holdout: torch.Tensor,
    y_holdout: torch.Tensor,
    *,
    max_samples: int = 5000,
    seed: int = 0,
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> dict[str, float | bool | int]:
    """Memorisation of ``model``: training samples ``(N, ...)`` against held-out ones.

    At most ``max_samples`` of each set are used (drawn with ``seed``). Returns ``acc_train`` and
    ``acc_holdout`` (%), ``acc_gap`` (points), ``loss_train`` and ``loss_holdout`` (mean
    cross-entropy, nats), ``loss_gap`` (nats), ``attack_auc`` (ROC AUC of minus the loss as a
    score of "training sample"; 0.5 means no memorisation), the sizes used, and
    ``too_small_for_random_forgetting``: both the accuracy gap under :data:`MIN_ACC_GAP` points and
    the AUC under :data:`MIN_ATTACK_AUC`.

    Raises:
        DataError: an empty set.
    """
    from sklearn.metrics import roc_auc_score

    if len(y_train) == 0 or len(y_holdout) == 0:
        raise DataError("memorisation needs training and held-out samples; got an empty set")
    g = torch.Generator().manual_seed(seed)

    def sample(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(y) <= max_samples:
            return x, y
        idx = torch.randperm(len(y), generator=g)[:max_samples]
        return x[idx], y[idx]

    xt, yt = sample(x_train, y_train)
    xh, yh = sample(x_holdout, y_holdout)
    lt = predict_logits(model, xt, device=device, precision=precision)
    lh = predict_logits(model, xh, device=device, precision=precision)
    loss_t = nn.functional.cross_entropy(lt, yt, reduction="none").double()
    loss_h = nn.functional.cross_entropy(lh, yh, reduction="none").double()
    acc_t, acc_h = accuracy(lt.softmax(1), yt), accuracy(lh.softmax(1), yh)
    scores = -torch.cat([loss_t, loss_h]).numpy()
    labels = np.concatenate([np.ones(len(loss_t)), np.zeros(len(loss_h))])
    auc = float(roc_auc_score(labels, scores))
    gap = acc_t - acc_h
    return {
        "acc_train": acc_t, "acc_holdout": acc_h, "acc_gap": gap,
        "loss_train": float(loss_t.mean()), "loss_holdout": float(loss_h.mean()),
        "loss_gap": float(loss_h.mean() - loss_t.mean()), "attack_auc": auc,
        "n_train": len(yt), "n_holdout": len(yh),
        "too_small_for_random_forgetting": bool(gap < MIN_ACC_GAP and auc < MIN_ATTACK_AUC),
    }
