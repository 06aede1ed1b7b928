"""The membership-inference family: four attacks, each with its direction and its gold target.

No single MIA is trusted any more; the field reports several (GUIDE.md section 4). Each function
here says which value is ideal. For all of them the *target is the gold model's value* (a model
retrained without D_f), not 0 or 100: a score far below gold's ("over-unlearning", which itself
reveals that D_f was removed) is as bad as one far above it. And each attack is scored only on
samples it was not fitted on:

(a) :func:`entropy_lr_mia`: the paper's attack (:func:`deepclean.evaluation.metrics.entropy_mia`): balanced
    logistic regression on the softmax entropy, fitted on D_r (member) vs test (non-member); the
    share (%) of D_f called *member*. Ideal: gold's value. Scored on D_f only.
(b) :func:`mia_efficacy`: "MIA-efficacy" (Jia et al., NeurIPS 2023; SalUn, ICLR 2024): an RBF SVC
    on the true-label confidence p_y, fitted on equal-sized random samples of D_r and test; the
    share (%) of D_f called *non-member*. Ideal: gold's value (higher = more forgotten). Scored on
    D_f only.
(c) :func:`loss_lr_mia`: logistic regression on the cross-entropy loss, D_f (label 1) against
    test (label 0), balanced by subsampling the larger set, stratified k-fold cross-validation;
    attack accuracy (%) on the held-out folds only. Ideal: gold's value, about 50 when D_f is
    distributed like the test set (random forgetting).
(d) :func:`lira_mia`: a per-example, offline LiRA / U-LiRA attack: K gold models (different seeds,
    none trained on D_f or test) give, per sample, a Gaussian of the logit-scaled confidence
    phi = log(p_y / (1 - p_y)); the unlearned model's phi is scored by its one-sided z-score
    (equivalently the one-sided Gaussian likelihood ratio). Reports the ROC AUC and the TPR at 1 %
    FPR of D_f (positives) against test samples (negatives), and the forget samples the model
    still "remembers" most (largest z). Ideal: AUC 0.5 and TPR@1%FPR 1 % (a model that behaves
    like a fresh gold model on D_f). Needs K >= 2 gold models; with fewer it returns ``None``.

Randomness (subsampling, fold shuffling) comes only from an explicit ``seed``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from deepclean.errors import DataError
from deepclean.evaluation.metrics import entropy_mia, predict_logits

__all__ = [
    "DIRECTIONS",
    "predict_logits",
    "logit_confidence",
    "true_label_confidence",
    "cross_entropy_loss",
    "entropy_lr_mia",
    "mia_efficacy",
    "loss_lr_mia",
    "LiraResult",
    "lira_mia",
    "mia_family",
]

#: Direction of every reported quantity (what value is ideal), as printed in the tables.
DIRECTIONS: dict[str, str] = {
    "entropy_lr": "% of D_f called member; ideal = gold's value",
    "efficacy": "% of D_f called non-member; ideal = gold's value",
    "loss_lr_accuracy": ("attack accuracy % D_f vs test; ideal = gold's value (about 50 under "
                         "random forgetting, higher under class forgetting)"),
    "lira_auc": "AUC D_f vs test; ideal 0.5",
    "lira_tpr_at_1fpr": "TPR % at 1 % FPR; ideal 1",
}


def _np(a: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _col(a: np.ndarray | torch.Tensor, label: str) -> np.ndarray:
    a = _np(a)
    a = a.reshape(len(a), -1) if a.ndim != 2 else a
    if a.shape[0] == 0:
        raise DataError(f"the MIA's {label} set is empty; expected at least one sample")
    if not np.isfinite(a).all():
        raise DataError(f"the MIA's {label} features hold NaN or infinity")
    return a



def logit_confidence(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """phi = log(p_y / (1 - p_y)) per sample, computed stably from logits (float64).

    phi = z_y - logsumexp_{k != y} z_k, which is finite even where the softmax rounds p_y to
    exactly 1 or 0.

    Raises:
        DataError: fewer than two classes, or mismatched lengths.
    """
    z = logits.detach().to(torch.float64).cpu()
    y = y.detach().cpu().long()
    if z.ndim != 2 or z.shape[1] < 2 or z.shape[0] != y.shape[0]:
        raise DataError(
            f"logit_confidence needs logits (N, K >= 2) and N labels; got {tuple(z.shape)} and "
            f"{tuple(y.shape)}"
        )
    zy = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], float("-inf"))
    return zy - torch.logsumexp(others, dim=1)


def true_label_confidence(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """p_y, the probability the model gives the true label, per sample (float64)."""
    return probs.detach().double().cpu().gather(1, y.detach().cpu().long()[:, None]).squeeze(1)


def cross_entropy_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy ``-log p_y`` from logits (float64, finite)."""
    z = logits.detach().to(torch.float64).cpu()
    return torch.nn.functional.cross_entropy(z, y.detach().cpu().long(), reduction="none")


