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
from torch.utils.data import Dataset, Subset

from deepclean.data.datasets import dataset_size
from deepclean.errors import ConfigurationError, DataError
from deepclean.evaluation.metrics import accuracy, predict_logits, sample_logits

__all__ = ["MIN_ACC_GAP", "MIN_ATTACK_AUC", "memorisation"]

#: Below both thresholds the model has hardly memorised: a train/held-out accuracy gap under 2
#: points and a loss attack AUC under 0.55.
MIN_ACC_GAP = 2.0
MIN_ATTACK_AUC = 0.55


def memorisation(
    model: nn.Module,
    x_train: torch.Tensor | Dataset,
    y_train: torch.Tensor | Dataset,
    x_holdout: torch.Tensor | None = None,
    y_holdout: torch.Tensor | None = None,
    *,
    max_samples: int = 5000,
    seed: int = 0,
    device: torch.device | str | None = None,
    precision: str = "fp32",
    batch_size: int = 1000,
    num_workers: int = 0,
    pin_memory: bool = False,
    distributed: bool | None = None,
) -> dict[str, float | bool | int]:
    """Memorisation of ``model``: training samples ``(N, ...)`` against held-out ones.

    Called as ``memorisation(model, x_train, y_train, x_holdout, y_holdout)`` with tensors, or
    as ``memorisation(model, train, holdout)`` with two ``Dataset`` s of ``(x, y)`` pairs (a
    data set not in memory is read through a ``DataLoader``, one batch of ``batch_size`` at a
    time, ``num_workers``, ``pin_memory``; under ``torch.distributed`` each rank computes its
    block and the outputs are gathered, see :func:`deepclean.evaluation.metrics.predict_logits`).

    At most ``max_samples`` of each set are used (drawn with ``seed``; the same samples for
    tensors and for a ``Dataset`` of the same samples). Returns ``acc_train`` and
    ``acc_holdout`` (%), ``acc_gap`` (points), ``loss_train`` and ``loss_holdout`` (mean
    cross-entropy, nats), ``loss_gap`` (nats), ``attack_auc`` (ROC AUC of minus the loss as a
    score of "training sample"; 0.5 means no memorisation), the sizes used, and
    ``too_small_for_random_forgetting``: both the accuracy gap under :data:`MIN_ACC_GAP` points and
    the AUC under :data:`MIN_ATTACK_AUC`.

    Raises:
        DataError: an empty set.
        ConfigurationError: Datasets mixed with tensors, or the two-Dataset form given more
            arguments.
    """
    from sklearn.metrics import roc_auc_score

    datasets = not isinstance(x_train, torch.Tensor)
    if datasets and (isinstance(y_train, torch.Tensor) or x_holdout is not None
                     or y_holdout is not None):
        raise ConfigurationError(
            "memorisation takes (model, x_train, y_train, x_holdout, y_holdout) as tensors or "
            "(model, train, holdout) as two Datasets of (x, y) pairs, not a mix")
    if not datasets and (not isinstance(y_train, torch.Tensor) or x_holdout is None
                         or y_holdout is None):
        raise ConfigurationError(
            "memorisation with tensors needs x_train, y_train, x_holdout and y_holdout")
    sizes = ((dataset_size(x_train, "the training set"), dataset_size(y_train, "the held-out set"))
             if datasets else (len(y_train), len(y_holdout)))
    if sizes[0] == 0 or sizes[1] == 0:
        raise DataError("memorisation needs training and held-out samples; got an empty set")
    g = torch.Generator().manual_seed(seed)
    options = dict(batch_size=batch_size, device=device, precision=precision,
                   num_workers=num_workers, pin_memory=pin_memory, distributed=distributed)

    def draw(n: int) -> torch.Tensor | None:
        return None if n <= max_samples else torch.randperm(n, generator=g)[:max_samples]

    def outputs(x, y, idx) -> tuple[torch.Tensor, torch.Tensor]:
        if datasets:
            return sample_logits(model, x if idx is None else Subset(x, idx.tolist()), **options)
        if idx is not None:
            x, y = x[idx], y[idx]
        return predict_logits(model, x, **options), y

    idx_t, idx_h = draw(sizes[0]), draw(sizes[1])  # in this order: the same draws as before
    lt, yt = outputs(x_train, None if datasets else y_train, idx_t)
    lh, yh = outputs(y_train if datasets else x_holdout, y_holdout, idx_h)
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
