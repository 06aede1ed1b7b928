"""Selective Synaptic Dampening (Foster, Schoepf, Brintrup, "Fast Machine Unlearning without
Retraining through Selective Synaptic Dampening", AAAI 2024)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from deepclean.errors import ConfigurationError
from deepclean.fisher import fisher_diagonal
from deepclean.methods.base import Unlearner, check_positive, register_method

__all__ = ["SSD", "dampening_factors"]

REFERENCE_SETS = ("full", "retain")


def dampening_factors(
    importance_forget: torch.Tensor,
    importance_data: torch.Tensor,
    *,
    alpha: float,
    lam: float,
) -> torch.Tensor:
    """SSD's multiplicative factor per weight (paper eq. 3-4)::

        beta = min(lam * imp_d / imp_f, 1)  where imp_f > alpha * imp_d, else 1

    The comparison is made without division, so ``imp_f = 0`` is never selected (no 0/0), and
    ``imp_f > 0 = imp_d`` is selected with factor 0 (the weight serves only D_f and is zeroed).
    """
    selected = importance_forget > alpha * importance_data
    safe = torch.where(selected, importance_forget, torch.ones_like(importance_forget))
    beta = (lam * importance_data / safe).clamp(max=1.0)
    return torch.where(selected, beta, torch.ones_like(beta))


@register_method
class SSD(Unlearner):
    """Selective Synaptic Dampening (Foster et al., AAAI 2024): shrink the weights that are much
    more important to D_f than to the training data, without any training.

    Importances are diagonals of the empirical Fisher, computed with
    :func:`deepclean.fisher_diagonal`:
    the *mean over samples of the per-sample squared gradient* of the log-likelihood at the true
    label (BatchNorm in eval mode). The authors' code instead squares mini-batch *mean* gradients
    and averages over batches, which depends on the batch size; the per-sample form is the Fisher
    the paper's text describes. ``imp_f`` is the importance on D_f; ``imp_d`` is the importance on
    the whole training set D = D_r U D_f (``reference_set="full"``, the paper's choice, computed
    exactly as ``(|D_r| I_r + |D_f| I_f) / |D|`` from the two passes) or on D_r only
    (``reference_set="retain"``). Every trainable weight with ``imp_f > alpha * imp_d`` is
    multiplied by ``min(lambda * imp_d / imp_f, 1)``; all other weights and every buffer (BatchNorm
    statistics) stay bitwise unchanged.

    Hyperparameters:
        alpha: selection threshold. Default 10 (paper, CIFAR).
        lam: dampening constant lambda. Default 1 (paper).
        reference_set: ``"full"`` (default) or ``"retain"``.
        fisher_batch_size: batch size of the Fisher passes (does not change the result).
            Default 256.
        seed: unused (SSD is deterministic); kept for the common interface.

    Timed region: the two Fisher passes (D_f and D_r) and the dampening. ``info_`` holds
    ``n_dampened`` and ``share_dampened``.
    """

    name = "ssd"
    summary = "Dampen weights far more important (Fisher) to D_f than to the training data"
    reference = (
        "Foster, Schoepf, Brintrup, Fast Machine Unlearning without Retraining through Selective "
        "Synaptic Dampening, AAAI 2024"
    )

    def __init__(
        self,
        *,
        alpha: float = 10.0,
        lam: float = 1.0,
        reference_set: str = "full",
        fisher_batch_size: int = 256,
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__(seed=seed, device=device, progress=progress)
        check_positive(alpha=alpha, lam=lam, fisher_batch_size=fisher_batch_size)
        if reference_set not in REFERENCE_SETS:
            raise ConfigurationError(
                f"reference_set must be one of {REFERENCE_SETS}, got {reference_set!r}"
            )
        self.alpha = alpha
        self.lam = lam
        self.reference_set = reference_set
        self.fisher_batch_size = fisher_batch_size

    def _unlearn(self, model, xf, yf, xr, yr, device):
        imp_f = fisher_diagonal(model, TensorDataset(xf, yf), batch_size=self.fisher_batch_size,
                                device=device)
        imp_r = fisher_diagonal(model, TensorDataset(xr, yr), batch_size=self.fisher_batch_size,
                                device=device)
        n_f, n_r = xf.shape[0], xr.shape[0]
        dampened, total = 0, 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name not in imp_f:
                    continue
                if self.reference_set == "full":
                    imp_d = (n_r * imp_r[name] + n_f * imp_f[name]) / (n_r + n_f)
                else:
                    imp_d = imp_r[name]
                beta = dampening_factors(imp_f[name], imp_d, alpha=self.alpha, lam=self.lam)
                changed = beta != 1
                dampened += int(changed.sum())
                total += beta.numel()
                if bool(changed.any()):
                    beta = beta.to(device=p.device, dtype=p.dtype)
                    p.copy_(torch.where(changed.to(p.device), p * beta, p))
        self.info_.update(n_dampened=dampened, n_weights=total,
                          share_dampened=dampened / max(total, 1))
        return model
