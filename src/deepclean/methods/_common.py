"""Small helpers shared by the training-based unlearning methods (private)."""

from __future__ import annotations

import bisect
import copy
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from deepclean.data.datasets import (
    ShuffledBatches,
    as_tensors,
    check_loader_options,
    dataset_size,
    in_memory,
    iterate_batches,
    stream_batches,
)
from deepclean.errors import ConfigurationError, DataError
from deepclean.masking import BN_STATS
from deepclean.validation import check_inputs, check_labels_fit

OPTIMIZERS = ("sgd", "adam")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise :class:`ConfigurationError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigurationError(
            f"{name} must be one of {choices}, got {value!r}; pass one of those strings"
        )


def check_fraction(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise :class:`ConfigurationError` unless ``value`` is a number in (0, 1] (or [0, 1])."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    low_ok = ok and (value >= 0 if allow_zero else value > 0)
    if not (ok and low_ok and value <= 1):
        low = "[0" if allow_zero else "(0"
        raise ConfigurationError(
            f"{name} must be a number in {low}, 1], got {value!r}; pass a fraction such as 0.5"
        )


def set_train_mode(model: nn.Module, bn_stats: str) -> nn.Module:
    """Train mode; with ``bn_stats="freeze"`` every BatchNorm layer stays in eval mode (buffers
    bitwise unchanged, batches normalised with the running statistics)."""
    if bn_stats not in BN_STATS:
        raise ConfigurationError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
    model.train()
    if bn_stats == "freeze":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    return model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with ``requires_grad=False`` everywhere: a teacher."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def make_optimizer(
    params, name: str, lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``"sgd"`` (with ``momentum``) or ``"adam"``; ``weight_decay`` as given (default none)."""
    check_choice("optimizer", name, OPTIMIZERS)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def num_classes_of(model: nn.Module, x: torch.Tensor, device: torch.device) -> int:
    """The number of classes, read from the model's output on one sample (eval mode; the model's
    mode is restored afterwards, its buffers are untouched)."""
    was_training = model.training
    model.eval()
    try:
        out = model(x[:1].to(device))
    finally:
        model.train(was_training)
    if out.ndim != 2:
        raise DataError(
            f"expected the model to return logits of shape (batch, classes), got {tuple(out.shape)}"
        )
    return int(out.shape[1])


def check_labels(y: torch.Tensor, num_classes: int, label: str) -> None:
    """Raise :class:`DataError` unless every label lies in ``[0, num_classes)``."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(
            f"the {label} has labels in [{int(y.min())}, {int(y.max())}] but the model outputs "
            f"{num_classes} classes; expected labels in [0, {num_classes - 1}]"
        )


class LoaderOptions:
    """Mixin of the methods that stream D_f and D_r (``Unlearner.streams``): the ``DataLoader``
    options ``num_workers``, ``pin_memory`` and ``persistent_workers`` (execution options, never
    hyperparameters), checked at construction."""

    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False

    def _set_loader_options(self, num_workers: int, pin_memory: bool = False,
                            persistent_workers: bool = False) -> None:
        check_loader_options(num_workers=num_workers, pin_memory=pin_memory,
                             persistent_workers=persistent_workers)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers

    def _loader_options(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory,
                "persistent_workers": self.persistent_workers}


class EpochBatches:
    """Shuffled ``(x, y)`` batches of D_f or D_r on ``device``, one epoch per :meth:`epoch`.

    Data in memory (a ``TensorDataset``, what :func:`deepclean.methods.base.prepare_datasets`
    gives for data in memory) is sliced by :func:`iterate_batches` with ``generator``, exactly
    the batches the methods drew before they streamed. Any other data set is read through a
    ``DataLoader`` afresh every epoch (:class:`ShuffledBatches`: each epoch's permutation drawn
    from the same ``generator``, so the same samples give the same batches), one batch in
    memory at a time; each streamed batch is checked as it arrives (finite inputs, integer
    labels, and labels in ``[0, classes)`` when ``classes`` is given).
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, generator: torch.Generator,
                 device: torch.device, label: str, classes: int | None = None,
                 num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False) -> None:
        self.batch_size, self.generator, self.device = batch_size, generator, device
        self.label, self.classes = label, classes
        self.loader: ShuffledBatches | None = None
        if in_memory(dataset):
            self.x, self.y = as_tensors(dataset)
            self.n = int(self.x.shape[0])
        else:
            self.n = dataset_size(dataset, f"the {label}")
            self.loader = ShuffledBatches(
                dataset, batch_size=batch_size, generator=generator, num_workers=num_workers,
                pin_memory=pin_memory and device.type == "cuda",
                persistent_workers=persistent_workers)

    def __len__(self) -> int:
        """Batches per epoch."""
        return math.ceil(self.n / self.batch_size)

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The next epoch's batches ``(x, y)`` on the device (the permutation drawn now)."""
        if self.loader is None:
            for _, xb, yb in iterate_batches(self.x, self.y, batch_size=self.batch_size,
                                             shuffle=True, generator=self.generator,
                                             device=self.device):
                yield xb, yb
            return
        for xb, yb in self.loader.epoch():
            check_inputs(xb, yb, self.label)
            if self.classes is not None:
                check_labels_fit(yb, self.classes, self.label)
            yield (xb.to(self.device, non_blocking=True),
                   yb.to(self.device, non_blocking=True))

    def endless(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Epoch after epoch, forever (a new permutation per pass)."""
        while True:
            yield from self.epoch()


def ordered_batches(dataset: Dataset, *, batch_size: int, label: str, classes: int | None = None,
                    num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` batches of a data set in its own order, on the CPU: consecutive slices when in
    memory, else read through a ``DataLoader`` (:func:`stream_batches`), each streamed batch
    checked as :class:`EpochBatches` checks it. Slices of the same samples either way."""
    if in_memory(dataset):
        x, y = as_tensors(dataset)
        for start in range(0, x.shape[0], batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]
        return
    # A DataLoader without a generator draws its workers' base seed from torch's global
    # generator: forked, so that a streamed pass leaves it (dropout later on) as the in-memory
    # path does.
    with torch.random.fork_rng(devices=[]):
        for xb, yb in stream_batches(dataset, batch_size=batch_size, num_workers=num_workers):
            check_inputs(xb, yb, label)
            if classes is not None:
                check_labels_fit(yb, classes, label)
            yield xb, yb


def labels_of(dataset: Dataset, *, label: str, num_workers: int = 0) -> torch.Tensor:
    """All labels of a data set, int64 ``(N,)``: sliced when in memory, else one streamed pass
    that keeps only the labels (each batch checked)."""
    if in_memory(dataset):
        return as_tensors(dataset)[1]
    return torch.cat([y for _, y in ordered_batches(dataset, batch_size=256, label=label,
                                                    num_workers=num_workers)])


def first_input(dataset: Dataset) -> torch.Tensor:
    """The first sample's input as a batch of one (for :func:`num_classes_of`)."""
    if in_memory(dataset):
        return as_tensors(dataset)[0][:1]
    return torch.as_tensor(dataset[0][0]).unsqueeze(0)


