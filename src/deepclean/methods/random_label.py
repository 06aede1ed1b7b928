"""RandomLabel (Graves et al., AAAI 2021): train on D_f relabelled with random wrong labels,
together with D_r."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from deepclean.data.datasets import as_tensors, in_memory
from deepclean.errors import DataError
from deepclean.masking import BN_STATS, masked_finetune
from deepclean.methods._common import (
    Joined,
    LoaderOptions,
    check_choice,
    check_labels,
    first_input,
    labels_of,
    num_classes_of,
)
from deepclean.methods.base import (
    Unlearner,
    check_non_negative_int,
    check_positive,
    register_method,
)
from deepclean.methods.space import IntRange, LogUniform, Param, SpaceContext

__all__ = ["RandomLabel", "random_wrong_labels", "wrong_label_distribution"]


def wrong_label_distribution(
    labels: torch.Tensor, num_classes: int, *, balanced: bool = True
) -> torch.Tensor:
    """The ``(num_classes, num_classes)`` matrix ``q[i, j]``: the probability that a sample of
    true class ``i`` gets the new label ``j``; the diagonal is exactly 0 (a label never stays).

    ``balanced=False``: ``q[i, j] = 1 / (C - 1)`` for every ``j != i`` (uniform over the wrong
    classes, per sample). ``balanced=True`` (default): among all conditionals with a zero diagonal,
    the one whose label marginal over ``labels`` is as uniform as possible, and among those the
    maximum-entropy one. The marginal is uniform over all C classes (Sinkhorn scaling of the
    off-diagonal ones matrix, float64) unless one class holds more than ``(C - 1) / C`` of the
    samples; then that class cannot get its share, every other sample is relabelled to it and its
    own samples are spread uniformly over the other classes (a D_f of one class: uniform).
    For a D_f spread evenly over all classes, or a D_f of a single class, both choices coincide;
    they differ when D_f covers some classes only, where the per-sample uniform rule would push
    most of D_f towards the classes it does not contain.
    """
    if num_classes < 2:
        raise DataError(
            f"random wrong labels need at least 2 classes, got num_classes={num_classes}"
        )
    off = 1.0 - torch.eye(num_classes, dtype=torch.float64)
    if not balanced:
        return off / (num_classes - 1)
    counts = torch.bincount(labels.reshape(-1).cpu(), minlength=num_classes).to(torch.float64)
    if float(counts.sum()) == 0:
        return off / (num_classes - 1)
    prior = counts / counts.sum()
    top = int(prior.argmax())
    if float(prior[top]) > (num_classes - 1) / num_classes:
        # Class ``top`` cannot receive its share 1/C: the most uniform marginal gives it all the
        # other samples (1 - prior[top]) and spreads class ``top`` evenly over the other classes.
        q = off / (num_classes - 1)
        others = torch.arange(num_classes) != top
        q[others] = 0.0
        q[others, top] = 1.0
        return q
    target = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    u = torch.ones(num_classes, dtype=torch.float64)
    v = torch.ones(num_classes, dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    for _ in range(5_000):  # Sinkhorn scaling: rows sum to the prior, columns to 1/C
        u = prior / (off @ v).clamp_min(tiny)
        v = target / (off.T @ u).clamp_min(tiny)
        flow = u[:, None] * off * v[None, :]
        if float((flow.sum(1) - prior).abs().max()) < 1e-12:
            break
    flow = u[:, None] * off * v[None, :]
    rows = flow.sum(1, keepdim=True)
    q = torch.where(rows > 0, flow / rows.clamp_min(tiny), off / (num_classes - 1))
    return q


def random_wrong_labels(
    labels: torch.Tensor,
    num_classes: int,
    generator: torch.Generator,
    *,
    balanced: bool = True,
) -> torch.Tensor:
    """New labels for ``labels``, each drawn at random from the *other* classes.

    Every sample gets a label different from its own (never its true label); the draws come only
    from ``generator`` (CPU), independently per sample, from :func:`wrong_label_distribution`. With
    ``balanced=True`` (default) the new labels are as evenly spread over all ``num_classes`` classes
    as that rule allows, e.g. a D_f of classes {1, 2} out of 3 gets about a third each of 0, 1
    and 2.

    Args:
        labels: int64 true labels ``(N,)`` in ``[0, num_classes)``.
        num_classes: number of classes C (at least 2).
        generator: the source of randomness.
        balanced: see :func:`wrong_label_distribution`.

    Returns:
        int64 labels ``(N,)`` on the device of ``labels``.

    Raises:
        DataError: fewer than 2 classes, or a label outside ``[0, num_classes)``.
    """
    if labels.ndim != 1:
        raise DataError(f"expected labels of shape (N,), got {tuple(labels.shape)}")
    check_labels(labels, num_classes, "label tensor")
    if labels.numel() == 0:
        return labels.clone().long()
    cpu = labels.cpu().long()
    q = wrong_label_distribution(cpu, num_classes, balanced=balanced)
    new = torch.multinomial(q[cpu], 1, replacement=True, generator=generator).squeeze(1)
    return new.to(labels.device)


def relabelled_union(
    model: torch.nn.Module,
    xf: torch.Tensor,
    yf: torch.Tensor,
    xr: torch.Tensor,
    yr: torch.Tensor,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, new_forget_labels)``: D_f with random wrong labels followed by D_r as it is."""
    num_classes = num_classes_of(model, xf, device)
    check_labels(yf, num_classes, "forget set D_f")
    check_labels(yr, num_classes, "retain set D_r")
    new = random_wrong_labels(yf, num_classes, generator)
    x = torch.cat([xf, xr.to(xf.device)])
    y = torch.cat([new.to(yf.device), yr.to(yf.device)])
    return x, y, new


