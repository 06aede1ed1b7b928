"""Evaluation metrics of the paper: accuracies and the entropy membership-inference attack.

Paper (Shi et al., arXiv 2311.10448, section 4): Acc_Dr, dAcc_Df = Acc_Df(unlearned) - Acc_Df(gold),
dMIA = MIA(unlearned) - MIA(gold). The MIA is a logistic regression with balanced class weights on
one feature, the entropy of the softmax output, fitted on D_r (members, label 1) against the test
set (non-members, label 0); MIA is the share of D_f predicted "member", in %. The target is the gold
model's value, not 0.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from deepclean.data.datasets import iterate_batches
from deepclean.errors import DataError
from deepclean.fisher.diagonal import eval_mode
from deepclean.precision import autocast

__all__ = ["predict_logits", "predict_proba", "accuracy", "entropy", "entropy_mia", "membership_attack"]


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, *, batch_size: int = 1000,
    device: torch.device | str | None = None, precision: str = "fp32",
) -> torch.Tensor:
    """Logits ``(N, K)`` (float32, CPU) of ``model`` in eval mode on inputs ``(N, ...)``.

    With ``precision="bf16"`` the forward passes run under bfloat16 autocast
    (:func:`deepclean.precision.autocast`) and the logits are converted to float32; so are those
    computed inside an autocast context of the caller. The model's modes are restored afterwards.

    Raises:
        ConfigurationError: ``precision`` is not ``"fp32"`` or ``"bf16"``.
    """
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    out = []
    with eval_mode(model), autocast(device, precision):
        for _, xb, _ in iterate_batches(x, torch.zeros(x.shape[0]), batch_size=batch_size,
                                        device=device):
            out.append(model(xb).float().cpu())
    return torch.cat(out)


def predict_proba(
    model: nn.Module, x: torch.Tensor, *, batch_size: int = 1000,
    device: torch.device | str | None = None, precision: str = "fp32",
) -> torch.Tensor:
    """Softmax outputs ``(N, K)`` (float32, CPU) of ``model`` in eval mode on inputs ``(N, ...)``:
    ``softmax(predict_logits(...))``, the softmax in float32 whatever ``precision``. The model's
    modes are restored afterwards."""
    return torch.softmax(predict_logits(model, x, batch_size=batch_size, device=device,
                                        precision=precision), dim=1)


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in % of predictions ``probs`` ``(N, K)`` against labels ``y`` ``(N,)``.

    Raises:
        DataError: empty input or mismatched lengths.
    """
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