def entropy_lr_mia(
    probs_retain: torch.Tensor, probs_test: torch.Tensor, probs_forget: torch.Tensor
) -> float:
    """(a) The paper's entropy attack: % of D_f called member. Ideal: the gold model's value.

    Same function as :func:`deepclean.evaluation.metrics.entropy_mia` (fitted on D_r vs test with balanced
    class weights, scored on D_f only).
    """
    return entropy_mia(probs_retain, probs_test, probs_forget)


def mia_efficacy(
    conf_retain: np.ndarray | torch.Tensor,
    conf_test: np.ndarray | torch.Tensor,
    conf_forget: np.ndarray | torch.Tensor,
    *,
    seed: int = 0,
    max_per_class: int | None = None,
) -> float:
    """(b) MIA-efficacy (Jia et al. 2023; SalUn): % of D_f an RBF SVC calls *non-member*.

    The SVC is the authors' (``sklearn.svm.SVC(C=3, gamma="auto", kernel="rbf")``, as in
    ``evaluation/SVC_MIA.py`` of OPTML-Group/Unlearn-Sparse), fitted on the true-label
    confidence of ``n`` random D_r samples (member, 1) and ``n`` random test samples (non-member,
    0), ``n = min(|D_r|, |test|)`` (and at most ``max_per_class``), drawn without replacement by
    ``numpy.random.default_rng(seed)``. It is then applied to D_f only.

    Direction: higher means D_f looks less like training data; the ideal is the gold model's
    value (100 would be over-unlearning if gold's is lower).

    Raises:
        DataError: an empty set or non-finite features.
    """
    from sklearn.svm import SVC

    r, t, f = _col(conf_retain, "retain"), _col(conf_test, "test"), _col(conf_forget, "forget")
    n = min(len(r), len(t))
    if max_per_class is not None:
        n = min(n, int(max_per_class))
    rng = np.random.default_rng(seed)
    r_fit = r[rng.choice(len(r), size=n, replace=False)]
    t_fit = t[rng.choice(len(t), size=n, replace=False)]
    clf = SVC(C=3, gamma="auto", kernel="rbf")
    clf.fit(np.concatenate([r_fit, t_fit]), np.concatenate([np.ones(n), np.zeros(n)]))
    return float((clf.predict(f) == 0).mean() * 100.0)


