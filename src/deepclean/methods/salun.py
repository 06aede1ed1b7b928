"""SalUn (Fan et al., ICLR 2024): random-label unlearning restricted to the salient weights."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from deepclean.data.datasets import as_tensors, in_memory, iterate_batches
from deepclean.masking import BN_STATS, masked_finetune
from deepclean.methods._common import (
    LoaderOptions,
    check_choice,
    check_fraction,
    first_input,
    num_classes_of,
    ordered_batches,
)
from deepclean.methods.base import (
    Unlearner,
    check_non_negative_int,
    check_positive,
    register_method,
)
from deepclean.methods.random_label import relabelled_union, relabelled_union_data
from deepclean.methods.space import IntRange, LogUniform, Param, SpaceContext, Uniform
from deepclean.selection import mask_summary

__all__ = ["SalUn", "saliency_mask"]


def saliency_mask(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    ratio: float,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """SalUn's weight saliency map: the ``ratio`` share of weights with the largest ``|grad|`` of
    the forget loss.

    The gradient is that of the mean cross-entropy over all of ``(x, y)`` (true labels) at the
    current weights, accumulated batch by batch (the result does not depend on ``batch_size``),
    with the model in eval mode, so BatchNorm uses its running statistics and no buffer changes.
    Exactly ``round(ratio * n)`` of the ``n`` trainable weights are selected, globally over all
    parameter tensors; ties are broken by position in ``named_parameters()`` order.

    Returns:
        ``{name: bool tensor}`` over the model's trainable parameters (True = salient, trained).
    """
    check_fraction("ratio", ratio)
    batches = ((xb, yb) for _, xb, yb in iterate_batches(x, y, batch_size=batch_size))
    return _saliency(model, batches, x.shape[0], ratio, torch.device(device))


def _saliency(model: nn.Module, batches, n_total: int, ratio: float,
              device: torch.device) -> dict[str, torch.Tensor]:
    """:func:`saliency_mask` from ``(x, y)`` batches in order (of ``n_total`` samples in all)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    was_training = model.training
    model.eval()
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    try:
        for xb, yb in batches:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            loss = nn.functional.cross_entropy(model(xb), yb, reduction="sum") / n_total
            batch_grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (name, _), g in zip(params.items(), batch_grads):
                if g is not None:
                    grads[name] += g
    finally:
        model.train(was_training)
    flat = torch.cat([g.abs().reshape(-1) for g in grads.values()])
    k = int(round(ratio * flat.numel()))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        order = torch.sort(flat, descending=True, stable=True).indices
        chosen[order[:k]] = True
    mask, start = {}, 0
    for name, p in params.items():
        mask[name] = chosen[start : start + p.numel()].view_as(p)
        start += p.numel()
    return mask