def relabelled_union_data(
    model: torch.nn.Module,
    forget: Dataset,
    retain: Dataset,
    generator: torch.Generator,
    device: torch.device,
    *,
    forget_labels: torch.Tensor | None = None,
    num_workers: int = 0,
) -> tuple[Dataset, torch.Tensor]:
    """:func:`relabelled_union` for data sets not in memory: ``(union, new_forget_labels)``, the
    union a ``Dataset`` of D_f with its new labels followed by D_r, never read whole (the same
    samples and labels, in the same order, as the tensors of :func:`relabelled_union`).

    The new labels need D_f's labels (their mix sets the wrong-label distribution): given as
    ``forget_labels``, or read in one streamed pass that keeps only the labels. D_r's labels
    are checked batch by batch as the fine-tune reads them.
    """
    num_classes = num_classes_of(model, first_input(forget), device)
    yf = forget_labels if forget_labels is not None else labels_of(
        forget, label="forget set D_f", num_workers=num_workers)
    check_labels(yf, num_classes, "forget set D_f")
    new = random_wrong_labels(yf, num_classes, generator)
    return Joined([(forget, new), (retain, None)]), new


@register_method
class RandomLabel(LoaderOptions, Unlearner):
    """RandomLabel: fine-tune on D_f relabelled with random wrong labels together with D_r.

    Paper: Graves, Nagisetty, Ganesh, "Amnesiac Machine Learning", AAAI 2021 (the "unlearning"
    baseline that relabels the sensitive data with randomly selected incorrect labels and trains for
    a few iterations on it and the remaining data).

    Steps: (1) draw once, from the method's seed, a wrong label for every D_f sample
    (:func:`random_wrong_labels`, never the true label; the number of classes is read from the
    model's output); (2) fine-tune every weight on the union of relabelled D_f and D_r, shuffled
    together: cross-entropy, Adam (no weight decay), cosine annealing from ``lr`` (DeepClean's
    optimiser, via :func:`deepclean.masking.masked_finetune` without a mask). The timed step is (1)
    and (2).

    BatchNorm: ``bn_stats="update"`` (default) trains in train mode and re-estimates the running
    statistics on the mixed batches; ``"freeze"`` keeps BatchNorm in eval mode, buffers unchanged.

    Hyperparameters:
        epochs: passes over D_f + D_r. Default 2.
        lr: initial Adam learning rate. Default 1e-3.
        batch_size: samples per step. Default 128.
        bn_stats: ``"update"`` (default) or ``"freeze"``.
        seed: seeds the labels (stream 1) and the shuffling (stream 0).
        num_workers, pin_memory, persistent_workers: ``DataLoader`` options for a D_f or D_r that
            is not in memory (execution options, not hyperparameters: never recorded). Default
            0, False, False.

    Data: D_f and D_r may be any map-style ``Dataset`` of ``(x, y)`` pairs. When both are in
    memory they are sliced as tensors; otherwise D_f's labels are read once (one pass that keeps
    only the labels, to draw the new ones) and the union of relabelled D_f and D_r is read
    through a ``DataLoader`` afresh every epoch, one batch in memory at a time, in the order the
    in-memory path draws from the same seed (:func:`relabelled_union_data`): the same samples
    give the same model, and ``num_workers`` does not change it.

    After :meth:`unlearn`, ``info_["n_relabelled"]`` is the size of D_f.
    """

    name = "random_label"
    summary = "Fine-tune on D_f with random wrong labels together with D_r"
    reference = "Graves et al., Amnesiac Machine Learning, AAAI 2021"
    streams = True

    def __init__(
        self,
        *,
        epochs: int = 2,
        lr: float = 1e-3,
        batch_size: int = 128,
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
        check_positive(lr=lr, batch_size=batch_size)
        check_non_negative_int(epochs=epochs, batch_size=batch_size)
        check_choice("bn_stats", bn_stats, BN_STATS)
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.bn_stats = bn_stats

    def _unlearn(self, model, xf, yf, xr, yr, device):
        return self._unlearn_data(model, TensorDataset(xf, yf), TensorDataset(xr, yr), device)

    def _unlearn_data(self, model, forget, retain, device):
        if in_memory(forget) and in_memory(retain):
            (xf, yf), (xr, yr) = as_tensors(forget), as_tensors(retain)
            x, y, new = relabelled_union(model, xf, yf, xr, yr, self.generator(1), device)
            data: torch.Tensor | Dataset = x
        else:
            data, new = relabelled_union_data(model, forget, retain, self.generator(1), device,
                                              num_workers=self.num_workers)
            y = None
        self.info_.update(n_relabelled=int(new.numel()))
        return masked_finetune(
            model, None, data, y, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
            generator=self.generator(0), device=device, bn_stats=self.bn_stats,
            desc=self.name, progress=self.progress, **self._loader_options(),
        )

    @classmethod
    def search_space(cls, context: SpaceContext) -> dict[str, Param]:
        """Learning rate in [1e-5, 1e-2] (log), epochs up to ``context.max_passes``."""
        return {"lr": LogUniform(1e-5, 1e-2), "epochs": IntRange(1, context.max_passes)}
