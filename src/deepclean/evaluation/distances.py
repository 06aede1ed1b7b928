"""Distances between an unlearned model and the gold model (GUIDE.md section 4).

On D_f (and on the test set as a control), between the output probability vectors of the
evaluated model q and of the gold model p, per sample and then averaged over samples:

- :func:`js_divergence`: Jensen-Shannon divergence in bits, in [0, 1]:
  ``JS(p, q) = 0.5 KL(p || m) + 0.5 KL(q || m)``, ``m = (p + q) / 2``, with ``0 log 0 = 0``.
  (Not ``KL(m || p)``, a mistake seen in peers' code.) ``scipy.spatial.distance.jensenshannon``
  returns its square root.
- :func:`kl_divergence`: ``KL(gold || unlearned)`` in nats, summed over classes and averaged over
  samples ("batchmean", not the mean over every element).
- :func:`activation_distance`: mean over samples of the L2 norm of ``p - q``.

And over the weights, :func:`weight_distance`: the L2 norm of the difference of every trainable
parameter (buffers such as BatchNorm statistics excluded), to gold and to the original model.

Every distance is ideally 0 (the model behaves like gold). Where two or more gold models from
different seeds exist, each distance is also divided by the same distance between two gold seeds:
about 1 means "as close to gold as another retraining is".
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from deepclean.errors import DataError

__all__ = [
    "js_divergence",
    "kl_divergence",
    "activation_distance",
    "weight_distance",
    "output_distances",
    "distances_to_gold",
]


def _probs(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(p).detach().to(torch.float64).cpu()
    q = torch.as_tensor(q).detach().to(torch.float64).cpu()
    if p.ndim == 1:
        p, q = p[None], q[None]
    if p.shape != q.shape or p.ndim != 2 or p.shape[0] == 0:
        raise DataError(
            f"distances need two (N > 0, K) probability arrays of equal shape; got "
            f"{tuple(p.shape)} and {tuple(q.shape)}"
        )
    return p, q


def kl_divergence(p: torch.Tensor, q: torch.Tensor, *, reduction: str = "batchmean") -> Any:
    """KL(p || q) in nats per sample (rows of ``(N, K)``), averaged over samples by default.

    ``0 log 0 = 0``; a class with ``p > 0`` and ``q = 0`` gives ``+inf``.

    Args:
        reduction: ``"batchmean"`` (float, the mean over samples of the per-sample sum over
            classes) or ``"none"`` (tensor ``(N,)``).
    """
    p, q = _probs(p, q)
    rows = torch.where(p > 0, torch.special.xlogy(p, p) - torch.special.xlogy(p, q),
                       torch.zeros_like(p)).sum(1)
    return float(rows.mean()) if reduction == "batchmean" else rows


def js_divergence(p: torch.Tensor, q: torch.Tensor, *, reduction: str = "batchmean") -> Any:
    """Jensen-Shannon divergence in bits (base 2, in [0, 1]) per sample, averaged by default.

    ``0.5 KL(p || m) + 0.5 KL(q || m)`` with ``m = (p + q) / 2`` and ``0 log 0 = 0``; identical
    distributions give 0, disjoint supports give 1.
    """
    p, q = _probs(p, q)
    m = 0.5 * (p + q)
    rows = (0.5 * kl_divergence(p, m, reduction="none")
            + 0.5 * kl_divergence(q, m, reduction="none")) / math.log(2.0)
    rows = rows.clamp(0.0, 1.0)  # rounding only
    return float(rows.mean()) if reduction == "batchmean" else rows


def activation_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over samples of ``||p - q||_2`` between output probability vectors."""
    p, q = _probs(p, q)
    return float((p - q).norm(dim=1).mean())


def weight_distance(a: nn.Module, b: nn.Module) -> float:
    """L2 norm of the difference of all parameters (``named_parameters``; buffers excluded).

    Raises:
        DataError: the two models' parameter names or shapes differ.
    """
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    if pa.keys() != pb.keys() or any(pa[k].shape != pb[k].shape for k in pa):
        raise DataError("weight_distance needs two models of the same architecture")
    total = sum(float(((pa[k].detach().double().cpu() - pb[k].detach().double().cpu()) ** 2).sum())
                for k in pa)
    return math.sqrt(total)


def output_distances(p_gold: torch.Tensor, p_model: torch.Tensor) -> dict[str, float]:
    """``{"js", "kl", "activation"}`` between gold outputs ``p_gold`` and ``p_model``."""
    return {
        "js": js_divergence(p_gold, p_model),
        "kl": kl_divergence(p_gold, p_model),
        "activation": activation_distance(p_gold, p_model),
    }


def distances_to_gold(
    *,
    probs: dict[str, torch.Tensor],
    gold_probs: dict[str, torch.Tensor],
    model: nn.Module,
    gold: nn.Module,
    original: nn.Module | None = None,
    gold_reference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every distance of ``model`` to ``gold``, per evaluation set, plus weight distances.

    Args:
        probs, gold_probs: ``{set name: (N, K) probabilities}`` of the model and of gold, on the
            same samples (e.g. ``"forget"`` and ``"test"``).
        original: the model before unlearning, for ``weights_to_original``.
        gold_reference: the same dictionary computed for a second gold seed against the first
            (``distances_to_gold`` of gold seed 2); when given, ``normalised`` holds every
            distance divided by its gold-vs-gold counterpart.

    Returns:
        ``{"forget": {"js", "kl", "activation"}, "test": {...}, "weights_to_gold",
        "weights_to_original", "normalised": {...} or None}``.
    """
    out: dict[str, Any] = {name: output_distances(gold_probs[name], probs[name])
                           for name in probs}
    out["weights_to_gold"] = weight_distance(model, gold)
    out["weights_to_original"] = None if original is None else weight_distance(model, original)
    out["normalised"] = None
    if gold_reference is not None:
        norm: dict[str, Any] = {}
        for name in probs:
            norm[name] = {k: _ratio(v, gold_reference[name][k]) for k, v in out[name].items()}
        norm["weights_to_gold"] = _ratio(out["weights_to_gold"], gold_reference["weights_to_gold"])
        out["normalised"] = norm
    return out


def _ratio(a: float, b: float) -> float | None:
    return None if b == 0 or not math.isfinite(b) else a / b
