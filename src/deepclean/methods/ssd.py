"""Selective Synaptic Dampening (Foster, Schoepf, Brintrup, "Fast Machine Unlearning without
Retraining through Selective Synaptic Dampening", AAAI 2024)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from deepclean.data.datasets import as_tensors, check_loader_options, in_memory
from deepclean.errors import ConfigurationError
from deepclean.fisher.diagonal import eval_mode, fisher_diagonal
from deepclean.methods._common import Joined, first_input, num_classes_of, ordered_batches
from deepclean.methods.base import (
    Unlearner,
    check_positive,
    check_positive_int,
    register_method,
)
from deepclean.methods.space import LogUniform, Param, SpaceContext

__all__ = ["SSD", "batch_mean_importance", "dampening_factors"]

REFERENCE_SETS = ("full", "retain")
IMPORTANCES = ("batch_mean", "per_sample")


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


def batch_mean_importance(
    model: nn.Module, x: torch.Tensor | Dataset, y: torch.Tensor | None = None, *,
    batch_size: int, device: torch.device, num_workers: int = 0,
) -> dict[str, torch.Tensor]:
    """The SSD authors' importance: over consecutive mini-batches of ``batch_size`` (the last one
    may be smaller), the square of the gradient of the *batch-mean* cross-entropy, averaged over
    the number of batches (their ``ParameterPerturber.calc_importance``). BatchNorm and dropout run
    in eval mode. Unlike the per-sample Fisher it depends on the batch size.

    ``x`` and ``y`` are tensors, or ``x`` is a ``Dataset`` of ``(x, y)`` pairs (``y=None``): one
    in memory is sliced, any other read in its own order through a ``DataLoader`` with
    ``num_workers`` workers, one batch in memory at a time (the same batches, the same result).

    Returns:
        ``{parameter name: tensor of the parameter's shape}`` (float32 on ``device``).
    """
    if isinstance(x, torch.Tensor):
        batches = ((x[start:start + batch_size], y[start:start + batch_size])
                   for start in range(0, x.shape[0], batch_size))
    else:
        classes = None if in_memory(x) else num_classes_of(model, first_input(x), device)
        batches = ordered_batches(x, batch_size=batch_size, label="data set", classes=classes,
                                  num_workers=num_workers)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    totals = {n: torch.zeros_like(p) for n, p in params.items()}
    n_batches = 0
    with eval_mode(model), torch.enable_grad():
        for xb, yb in batches:
            xb, yb = xb.to(device), yb.to(device)
            loss = nn.functional.cross_entropy(model(xb), yb)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), grads, strict=True):
                if g is not None:
                    totals[n] += g.detach().square()
            n_batches += 1
    return {n: t / max(n_batches, 1) for n, t in totals.items()}


@register_method
class SSD(Unlearner):
    """Selective Synaptic Dampening (Foster et al., AAAI 2024): shrink the weights that are much
    more important to D_f than to the training data, without any training.

    ``imp_f`` is the importance of each weight on D_f; ``imp_d`` on the whole training set
    D = D_r U D_f (``reference_set="full"``, the paper's choice) or on D_r only
    (``reference_set="retain"``). Every trainable weight with ``imp_f > alpha * imp_d`` is
    multiplied by ``min(lambda * imp_d / imp_f, 1)``; all other weights and every buffer (BatchNorm
    statistics) stay bitwise unchanged.

    Importance (``importance``):

    - ``"batch_mean"`` (default, the authors' code): squared gradients of mini-batch *mean*
      losses over batches of ``importance_batch_size`` (128, their forget-set loader), averaged
      over batches (:func:`batch_mean_importance`). This is what their alpha = 10 was chosen for.
    - ``"per_sample"``: the empirical Fisher diagonal the paper's text describes, the mean over
      samples of per-sample squared gradients (:func:`deepclean.fisher_diagonal`); with
      ``reference_set="full"``, ``imp_d = (|D_r| I_r + |D_f| I_f) / |D|`` exactly. Then
      ``imp_d >= (|D_f| / |D|) imp_f``, so ``imp_f > alpha * imp_d`` is *impossible* once
      ``alpha >= |D| / |D_f|`` (10 when D_f is 10 % of D): SSD would select nothing. That
      configuration is refused before any work. The authors used alpha = 10 with D_f of at
      most 1 % of D.

    Hyperparameters:
        alpha: selection threshold. Default 10 (paper, CIFAR).
        lam: dampening constant lambda. Default 1 (paper).
        reference_set: ``"full"`` (default) or ``"retain"``.
        importance: ``"batch_mean"`` (default) or ``"per_sample"``.
        importance_batch_size: batch size of the batch-mean importance (changes it). Default 128.
        fisher_batch_size: batch size of the per-sample Fisher passes (does not change the
            result). Default 256.
        seed: unused (SSD is deterministic); kept for the common interface.
        num_workers: ``DataLoader`` workers for a D_f or D_r that is not in memory (an
            execution option, not a hyperparameter: never recorded). Default 0.

    Data: D_f and D_r may be any map-style ``Dataset`` of ``(x, y)`` pairs. Data in memory is
    sliced as tensors; any other data set is read in its own order through a ``DataLoader``,
    one batch in memory at a time (the reference set ``"full"`` as D_r followed by D_f, the
    authors' order, batches spanning the seam as in memory): the same samples give the same
    result, whatever ``num_workers``. Each importance pass reads its set once.

    Raises (from :meth:`unlearn`, before any work):
        ConfigurationError: ``importance="per_sample"``, ``reference_set="full"`` and
            ``alpha >= |D| / |D_f|``; the message gives the bound and the fixes.

    Timed region: the importance passes and the dampening. ``info_`` holds ``n_dampened`` and
    ``share_dampened``.
    """

    name = "ssd"
    summary = "Dampen weights far more important (Fisher) to D_f than to the training data"
    reference = (
        "Foster, Schoepf, Brintrup, Fast Machine Unlearning without Retraining through Selective "
        "Synaptic Dampening, AAAI 2024"
    )
    streams = True

    def __init__(
        self,
        *,
        alpha: float = 10.0,
        lam: float = 1.0,
        reference_set: str = "full",
        importance: str = "batch_mean",
        importance_batch_size: int = 128,
        fisher_batch_size: int = 256,
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__(seed=seed, device=device, progress=progress)
        check_loader_options(num_workers=num_workers, pin_memory=False,
                             persistent_workers=False)
        self.num_workers = num_workers
        check_positive(alpha=alpha, lam=lam, fisher_batch_size=fisher_batch_size)
        check_positive_int(importance_batch_size=importance_batch_size)
        if reference_set not in REFERENCE_SETS:
            raise ConfigurationError(
                f"reference_set must be one of {REFERENCE_SETS}, got {reference_set!r}"
            )
        if importance not in IMPORTANCES:
            raise ConfigurationError(
                f"importance must be one of {IMPORTANCES}, got {importance!r}; 'batch_mean' is "
                "the authors' code, 'per_sample' the empirical Fisher"
            )
        self.alpha = alpha
        self.lam = lam
        self.reference_set = reference_set
        self.importance = importance
        self.importance_batch_size = importance_batch_size
        self.fisher_batch_size = fisher_batch_size

    def check_bound(self, n_forget: int, n_retain: int) -> None:
        """Refuse a configuration that can select no weight (see the class docstring).

        Raises:
            ConfigurationError: per-sample importance on the full set with
                ``alpha >= (n_forget + n_retain) / n_forget``.
        """
        bound = (n_forget + n_retain) / n_forget
        if self.importance == "per_sample" and self.reference_set == "full" and \
                self.alpha >= bound:
            raise ConfigurationError(
                f"SSD with per-sample importance selects nothing when alpha >= |D| / |D_f| = "
                f"{bound:.3g} (I_D >= |D_f|/|D| I_f), and alpha is {self.alpha}; pass alpha < "
                f"{bound:.3g}, importance='batch_mean' (the authors' code) or "
                "reference_set='retain'"
            )

    def _importances(self, model, forget, retain, device):
        if self.importance == "batch_mean":
            kwargs = {"batch_size": self.importance_batch_size, "device": device,
                      "num_workers": self.num_workers}
            if in_memory(forget) and in_memory(retain):
                (xf, yf), (xr, yr) = as_tensors(forget), as_tensors(retain)
                imp_f = batch_mean_importance(model, xf, yf, **kwargs)
                if self.reference_set == "full":  # the authors' loader: D_r then D_f
                    x_d, y_d = torch.cat([xr, xf]), torch.cat([yr, yf])
                else:
                    x_d, y_d = xr, yr
                return imp_f, batch_mean_importance(model, x_d, y_d, **kwargs)
            imp_f = batch_mean_importance(model, forget, **kwargs)
            data = Joined([(retain, None), (forget, None)]) if self.reference_set == "full" \
                else retain
            return imp_f, batch_mean_importance(model, data, **kwargs)
        kwargs = {"batch_size": self.fisher_batch_size, "device": device,
                  "num_workers": self.num_workers}
        imp_f = fisher_diagonal(model, forget, **kwargs)
        imp_r = fisher_diagonal(model, retain, **kwargs)
        if self.reference_set == "retain":
            return imp_f, imp_r
        n_f, n_r = len(forget), len(retain)
        return imp_f, {k: (n_r * imp_r[k] + n_f * imp_f[k]) / (n_r + n_f) for k in imp_f}

    def _unlearn(self, model, xf, yf, xr, yr, device):
        return self._unlearn_data(model, TensorDataset(xf, yf), TensorDataset(xr, yr), device)

    def _unlearn_data(self, model, forget, retain, device):
        self.check_bound(len(forget), len(retain))
        imp_f, imp_d = self._importances(model, forget, retain, device)
        dampened, total = 0, 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name not in imp_f:
                    continue
                beta = dampening_factors(imp_f[name], imp_d[name], alpha=self.alpha, lam=self.lam)
                changed = beta != 1
                dampened += int(changed.sum())
                total += beta.numel()
                if bool(changed.any()):
                    beta = beta.to(device=p.device, dtype=p.dtype)
                    p.copy_(torch.where(changed.to(p.device), p * beta, p))
        self.info_.update(n_dampened=dampened, n_weights=total,
                          share_dampened=dampened / max(total, 1))
        return model

    @classmethod
    def search_space(cls, context: SpaceContext) -> dict[str, Param]:
        """alpha log-uniform over [1, 100], lambda log-uniform over [0.1, 10] (batch-mean
        importance, where alpha has no hard bound)."""
        return {"alpha": LogUniform(1.0, 100.0), "lam": LogUniform(0.1, 10.0)}