def streamed_classes(model: nn.Module, forget: Dataset, retain: Dataset,
                     device: torch.device) -> int | None:
    """The model's number of outputs, to check the labels of streamed batches against; None
    when D_f and D_r are both in memory (their labels were checked whole before any work)."""
    if in_memory(forget) and in_memory(retain):
        return None
    return num_classes_of(model, first_input(forget), device)


def _int_label(y: Any) -> Any:
    """A scalar integer label as a Python int (so that parts of different data sets collate
    together); anything else unchanged, for the batch checks to report."""
    if isinstance(y, torch.Tensor) and y.ndim == 0 and not y.is_floating_point() \
            and y.dtype != torch.bool:
        return int(y)
    if isinstance(y, np.integer):
        return int(y)
    return y


def _base(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


class Joined(Dataset):
    """Samples of several data sets one after another, as ``(x, int label)``; a part's labels may
    be replaced by one integer or by a tensor of labels (one per sample of the part).

    Used to stream the unions the methods train on (relabelled D_f with D_r, D_f with a subset
    of D_r) in the order of their in-memory concatenation. A part (or the data set under a
    ``Subset`` part) with ``set_epoch`` is told each epoch; ``set_epoch`` exists only then, so
    persistent workers stay allowed otherwise.
    """

    def __init__(self, parts: Sequence[tuple[Dataset, int | torch.Tensor | None]]) -> None:
        self.parts = [ds for ds, _ in parts]
        self.labels = [lab for _, lab in parts]
        self.ends: list[int] = []
        total = 0
        for ds in self.parts:
            total += dataset_size(ds)
            self.ends.append(total)
        self.epoch_parts = [p for p in {id(_base(ds)): _base(ds) for ds in self.parts}.values()
                            if callable(getattr(p, "set_epoch", None))]
        if self.epoch_parts:
            self.set_epoch = self._set_epoch

    def _set_epoch(self, epoch: int) -> None:
        for part in self.epoch_parts:
            part.set_epoch(epoch)

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, i: int):
        if i < 0 or i >= len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        k = bisect.bisect_right(self.ends, i)
        j = i - (self.ends[k - 1] if k else 0)
        x, y = self.parts[k][j]
        lab = self.labels[k]
        if lab is None:
            y = _int_label(y)
        elif isinstance(lab, int):
            y = lab
        else:
            y = int(lab[j])
        return torch.as_tensor(x), y
