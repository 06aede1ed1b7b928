"""Small helpers shared by the training-based unlearning methods (private)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from deepclean.data.datasets import iterate_batches
from deepclean.errors import ConfigurationError, DataError
from deepclean.masking import BN_STATS

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


def endless_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Shuffled batches ``(index, x, y)`` forever; a new permutation from ``generator`` per pass."""
    while True:
        yield from iterate_batches(
            x, y, batch_size=batch_size, shuffle=True, generator=generator, device=device
        )
