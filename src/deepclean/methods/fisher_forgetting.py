"""Fisher Forgetting (Golatkar, Achille, Soatto, "Eternal Sunshine of the Spotless Net: Selective
Forgetting in Deep Networks", CVPR 2020, section 4 "Fisher forgetting").

The trained weights w are scrubbed by Gaussian noise whose covariance is shaped by the *true*
Fisher information of the retain set D_r::

    F(w) = E_{x ~ D_r} E_{k ~ p(.|x, w)} [ grad log p(k | x, w) grad log p(k | x, w)^T ]

Only the diagonal is used. Note the expectation over the *model's* predicted class distribution
(summed over every class k, weighted by p(k | x)): this is the true Fisher, not the empirical Fisher
at the true label that DeepClean uses (GUIDE section 5 lists "Fisher with predicted labels" as a
trap for DeepClean; here the opposite holds: the paper's Fisher is the model's own).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from deepclean.data.datasets import as_tensors, check_loader_options, in_memory
from deepclean.errors import ConfigurationError, DataError, DivergenceError
from deepclean.fisher.diagonal import eval_mode, fisher_diagonal
from deepclean.methods._common import Joined, first_input, labels_of, ordered_batches
from deepclean.methods.base import Unlearner, check_positive, register_method
from deepclean.methods.space import Choice, LogUniform, Param, SpaceContext

__all__ = ["FisherForgetting", "true_fisher_diagonal", "true_fisher_diagonal_reference"]

FORMS = ("authors", "paper", "code")
CLASS_ROW = ("auto", "never")


class _ClassWeightedLogits(nn.Module):
    """Wraps a classifier so that the gradient of ``log_softmax(out)[:, k]`` with respect to the
    parameters equals ``sqrt(p_k(x)) * grad log p_k(x)`` per sample (``p`` detached).

    The output equals the wrapped model's logits *exactly* in value
    (``z.detach() + s * (z - z.detach())`` with ``z - z.detach() == 0``); only the backward pass is
    scaled, per sample, by ``s = sqrt(softmax(z)[:, k])``. Squared and averaged by
    :func:`fisher_diagonal`, this gives ``mean_n p_k(x_n) * (grad log p_k(x_n))^2``.
    """

    def __init__(self, model: nn.Module, k: int) -> None:
        super().__init__()
        self.model = model
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        if z.ndim != 2:
            raise DataError(f"expected logits of shape (B, K), got {tuple(z.shape)}")
        zd = z.detach()
        s = torch.softmax(zd, dim=1)[:, self.k : self.k + 1].sqrt()
        return zd + s * (z - zd)


def _num_classes(model: nn.Module, x: torch.Tensor, device: torch.device) -> int:
    with eval_mode(model), torch.no_grad():
        first = next(model.parameters())
        xb = x[:1].to(device)
        if xb.is_floating_point():
            xb = xb.to(first.dtype)
        out = model(xb)
    if out.ndim != 2:
        raise DataError(f"expected logits of shape (B, K), got {tuple(out.shape)}")
    return int(out.shape[1])


def true_fisher_diagonal(
    model: nn.Module,
    data: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    num_workers: int = 0,
) -> dict[str, torch.Tensor]:
    """Diagonal of the true Fisher information of ``model`` on the inputs of ``data``::

        F_i = (1 / N) * sum_n sum_k p_k(x_n) * (d/dw_i log p_k(x_n))^2

    with ``p = softmax(model(x))`` the model's own predictive distribution (the labels of ``data``
    are ignored). Exact: for each class k one pass of :func:`deepclean.fisher_diagonal` (per-sample
    gradients, squared, then averaged) on a wrapper whose backward pass scales each sample's
    gradient by ``sqrt(p_k(x_n))``. Cost: K (number of classes) Fisher passes.

    BatchNorm and dropout run in eval mode; the model's parameters, buffers and modes are unchanged
    afterwards.

    Args:
        model: a classifier returning logits ``(B, K)``.
        data: a ``Dataset`` of ``(x, y)`` pairs (``y`` unused but must be integer labels).
        batch_size: samples per forward pass; does not change the result (up to rounding).
        device: where to compute; default the model's device.
        dtype: compute dtype (e.g. ``torch.float64`` for tests); default the model's.
        num_workers: ``DataLoader`` workers for a data set that is not in memory.

    Data in memory (a ``TensorDataset`` or a ``Subset`` of one) is sliced; any other data set is
    read in its own order through a ``DataLoader``, once per class, one batch in memory at a
    time (:func:`deepclean.fisher_diagonal` on the data set with every label set to k), with
    the same result.

    Returns:
        ``{name: tensor}`` over ``named_parameters()`` with ``requires_grad``, on the CPU.

    Raises:
        DataError: the data set is empty or the model's output is not ``(B, K)``.
    """
    memory = in_memory(data)
    x = as_tensors(data)[0] if memory else None
    first = next(model.parameters(), None)
    if first is None:
        raise ConfigurationError("the model has no parameters; nothing to compute")
    dev = torch.device(device) if device is not None else first.device
    k_classes = _num_classes(model, x if memory else first_input(data), first.device)
    total: dict[str, torch.Tensor] = {}
    prefix = "model."
    for k in range(k_classes):
        if memory:
            labelled: Dataset = TensorDataset(x, torch.full((x.shape[0],), k, dtype=torch.long))
        else:
            labelled = Joined([(data, k)])
        part = fisher_diagonal(
            _ClassWeightedLogits(model, k), labelled,
            batch_size=batch_size, device=dev, dtype=dtype, num_workers=num_workers,
        )
        for name, value in part.items():
            key = name[len(prefix):]
            total[key] = value if key not in total else total[key] + value
    return total


def true_fisher_diagonal_reference(
    model: nn.Module, data: Dataset, *, dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """Slow, literal reference of :func:`true_fisher_diagonal`: one backward pass per sample and
    class, in ``dtype`` (default float64), on an eval-mode copy. For tests."""
    import copy

    x, _ = as_tensors(data)
    ref = copy.deepcopy(model).to(dtype=dtype).eval()
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    totals = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(x.shape[0]):
        xi = x[i : i + 1].to(dtype) if x.is_floating_point() else x[i : i + 1]
        log_p = torch.log_softmax(ref(xi), dim=1)[0]
        probs = log_p.detach().exp()
        for k in range(log_p.shape[0]):
            grads = torch.autograd.grad(log_p[k], list(params.values()), retain_graph=True,
                                        allow_unused=True)
            for (n, _), g in zip(params.items(), grads, strict=True):
                if g is not None:
                    totals[n] += probs[k] * g**2
    return {n: (t / x.shape[0]).detach() for n, t in totals.items()}


@register_method
class FisherForgetting(Unlearner):
    """Fisher Forgetting (Golatkar et al., CVPR 2020): add Gaussian noise shaped by the inverse of
    the true Fisher of D_r to every trainable weight.

    The paper's optimal scrubbing (its Proposition and section 4) for a quadratic loss adds noise of
    covariance proportional to ``B^{-1/2}``, B the Hessian of the D_r loss, approximated by the true
    Fisher F of D_r (diagonal, :func:`true_fisher_diagonal`); the Newton term ``-B^{-1} grad`` is
    dropped, as in the paper's deep-network experiments and every public implementation.

    ``form="authors"`` (default) is what the authors' public code runs (their ``Forgetting``
    notebook, ``get_mean_var``, copied into later benchmarks such as the SSD repository's
    ``forget_*_strategies.py``), with their ``alpha = 1e-6``. Per parameter tensor:

    1. ``var = alpha * min(1 / (F + 1e-8), 1e3)``; for the output layer the bound is ``1e2``;
    2. for a tensor with more than one dimension, ``var`` is replaced by its mean over dimension 1
       (one variance per output unit, e.g. per row of a Linear weight or per output channel);
    3. ``var`` is multiplied by 10 for the output layer's tensors and for every other 1-D tensor
       (BatchNorm weights and biases);
    4. class forgetting (``class_row``, see below): the forgotten class's output row is set to 0
       and gets variance 1e-4 (before step 3's x10, as in their code);
    5. ``w <- w + sqrt(var) * n`` with ``n ~ N(0, 1)`` from the method's seed.

    ``form="paper"`` follows the paper's text instead: covariance ``alpha * min((F + eps)^(-1/2),
    clamp)`` per weight, no averaging or factors. Its noise is much smaller at the same alpha
    (about ``F^(1/4)`` times the authors' standard deviation): pair it with its own alpha.

    Deviation from the authors' code: they find the output layer as every tensor whose first
    dimension equals the number of classes K, which also catches any other layer with K output
    channels; here it is the parameters of the last ``nn.Linear`` with K outputs (falling back to
    their rule when there is none). BatchNorm running statistics are left as they are.

    Hyperparameters:
        alpha: noise scale. Default 1e-6 (authors' code).
        form: ``"authors"`` (default), ``"paper"`` or ``"code"`` (the authors' variance
            ``alpha / F`` per weight, without steps 2-4).
        clamp: upper bound of ``1/F`` (authors, code) or ``F^-1/2`` (paper). Default 1e3.
        eps: added to F before inverting. Default 1e-8.
        class_row: ``"auto"`` (default): when D_f holds exactly the samples of one class (D_r has
            none of it), apply step 4 for that class, as the authors do for class forgetting;
            ``"never"``: do not. Only the ``authors`` form uses it.
        fisher_batch_size: batch size of the Fisher passes (does not change the result).
            Default 256.
        retain_fisher: optional precomputed true Fisher diagonal of this model on exactly this
            D_r (:func:`true_fisher_diagonal`, ``{name: tensor}`` shaped like the trainable
            parameters); then no Fisher pass runs. A collaborator, not a hyperparameter:
            ``deepclean tune`` computes it once per search (:meth:`tuning_collaborators`), since
            neither alpha nor the form changes it. Keys or shapes that do not match the model
            raise ``ConfigurationError`` before any change. Default None.
        seed: seeds the noise.
        num_workers: ``DataLoader`` workers for a D_f or D_r that is not in memory (an
            execution option, not a hyperparameter: never recorded). Default 0.

    Data: D_f and D_r may be any map-style ``Dataset`` of ``(x, y)`` pairs. Data in memory is
    sliced as tensors; any other data set is read in its own order through a ``DataLoader``,
    one batch in memory at a time, with the same result whatever ``num_workers``: the true
    Fisher reads D_r once per class; with ``class_row="auto"`` D_f's labels are read once (one
    pass keeping only the labels) and, when D_f is all of one class c, D_r's labels until the
    first sample of class c (a whole pass when there is none, as in class forgetting).

    Timed region: the true Fisher on D_r (K per-sample-gradient passes over D_r for K classes) and
    the noise. ``info_`` holds ``noise_std_mean`` (mean noise standard deviation over all
    weights) and ``forgotten_class_row`` (the class whose output row was reset, or -1).
    """

    name = "fisher_forgetting"
    collaborators = ("retain_fisher",)
    summary = "Scrub weights with Gaussian noise shaped by the inverse true Fisher of D_r"
    reference = (
        "Golatkar, Achille, Soatto, Eternal Sunshine of the Spotless Net: Selective Forgetting in "
        "Deep Networks, CVPR 2020"
    )
    streams = True

    def __init__(
        self,
        *,
        alpha: float = 1e-6,
        form: str = "authors",
        clamp: float = 1e3,
        eps: float = 1e-8,
        class_row: str = "auto",
        fisher_batch_size: int = 256,
        retain_fisher: dict[str, torch.Tensor] | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__(seed=seed, device=device, progress=progress)
        check_loader_options(num_workers=num_workers, pin_memory=False,
                             persistent_workers=False)
        self.num_workers = num_workers
        check_positive(alpha=alpha, clamp=clamp, eps=eps, fisher_batch_size=fisher_batch_size)
        if retain_fisher is not None and not (
                isinstance(retain_fisher, dict)
                and all(isinstance(v, torch.Tensor) for v in retain_fisher.values())):
            raise ConfigurationError(
                f"retain_fisher must be a dict of tensors (true_fisher_diagonal(model, retain)) "
                f"or None, got {type(retain_fisher).__name__}")
        if form not in FORMS:
            raise ConfigurationError(
                f"form must be one of {FORMS}, got {form!r}; 'authors' runs the authors' code, "
                "'paper' uses covariance alpha*F^-1/2, 'code' alpha/F per weight"
            )
        if class_row not in CLASS_ROW:
            raise ConfigurationError(f"class_row must be one of {CLASS_ROW}, got {class_row!r}")
        if not isinstance(fisher_batch_size, int):
            raise ConfigurationError(f"fisher_batch_size must be an int, got {fisher_batch_size!r}")
        self.alpha = alpha
        self.form = form
        self.clamp = clamp
        self.eps = eps
        self.class_row = class_row
        self.fisher_batch_size = fisher_batch_size
        self.retain_fisher = retain_fisher

    def noise_std(self, fisher: torch.Tensor) -> torch.Tensor:
        """Per-weight noise standard deviation from a Fisher diagonal (forms ``paper`` and
        ``code``; the ``authors`` form is :meth:`authors_variance`)."""
        power = 0.5 if self.form == "paper" else 1.0
        scale = (fisher + self.eps).pow(-power).clamp(max=self.clamp)
        return (self.alpha * scale).sqrt()

    def authors_variance(self, fisher: torch.Tensor, *, output_layer: bool,
                         forgotten: int | None = None) -> torch.Tensor:
        """Steps 1-4 of the ``authors`` form for one parameter tensor (same shape as
        ``fisher``), in the authors' order: the forgotten class's row gets variance 1e-4 before
        the output layer's x10 (so 1e-3 in the end)."""
        var = (1.0 / (fisher + self.eps)).clamp(max=min(self.clamp, 1e2) if output_layer
                                                else self.clamp)
        var = self.alpha * var
        if var.ndim > 1:
            var = var.mean(dim=1, keepdim=True).expand_as(var).clone()
        if output_layer and forgotten is not None:
            var[forgotten] = 1e-4
        if output_layer or var.ndim == 1:
            var = var * 10.0
        return var

    def _unlearn(self, model, xf, yf, xr, yr, device):
        return self._unlearn_data(model, TensorDataset(xf, yf), TensorDataset(xr, yr), device)

    def _unlearn_data(self, model, forget, retain, device):
        if self.retain_fisher is not None:
            fisher = self.retain_fisher
            params = {n: p for n, p in model.named_parameters() if p.requires_grad}
            bad = sorted(set(params) ^ set(fisher)) or [
                n for n in params if tuple(fisher[n].shape) != tuple(params[n].shape)]
            if bad:
                raise ConfigurationError(
                    f"retain_fisher does not fit the model: keys or shapes differ at {bad[:3]}; "
                    "pass true_fisher_diagonal(model, retain) of this model")
        else:
            fisher = true_fisher_diagonal(
                model, retain, batch_size=self.fisher_batch_size, device=device,
                num_workers=self.num_workers,
            )
        k = _num_classes(model, first_input(forget), device)
        output = _output_layer_names(model, k)
        forgotten = None
        if self.class_row == "auto":
            if in_memory(forget) and in_memory(retain):
                forgotten = _whole_class(as_tensors(forget)[1], as_tensors(retain)[1])
            else:
                forgotten = self._whole_class_data(forget, retain, k)
        gen = self.generator()
        total, count = 0.0, 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name not in fisher:
                    continue
                f = fisher[name].to(torch.float64)
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                if self.form == "authors":
                    last = name in output
                    var = self.authors_variance(f, output_layer=last, forgotten=forgotten)
                    mean = p.detach().to(torch.float64).cpu().clone()
                    if last and forgotten is not None:
                        mean[forgotten] = 0.0
                    std = var.sqrt()
                    p.copy_((mean + std * noise).to(device=p.device, dtype=p.dtype))
                else:
                    std = self.noise_std(f)
                    p.add_((std * noise).to(device=p.device, dtype=p.dtype))
                total += float(std.sum())
                count += std.numel()
        self.info_.update(noise_std_mean=total / max(count, 1),
                          forgotten_class_row=-1 if forgotten is None else int(forgotten))
        if not math.isfinite(self.info_["noise_std_mean"]):
            raise DivergenceError(
                "fisher_forgetting after unlearning: the noise is not finite (alpha / F "
                "overflows); lower alpha or clamp"
            )
        return model

    def _whole_class_data(self, forget: Dataset, retain: Dataset, k: int) -> int | None:
        """:func:`_whole_class` on data sets: D_f's labels read whole, D_r's batch by batch
        until the first sample of D_f's class (only when D_f holds one class)."""
        classes = torch.unique(labels_of(forget, label="forget set D_f",
                                         num_workers=self.num_workers))
        if classes.numel() != 1:
            return None
        c = int(classes[0])
        for _, yb in ordered_batches(retain, batch_size=256, label="retain set D_r", classes=k,
                                     num_workers=self.num_workers):
            if bool((yb == c).any()):
                return None
        return c

    @classmethod
    def tuning_collaborators(cls, model: nn.Module, forget: Dataset, retain: Dataset, *,
                             device: torch.device | str | None = None) -> dict[str, Any]:
        """The true Fisher of D_r, once per search: no searched hyperparameter changes it."""
        return {"retain_fisher": true_fisher_diagonal(model, retain, device=device)}

    @classmethod
    def search_space(cls, context: SpaceContext) -> dict[str, Param]:
        """alpha log-uniform over [1e-9, 1e-4] (the authors' 1e-6 in the middle) and the form."""
        return {"alpha": LogUniform(1e-9, 1e-4), "form": Choice(("authors", "paper"))}


def _output_layer_names(model: nn.Module, k: int) -> set[str]:
    """Names of the output layer's parameters: those of the last ``nn.Linear`` with ``k``
    outputs; without one, the authors' rule (every tensor whose first dimension is ``k``)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == k:
            last = name
    if last is not None:
        prefix = f"{last}." if last else ""
        return {f"{prefix}{n}" for n, _ in model.get_submodule(last).named_parameters()}
    return {n for n, p in model.named_parameters() if p.ndim >= 1 and p.shape[0] == k}


def _whole_class(y_forget: torch.Tensor, y_retain: torch.Tensor) -> int | None:
    """The class c when D_f is all of class c and D_r holds none of it, else None."""
    classes = torch.unique(y_forget)
    if classes.numel() != 1:
        return None
    c = int(classes[0])
    return None if bool((y_retain == c).any()) else c