def loss_lr_mia(
    loss_forget: np.ndarray | torch.Tensor,
    loss_test: np.ndarray | torch.Tensor,
    *,
    seed: int = 0,
    n_splits: int = 5,
) -> float:
    """(c) Loss-based logistic regression, D_f vs test, stratified k-fold; attack accuracy (%).

    The larger of the two sets is subsampled (``numpy.random.default_rng(seed)``, without
    replacement) to the size of the smaller, so that chance level is exactly 50 %. A
    ``StratifiedKFold(n_splits, shuffle=True, random_state=seed)`` split fits a logistic
    regression on the training folds and predicts only the held-out fold; the accuracy is counted
    over every held-out prediction (each sample is predicted exactly once, by a model that did not
    see it). ``n_splits`` is reduced to the per-class count when a set is smaller.

    Direction: about 50 means the loss does not tell D_f from test; the ideal is the gold model's
    value (about 50 for random forgetting; higher for class forgetting, where gold fails on D_f).

    Raises:
        DataError: fewer than two samples in a set, or non-finite losses.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    f, t = _col(loss_forget, "forget"), _col(loss_test, "test")
    n = min(len(f), len(t))
    if n < 2:
        raise DataError(f"loss_lr_mia needs at least 2 samples per set; got {len(f)} and {len(t)}")
    rng = np.random.default_rng(seed)
    f = f[rng.choice(len(f), size=n, replace=False)]
    t = t[rng.choice(len(t), size=n, replace=False)]
    x = np.concatenate([f, t])
    y = np.concatenate([np.ones(n), np.zeros(n)])
    folds = StratifiedKFold(n_splits=min(n_splits, n), shuffle=True, random_state=seed)
    correct = 0
    for train_idx, test_idx in folds.split(x, y):
        clf = LogisticRegression()
        clf.fit(x[train_idx], y[train_idx])
        correct += int((clf.predict(x[test_idx]) == y[test_idx]).sum())
    return 100.0 * correct / len(y)


@dataclass
class LiraResult:
    """Outcome of :func:`lira_mia`.

    Attributes:
        auc: ROC AUC of the z-score, D_f positive, test negative (ideal 0.5).
        tpr_at_1fpr: TPR in % at 1 % FPR (ideal 1; with fewer than 100 negatives it is the TPR
            at zero false positives).
        n_reference: number of reference (gold) models.
        n_forget, n_test: samples scored.
        top_remembered: the ``top_k`` forget samples with the largest z-score, as dicts with
            ``index`` (the caller's index), ``z`` and ``phi``.
    """

    auc: float
    tpr_at_1fpr: float
    n_reference: int
    n_forget: int
    n_test: int
    top_remembered: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lira_zscores(phi_target: np.ndarray | torch.Tensor,
                 phi_reference: np.ndarray | torch.Tensor,
                 *, min_std: float = 1e-3) -> np.ndarray:
    """One-sided offline-LiRA scores: ``(phi_target - mean) / std`` per sample.

    ``phi_reference`` is ``(K, N)``: phi of each of K reference models that were not trained on
    the samples; mean and std (``ddof=1``) are per sample, the std floored at ``min_std``. A large
    z means the target is more confident on the sample than models that never saw it ("member").
    The one-sided Gaussian likelihood-ratio test, ``1 - Phi(z)``, ranks samples the same way.
    """
    ref = _np(phi_reference)
    target = _np(phi_target)
    if ref.ndim != 2 or ref.shape[0] < 2 or ref.shape[1] != target.shape[0]:
        raise DataError(
            f"lira needs reference phi of shape (K >= 2, N) and target phi (N,); got "
            f"{ref.shape} and {target.shape}"
        )
    mean = ref.mean(0)
    std = np.maximum(ref.std(0, ddof=1), min_std)
    return (target - mean) / std


def lira_mia(
    phi_forget: np.ndarray | torch.Tensor,
    phi_test: np.ndarray | torch.Tensor,
    ref_forget: np.ndarray | torch.Tensor,
    ref_test: np.ndarray | torch.Tensor,
    *,
    forget_index: np.ndarray | torch.Tensor | None = None,
    top_k: int = 10,
) -> LiraResult:
    """(d) Per-example offline LiRA / U-LiRA: AUC and TPR at 1 % FPR, D_f vs test.

    Args:
        phi_forget, phi_test: the evaluated model's phi (:func:`logit_confidence`) on D_f and on
            held-out test samples.
        ref_forget, ref_test: phi of K >= 2 reference gold models (``(K, N_f)``, ``(K, N_t)``);
            none of them may have been trained on D_f or on the test samples.
        forget_index: the ids reported in ``top_remembered`` (default ``0 .. N_f - 1``).
        top_k: how many "still remembered" forget samples to list.

    Direction: AUC 0.5 and TPR@1%FPR 1 % are ideal (D_f scores like unseen data).

    Raises:
        DataError: wrong shapes or fewer than two reference models.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    z_f = lira_zscores(phi_forget, ref_forget)
    z_t = lira_zscores(phi_test, ref_test)
    scores = np.concatenate([z_f, z_t])
    labels = np.concatenate([np.ones(len(z_f)), np.zeros(len(z_t))])
    auc = float(roc_auc_score(labels, scores))
    fpr, tpr, _ = roc_curve(labels, scores)
    tpr_at = float(tpr[fpr <= 0.01].max() * 100.0)
    ids = np.arange(len(z_f)) if forget_index is None else _np(forget_index).astype(np.int64)
    phi_f = _np(phi_forget)
    order = np.argsort(-z_f, kind="stable")[:top_k]
    top = [{"index": int(ids[i]), "z": float(z_f[i]), "phi": float(phi_f[i])} for i in order]
    return LiraResult(auc=auc, tpr_at_1fpr=tpr_at, n_reference=int(_np(ref_forget).shape[0]),
                      n_forget=len(z_f), n_test=len(z_t), top_remembered=top)


def mia_family(
    logits_retain: torch.Tensor,
    y_retain: torch.Tensor,
    logits_forget: torch.Tensor,
    y_forget: torch.Tensor,
    logits_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    reference_forget: list[torch.Tensor] | None = None,
    reference_test: list[torch.Tensor] | None = None,
    forget_index: torch.Tensor | None = None,
    seed: int = 0,
    top_k: int = 10,
    efficacy_max_per_class: int | None = 5000,
) -> dict[str, Any]:
    """Every attack of this module on one model, from its logits on D_r, D_f and test.

    MIA-efficacy's RBF SVC is fitted on at most ``efficacy_max_per_class`` samples of D_r and of
    test each (an SVC's fit grows quadratically; 5,000 per class keeps it to seconds on a CPU).

    ``reference_forget`` / ``reference_test`` are the logits of the reference gold models (for
    LiRA); with fewer than two, ``lira`` is ``None`` and ``lira_reason`` says why.

    Returns:
        ``{"entropy_lr", "efficacy", "loss_lr_accuracy", "loss_lr_reason", "lira",
        "lira_reason"}``; ``lira`` is :meth:`LiraResult.to_dict` or ``None``;
        ``loss_lr_accuracy`` is ``None`` (``loss_lr_reason`` says why) when D_f or test holds
        fewer than 2 samples (a one-sample deletion request), else ``loss_lr_reason`` is None.
    """
    p_r, p_f, p_t = (torch.softmax(z, 1) for z in (logits_retain, logits_forget, logits_test))
    out: dict[str, Any] = {
        "entropy_lr": entropy_lr_mia(p_r, p_t, p_f),
        "efficacy": mia_efficacy(true_label_confidence(p_r, y_retain),
                                 true_label_confidence(p_t, y_test),
                                 true_label_confidence(p_f, y_forget), seed=seed,
                                 max_per_class=efficacy_max_per_class),
        # a deletion request of one sample cannot be cross-validated: not measurable, said so
        "loss_lr_accuracy": loss_lr_mia(cross_entropy_loss(logits_forget, y_forget),
                                        cross_entropy_loss(logits_test, y_test), seed=seed)
        if len(y_forget) >= 2 and len(y_test) >= 2 else None,
    }
    out["loss_lr_reason"] = None if out["loss_lr_accuracy"] is not None else (
        f"the loss-LR attack needs at least 2 samples in D_f and in the test set; got "
        f"{len(y_forget)} and {len(y_test)}"
    )
    k = len(reference_forget or [])
    if k < 2:
        out["lira"] = None
        out["lira_reason"] = (
            f"LiRA needs at least 2 reference gold models (different seeds); {k} available "
            "(use --gold-models K with K >= 2, or K >= 3 for the gold model's own value)"
        )
        return out
    ref_f = torch.stack([logit_confidence(z, y_forget) for z in reference_forget])
    ref_t = torch.stack([logit_confidence(z, y_test) for z in reference_test])
    out["lira"] = lira_mia(logit_confidence(logits_forget, y_forget),
                           logit_confidence(logits_test, y_test), ref_f, ref_t,
                           forget_index=forget_index, top_k=top_k).to_dict()
    out["lira_reason"] = None
    return out