@register_method
class SalUn(LoaderOptions, Unlearner):
    """SalUn: saliency-guided random-label unlearning; only the salient weights move.

    Paper: Fan, Liu, Zhang, Wei, Wong, Liu, "SalUn: Empowering Machine Unlearning via Gradient-based
    Weight Saliency in Both Image Classification and Generation", ICLR 2024.

    Steps: (1) saliency map (:func:`saliency_mask`): the top ``saliency_ratio`` share of weights by
    ``|d CE(D_f) / dw|`` at the original model (true labels, eval mode); (2) random wrong labels for
    D_f (:func:`deepclean.methods.random_label.random_wrong_labels`); (3) fine-tune the salient
    weights on relabelled D_f together with D_r: cross-entropy, Adam without weight decay, cosine
    annealing from ``lr`` (DeepClean's optimiser; the paper uses SGD), every other weight bitwise
    unchanged (:func:`deepclean.masking.masked_finetune`). The timed step is (1)-(3).

    BatchNorm: eval mode in step (1). In step (3), ``bn_stats="update"`` (default) re-estimates the
    running statistics on the mixed batches (the buffers are not weights, so the mask does not
    cover them); ``"freeze"`` keeps BatchNorm in eval mode and its buffers bitwise unchanged.
    BatchNorm's affine weights are weights like any other: salient or frozen.

    Hyperparameters:
        saliency_ratio: share of weights updated, in (0, 1]. Default 0.5 (the paper's).
        epochs: passes over D_f + D_r. Default 2.
        lr: initial Adam learning rate. Default 1e-3.
        batch_size: samples per step. Default 128.
        grad_batch_size: batch size of the saliency pass (does not change the result). Default 256.
        bn_stats: ``"update"`` (default) or ``"freeze"``.
        seed: seeds the labels (stream 1) and the shuffling (stream 0).
        num_workers, pin_memory, persistent_workers: ``DataLoader`` options for a D_f or D_r that
            is not in memory (execution options, not hyperparameters: never recorded). Default
            0, False, False.

    Data: D_f and D_r may be any map-style ``Dataset`` of ``(x, y)`` pairs. When both are in
    memory they are sliced as tensors; otherwise the saliency pass reads D_f once in its own
    order (keeping only its labels, for the new ones) and the fine-tune reads the union of
    relabelled D_f and D_r through a ``DataLoader`` afresh every epoch, one batch in memory at a
    time, in the order the in-memory path draws from the same seed: the same samples give the
    same model, and ``num_workers`` does not change it.

    After :meth:`unlearn`, ``mask_`` is the saliency map and ``info_`` holds ``n_salient``,
    ``n_weights`` and ``share_salient``.
    """

    name = "salun"
    summary = "Random-label fine-tune of only the weights most salient to the forget loss"
    reference = "Fan et al., SalUn, ICLR 2024"
    streams = True

    def __init__(
        self,
        *,
        saliency_ratio: float = 0.5,
        epochs: int = 2,
        lr: float = 1e-3,
        batch_size: int = 128,
        grad_batch_size: int = 256,
        bn_stats: str = "update",
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(seed=seed, device=device, progress=progress)
        self._set_loader_options(num_workers, pin_memory, persistent_workers)
        check_fraction("saliency_ratio", saliency_ratio)
        check_positive(lr=lr, batch_size=batch_size, grad_batch_size=grad_batch_size)
        check_non_negative_int(epochs=epochs, batch_size=batch_size,
                               grad_batch_size=grad_batch_size)
        check_choice("bn_stats", bn_stats, BN_STATS)
        self.saliency_ratio = saliency_ratio
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.grad_batch_size = grad_batch_size
        self.bn_stats = bn_stats
        self.mask_: dict[str, torch.Tensor] | None = None

    def _unlearn(self, model, xf, yf, xr, yr, device):
        return self._unlearn_data(model, TensorDataset(xf, yf), TensorDataset(xr, yr), device)

    def _unlearn_data(self, model, forget, retain, device):
        model.to(device)
        memory = in_memory(forget) and in_memory(retain)
        if memory:
            (xf, yf), (xr, yr) = as_tensors(forget), as_tensors(retain)
            mask = saliency_mask(model, xf, yf, ratio=self.saliency_ratio,
                                 batch_size=self.grad_batch_size, device=device)
        else:  # one pass over D_f: the saliency, and its labels kept for the new ones
            classes = num_classes_of(model, first_input(forget), device)
            labels: list[torch.Tensor] = []

            def recorded():
                for xb, yb in ordered_batches(forget, batch_size=self.grad_batch_size,
                                              label="forget set D_f", classes=classes,
                                              num_workers=self.num_workers):
                    labels.append(yb)
                    yield xb, yb

            mask = _saliency(model, recorded(), len(forget), self.saliency_ratio, device)
        self.mask_ = mask
        selected, total = mask_summary(mask)
        self.info_.update(n_salient=selected, n_weights=total, share_salient=selected / total)
        if memory:
            x, y, _ = relabelled_union(model, xf, yf, xr, yr, self.generator(1), device)
            data: torch.Tensor | Dataset = x
        else:
            data, _ = relabelled_union_data(model, forget, retain, self.generator(1), device,
                                            forget_labels=torch.cat(labels))
            y = None
        return masked_finetune(
            model, mask, data, y, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
            generator=self.generator(0), device=device, bn_stats=self.bn_stats,
            desc=self.name, progress=self.progress, **self._loader_options(),
        )

    @classmethod
    def search_space(cls, context: SpaceContext) -> dict[str, Param]:
        """Learning rate in [1e-5, 1e-2] (log), epochs up to ``context.max_passes``, saliency
        ratio (share of weights updated) in [0.1, 0.9]."""
        return {"lr": LogUniform(1e-5, 1e-2), "epochs": IntRange(1, context.max_passes),
                "saliency_ratio": Uniform(0.1, 0.9)}
