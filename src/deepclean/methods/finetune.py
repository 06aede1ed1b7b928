"""Fine-tune baseline (paper section 4): train every weight on D_r with DeepClean's optimiser."""

from __future__ import annotations

import torch

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
    """

    name = "finetune"
    summary = "Fine-tune every weight on D_r with DeepClean's optimiser and learning rate"
    reference = "Shi et al., DeepClean, arXiv 2311.10448 (2023), section 4 baseline"
    harness_args = {"epochs": "unlearn_epochs", "lr": "unlearn_lr"}  # the same as DeepClean's

    def __init__(
        self,
        *,
        epochs: int = 3,
        lr: float = 1e-3,
        batch_size: int = 128,
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__(seed=seed, device=device, progress=progress)
        check_positive(lr=lr)
        check_positive_int(batch_size=batch_size)
        check_non_negative_int(epochs=epochs)
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size

    def _unlearn(self, model, xf, yf, xr, yr, device):
        return masked_finetune(
            model, None, xr, yr, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
            generator=self.generator(), device=device, desc="finetune", progress=self.progress,
        )

    @classmethod
    def search_space(cls, context: SpaceContext) -> dict[str, Param]:
        """Learning rate in [1e-5, 1e-2] (log), epochs up to ``context.max_passes``."""
        return {"lr": LogUniform(1e-5, 1e-2), "epochs": IntRange(1, context.max_passes)}
