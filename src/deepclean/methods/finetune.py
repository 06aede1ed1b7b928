"""Fine-tune baseline (paper section 4): train every weight on D_r with DeepClean's optimiser."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from deepclean.data.datasets import check_loader_options
from deepclean.masking import masked_finetune
from deepclean.methods.base import (
    Unlearner,
    check_non_negative_int,
    check_positive,
    check_positive_int,
    register_method,
)
from deepclean.methods.space import IntRange, LogUniform, Param, SpaceContext

__all__ = ["FineTune"]


@register_method
class FineTune(Unlearner):
    """Fine-tune on D_r only (catastrophic forgetting of D_f), as compared in the paper.

    Cross-entropy, Adam, cosine annealing from ``lr``, no augmentation, every weight trainable;
    BatchNorm in train mode. The timed step is the fine-tune.

    Hyperparameters: ``epochs`` (default 3), ``lr`` (default 1e-3, DeepClean's), ``batch_size``
    (default 128), ``seed``.

    Data: D_r may be any map-style ``Dataset`` of ``(x, y)`` pairs; one that is not in memory is
    read through a ``DataLoader`` afresh every epoch, one batch in memory at a time, in the order
    the in-memory path draws from the same seed (:func:`deepclean.masking.masked_finetune`).
    ``num_workers``, ``pin_memory`` and ``persistent_workers`` are its ``DataLoader`` options
    (execution options, not hyperparameters: never recorded).
    """

    name = "finetune"
    summary = "Fine-tune every weight on D_r with DeepClean's optimiser and learning rate"
    reference = "Shi et al., DeepClean, arXiv 2311.10448 (2023), section 4 baseline"
    harness_args = {"epochs": "unlearn_epochs", "lr": "unlearn_lr"}  # the same as DeepClean's
    streams = True

    def __init__(
        self,
        *,
        epochs: int = 3,
        lr: float = 1e-3,
        batch_size: int = 128,
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(seed=seed, device=device, progress=progress)
        check_loader_options(num_workers=num_workers, pin_memory=pin_memory,
                             persistent_workers=persistent_workers)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        check_positive(lr=lr)
        check_positive_int(batch_size=batch_size)
        check_non_negative_int(epochs=epochs)
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size

    def _unlearn(self, model, xf, yf, xr, yr, device):
        return self._unlearn_data(model, TensorDataset(xf, yf), TensorDataset(xr, yr), device)

    def _unlearn_data(self, model, forget, retain, device):
        return masked_finetune(
            model, None, retain, None, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
            generator=self.generator(), device=device, desc="finetune", progress=self.progress,
            num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    @classmethod
    def search_space(cls, context: SpaceContext) -> dict[str, Param]:
        """Learning rate in [1e-5, 1e-2] (log), epochs up to ``context.max_passes``."""
        return {"lr": LogUniform(1e-5, 1e-2), "epochs": IntRange(1, context.max_passes)}
