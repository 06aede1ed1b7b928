"""SCRUB (Kurmanji et al., NeurIPS 2023): a student that moves away from its teacher on D_f and
stays close to it on D_r."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepclean.errors import ConfigurationError
from deepclean.masking import BN_STATS
from deepclean.methods._common import (
    EpochBatches,
    LoaderOptions,
    check_choice,
    frozen_copy,
    set_train_mode,
    streamed_classes,
)
from deepclean.methods.base import (
    Unlearner,
    check_non_negative_int,
    check_positive,
    register_method,
)
from deepclean.methods.losses import distillation_kl, teacher_probabilities
from deepclean.methods.space import Choice, IntRange, LogUniform, Param, SpaceContext
from deepclean.progress import progress_bar

__all__ = ["SCRUB"]


@register_method
class SCRUB(LoaderOptions, Unlearner):
    """SCRUB: alternate max-steps on D_f and min-steps on D_r against a frozen teacher.

    Paper: Kurmanji, Triantafillou, Hayes, Triantafillou, "Towards Unbounded Machine Unlearning",
    NeurIPS 2023 (defaults from the authors' code).

    The teacher is a frozen copy of the original model (eval mode); the student starts as a copy.
    For each of ``epochs`` epochs: if the epoch is one of the first ``max_steps``, one pass over D_f
    (batches of ``forget_batch_size``) *maximising* ``T**2 * KL(teacher || student)``; then one pass
    over D_r (batches of ``batch_size``) minimising
    ``alpha * T**2 * KL(teacher || student) + gamma * CE(student, y)``. The KL is
    :func:`deepclean.methods.losses.distillation_kl` (batch mean) at temperature ``T``; the
    teacher's targets are computed on the very batch the student sees
    (:func:`deepclean.methods.losses.teacher_probabilities`). One SGD optimiser (momentum 0.9,
    weight decay) serves both kinds of step, constant learning rate. The timed step is the training.

    BatchNorm: the teacher always runs in eval mode (buffers bitwise unchanged); the student trains
    in train mode and with ``bn_stats="update"`` (default) its running statistics follow the batches
    of both phases; ``bn_stats="freeze"`` keeps the student's BatchNorm in eval mode.

    Hyperparameters:
        epochs: total epochs (the paper's ``sgda_epochs``). Default 3.
        max_steps: epochs that begin with a max-step pass over D_f (``msteps``). Default 2.
        lr: SGD learning rate. Default 5e-4.
        momentum: SGD momentum. Default 0.9.
        weight_decay: SGD weight decay. Default 5e-4.
        temperature: KL temperature T. Default 4.0.
        alpha: weight of the KL term of the min-steps. Default 0.001.
        gamma: weight of the cross-entropy of the min-steps. Default 0.99.
        batch_size: D_r batch size. Default 128.
        forget_batch_size: D_f batch size. Default 32.
        bn_stats: ``"update"`` (default) or ``"freeze"`` for the student.
        seed: seeds the shuffling of D_f (stream 0) and D_r (stream 1).
        num_workers, pin_memory, persistent_workers: ``DataLoader`` options for a D_f or D_r that
            is not in memory (execution options, not hyperparameters: never recorded). Default
            0, False, False.

    Data: D_f and D_r may be any map-style ``Dataset`` of ``(x, y)`` pairs; one that is not in
    memory is read through a ``DataLoader`` afresh in every pass, one batch in memory at a time,
    in the order the in-memory path draws from the same seed (the same samples give the same
    model; ``num_workers`` does not change it).
    """

    name = "scrub"
    summary = "Student maximises KL to the original model on D_f, minimises KL + CE on D_r"
    reference = "Kurmanji et al., Towards Unbounded Machine Unlearning, NeurIPS 2023"
    streams = True

    def __init__(
        self,
        *,
        epochs: int = 3,
        max_steps: int = 2,
        lr: float = 5e-4,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        temperature: float = 4.0,
        alpha: float = 0.001,
        gamma: float = 0.99,
        batch_size: int = 128,
        forget_batch_size: int = 32,
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
        check_positive(lr=lr, temperature=temperature, batch_size=batch_size,
                       forget_batch_size=forget_batch_size)
        check_non_negative_int(epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                               forget_batch_size=forget_batch_size)
        for key, value in (("momentum", momentum), ("weight_decay", weight_decay),
                           ("alpha", alpha), ("gamma", gamma)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigurationError(
                    f"{key} must be a number >= 0, got {value!r}; pass 0 or a positive number"
                )
        check_choice("bn_stats", bn_stats, BN_STATS)
        self.epochs = epochs
        self.max_steps = max_steps
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.temperature = temperature
        self.alpha = alpha
        self.gamma = gamma
        self.batch_size = batch_size
        self.forget_batch_size = forget_batch_size
        self.bn_stats = bn_stats

    def _unlearn(self, model, xf, yf, xr, yr, device):
        return self._unlearn_data(model, TensorDataset(xf, yf), TensorDataset(xr, yr), device)

    def _unlearn_data(self, model, forget, retain, device):
        model.to(device)
        if self.epochs == 0:
            return model
        classes = streamed_classes(model, forget, retain, device)
        options = self._loader_options()
        forget_batches = EpochBatches(forget, batch_size=self.forget_batch_size,
                                      generator=self.generator(0), device=device,
                                      label="forget set D_f", classes=classes, **options)
        retain_batches = EpochBatches(retain, batch_size=self.batch_size,
                                      generator=self.generator(1), device=device,
                                      label="retain set D_r", classes=classes, **options)
        teacher = frozen_copy(model)
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        set_train_mode(model, self.bn_stats)
        t = self.temperature
        n_max = min(self.max_steps, self.epochs)
        steps = n_max * len(forget_batches) + self.epochs * len(retain_batches)
        bar = progress_bar(total=steps, desc=self.name, enabled=self.progress)
        for epoch in range(self.epochs):
            if epoch < self.max_steps:
                for xb, _ in forget_batches.epoch():
                    targets = teacher_probabilities(teacher, xb, t)
                    loss = -(t * t) * distillation_kl(model(xb), targets, t)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    bar.update(1)
            for xb, yb in retain_batches.epoch():
                targets = teacher_probabilities(teacher, xb, t)
                logits = model(xb)
                loss = (self.alpha * (t * t) * distillation_kl(logits, targets, t)
                        + self.gamma * nn.functional.cross_entropy(logits, yb))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
        bar.close()
        self.info_.update(max_epochs=n_max, steps=steps)
        return model

    @classmethod
    def search_space(cls, context: SpaceContext) -> dict[str, Param]:
        """Learning rate in [1e-5, 1e-2] (log), epochs up to ``context.max_passes`` (one pass
        over D_r each), max-steps 1 .. min(epochs cap, 3), forget batch 16 .. 128."""
        return {"lr": LogUniform(1e-5, 1e-2), "epochs": IntRange(1, context.max_passes),
                "max_steps": IntRange(1, min(context.max_passes, 3)),
                "forget_batch_size": Choice((16, 32, 64, 128))}
