"""Sparse MU / l1-sparse unlearning (Jia, Liu, Ram, Yao, Liu, Liu, Sharma, Liu, "Model Sparsity
Can Simplify Machine Unlearning", NeurIPS 2023)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepclean.errors import ConfigurationError
from deepclean.methods._common import EpochBatches, LoaderOptions, streamed_classes
from deepclean.methods.base import (
    Unlearner,
    check_non_negative_int,
    check_positive,
    register_method,
)
from deepclean.methods.space import IntRange, LogUniform, Param, SpaceContext
from deepclean.progress import progress_bar

__all__ = ["SparseMU", "l1_strength"]

OPTIMIZERS = ("sgd", "adam")


def l1_strength(gamma: float, step: int, total_steps: int) -> float:
    """The l1 strength at optimiser step ``step`` (0-based) of ``total_steps``: it decays linearly
    from ``gamma`` at the first step towards 0, ``gamma * (1 - step / total_steps)``."""
    return gamma * (1.0 - step / total_steps)


@register_method
class SparseMU(LoaderOptions, Unlearner):
    """Sparse MU ("l1-sparse" unlearning, Jia et al., NeurIPS 2023): fine-tune on D_r with the loss

        CE(model(x), y) + gamma_t * ||w||_1,   gamma_t = gamma * (1 - t / T)

    over every trainable parameter w (the authors' code sums |w| over ``model.parameters()``, so
    BatchNorm affine parameters and biases are included), the strength decaying linearly to 0 over
    the T optimiser steps (the paper's "linear decay" scheme; the authors' code decays it per epoch,
    here it decays per step). BatchNorm runs in train mode (running statistics re-estimated on D_r).
    No augmentation; constant learning rate, as in the authors' code for these few epochs.

    Hyperparameters:
        gamma: initial l1 strength. Default 5e-4 (the authors' code).
        epochs: passes over D_r. Default 5 (the paper uses 10 on CIFAR-10 with a GPU).
        lr: learning rate. Default 0.01 (SGD) -- set about 1e-3 with ``optimizer="adam"``.
        optimizer: ``"sgd"`` (default; momentum 0.9, as in the authors' code) or ``"adam"``.
        momentum: SGD momentum. Default 0.9.
        weight_decay: L2 weight decay of the optimiser. Default 5e-4 (the authors' code).
        batch_size: samples per step. Default 128.
        seed: seeds the shuffling.
        num_workers, pin_memory, persistent_workers: ``DataLoader`` options for a D_f or D_r that
            is not in memory (execution options, not hyperparameters: never recorded). Default
            0, False, False.

    Data: D_r may be any map-style ``Dataset`` of ``(x, y)`` pairs; one that is not in memory is
    read through a ``DataLoader`` afresh every epoch, one batch in memory at a time, in the order
    the in-memory path draws from the same seed (the same samples give the same model;
    ``num_workers`` does not change it).

    Timed region: the whole fine-tune. D_f is not used. ``info_`` holds ``steps`` and the final
    ``l1_norm`` of the weights.
    """

    name = "sparse_mu"
    summary = "Fine-tune on D_r with an l1 penalty whose strength decays linearly to 0"
    reference = (
        "Jia et al., Model Sparsity Can Simplify Machine Unlearning, NeurIPS 2023 (l1-sparse MU)"
    )
    streams = True

    def __init__(
        self,
        *,
        gamma: float = 5e-4,
        epochs: int = 5,
        lr: float = 0.01,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        batch_size: int = 128,
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(seed=seed, device=device, progress=progress)
        self._set_loader_options(num_workers, pin_memory, persistent_workers)
        check_positive(gamma=gamma, lr=lr, batch_size=batch_size)
        check_non_negative_int(epochs=epochs, batch_size=batch_size)
        if optimizer not in OPTIMIZERS:
            raise ConfigurationError(
                f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}"
            )
        for key, value in (("momentum", momentum), ("weight_decay", weight_decay)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigurationError(f"{key} must be a number >= 0, got {value!r}")
        self.gamma = gamma
        self.epochs = epochs
        self.lr = lr
        self.optimizer = optimizer
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.batch_size = batch_size

    def _unlearn(self, model, xf, yf, xr, yr, device):
        return self._unlearn_data(model, TensorDataset(xf, yf), TensorDataset(xr, yr), device)

    def _unlearn_data(self, model, forget, retain, device):
        batches = EpochBatches(retain, batch_size=self.batch_size, generator=self.generator(),
                               device=device, label="retain set D_r",
                               classes=streamed_classes(model, forget, retain, device),
                               **self._loader_options())
        params = [p for p in model.parameters() if p.requires_grad]
        if self.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        else:
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        total = self.epochs * len(batches)
        step = 0
        model.train()
        bar = progress_bar(total=total, desc=self.name, enabled=self.progress)
        for _ in range(self.epochs):
            for xb, yb in batches.epoch():
                strength = l1_strength(self.gamma, step, total)
                l1 = torch.stack([p.abs().sum() for p in params]).sum()
                loss = nn.functional.cross_entropy(model(xb), yb) + strength * l1
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                bar.update(1)
        bar.close()
        with torch.no_grad():
            self.info_.update(steps=step, l1_norm=float(sum(p.abs().sum() for p in params)))
        return model

    @classmethod
    def search_space(cls, context: SpaceContext) -> dict[str, Param]:
        """l1 strength gamma in [1e-5, 1e-2] (log), SGD learning rate in [1e-4, 1e-1] (log),
        epochs up to ``context.max_passes``."""
        return {"gamma": LogUniform(1e-5, 1e-2), "lr": LogUniform(1e-4, 1e-1),
                "epochs": IntRange(1, context.max_passes)}
