"""Bad Teacher (Chundawat et al., AAAI 2023): distil D_r from the original model and D_f from a
randomly initialised one."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from deepclean.data.datasets import as_tensors, in_memory
from deepclean.errors import ConfigurationError, DataError
from deepclean.masking import BN_STATS
from deepclean.methods._common import (
    EpochBatches,
    Joined,
    LoaderOptions,
    check_choice,
    check_fraction,
    frozen_copy,
    set_train_mode,
)
from deepclean.methods.base import (
    Unlearner,
    check_non_negative_int,
    check_positive,
    register_method,
)
from deepclean.methods.losses import distillation_kl, teacher_probabilities
from deepclean.methods.retrain import reinitialise
from deepclean.methods.space import IntRange, LogUniform, Param, SpaceContext, Uniform
from deepclean.progress import progress_bar

__all__ = ["BadTeacher", "bad_teacher_targets"]


def bad_teacher_targets(
    competent: nn.Module,
    incompetent: nn.Module,
    x: torch.Tensor,
    is_forget: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The distillation targets of one batch: row ``b`` is ``softmax(incompetent(x[b]) / T)`` where
    ``is_forget[b]`` and ``softmax(competent(x[b]) / T)`` elsewhere.

    Both teachers run on the rows of this very batch, without gradients; they must be in eval mode
    (their BatchNorm layers then use running statistics, so a row's output does not depend on the
    other rows and no buffer changes).
    """
    is_forget = is_forget.to(device=x.device, dtype=torch.bool)
    parts: dict[bool, torch.Tensor] = {}
    for flag, teacher in ((True, incompetent), (False, competent)):
        rows = is_forget if flag else ~is_forget
        if bool(rows.any()):
            parts[flag] = teacher_probabilities(teacher, x[rows], temperature)
    first = next(iter(parts.values()))
    if len(parts) == 2 and parts[True].shape[1] != parts[False].shape[1]:
        raise DataError(
            f"the incompetent teacher outputs {parts[True].shape[1]} classes but the model "
            f"{parts[False].shape[1]}; expected the same classes (same architecture)"
        )
    out = torch.empty((x.shape[0], first.shape[1]), dtype=first.dtype, device=first.device)
    for flag, probs in parts.items():
        out[is_forget if flag else ~is_forget] = probs
    return out


@register_method
class BadTeacher(LoaderOptions, Unlearner):
    """Bad Teacher: a student copy of the model distils a competent and an incompetent teacher.

    Paper: Chundawat, Tarun, Mandal, Kankanhalli, "Can Bad Teaching Induce Forgetting? Unlearning in
    Deep Networks Using an Incompetent Teacher", AAAI 2023.

    The competent teacher is a frozen copy of the original model; the incompetent teacher a frozen
    copy with every layer re-initialised (:func:`deepclean.methods.retrain.reinitialise`, seed
    stream 3; BatchNorm statistics reset) unless ``incompetent_teacher`` is given. The student
    starts as a copy of the original model and is trained on D_f together with a random
    ``retain_fraction`` of D_r (the paper's 30 %, seed stream 2), shuffled together (stream 0):
    each sample's target is the incompetent teacher's softened output if it belongs to D_f and the
    competent teacher's if it belongs to D_r (:func:`bad_teacher_targets`, computed on the very
    batch the student sees); the loss is ``KL(target || student)`` with batch-mean reduction and
    temperature ``T`` (:func:`deepclean.methods.losses.distillation_kl`). Adam without weight
    decay, constant ``lr``.
    The timed step is building the teachers and the training.

    BatchNorm: both teachers always run in eval mode (buffers bitwise unchanged). The student
    trains in train mode and with ``bn_stats="update"`` (default) re-estimates its running
    statistics on the mixed batches; ``bn_stats="freeze"`` keeps the student's BatchNorm in eval
    mode.

    Hyperparameters (defaults = the paper's code):
        epochs: passes over D_f + the retain subset. Default 1.
        lr: Adam learning rate. Default 1e-4.
        batch_size: samples per step. Default 256.
        temperature: KL temperature T (no T**2 factor). Default 1.0.
        retain_fraction: share of D_r used, in (0, 1]. Default 0.3.
        incompetent_teacher: a model to use as the incompetent teacher instead of a random
            re-initialisation (it is copied, never modified). Default None.
        bn_stats: ``"update"`` (default) or ``"freeze"`` for the student.
        seed: seeds the incompetent teacher, the retain subset and the shuffling.
        num_workers, pin_memory, persistent_workers: ``DataLoader`` options for a D_f or D_r that
            is not in memory (execution options, not hyperparameters: never recorded). Default
            0, False, False.

    Data: D_f and D_r may be any map-style ``Dataset`` of ``(x, y)`` pairs (the labels are not
    used). When both are in memory they are sliced as tensors; otherwise D_f and the retain
    subset are read through one ``DataLoader`` afresh every epoch (their union in the order of
    the in-memory concatenation, each sample's teacher flag attached), one batch in memory at a
    time, in the order the in-memory path draws from the same seed: the same samples give the
    same model, and ``num_workers`` does not change it.
    """

    name = "teacher"
    summary = "Distil D_r from the original model and D_f from a random (incompetent) teacher"
    reference = "Chundawat et al., Can Bad Teaching Induce Forgetting?, AAAI 2023"
    collaborators = ("incompetent_teacher",)
    streams = True

    def __init__(
        self,
        *,
        epochs: int = 1,
        lr: float = 1e-4,
        batch_size: int = 256,
        temperature: float = 1.0,
        retain_fraction: float = 0.3,
        incompetent_teacher: nn.Module | None = None,
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
        check_positive(lr=lr, batch_size=batch_size, temperature=temperature)
        check_non_negative_int(epochs=epochs, batch_size=batch_size)
        check_fraction("retain_fraction", retain_fraction)
        check_choice("bn_stats", bn_stats, BN_STATS)
        if incompetent_teacher is not None and not isinstance(incompetent_teacher, nn.Module):
            raise ConfigurationError(
                "incompetent_teacher must be an nn.Module or None, got "
                f"{type(incompetent_teacher).__name__}; pass a model with the same output classes"
            )
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.temperature = temperature
        self.retain_fraction = retain_fraction
        self.incompetent_teacher = incompetent_teacher
        self.bn_stats = bn_stats

    def _unlearn(self, model, xf, yf, xr, yr, device):
        return self._unlearn_data(model, TensorDataset(xf, yf), TensorDataset(xr, yr), device)

    def _unlearn_data(self, model, forget, retain, device):
        model.to(device)
        competent = frozen_copy(model)
        if self.incompetent_teacher is not None:
            incompetent = frozen_copy(self.incompetent_teacher).to(device)
        else:
            fresh = reinitialise(copy.deepcopy(model), self.seed * 1_000_003 + 3)
            incompetent = frozen_copy(fresh)
        n_forget, n_retain = len(forget), len(retain)
        n_keep = max(1, int(round(self.retain_fraction * n_retain)))
        keep = torch.randperm(n_retain, generator=self.generator(2))[:n_keep].sort().values
        if in_memory(forget) and in_memory(retain):
            (xf, _), (xr, _) = as_tensors(forget), as_tensors(retain)
            x = torch.cat([xf, xr[keep.to(xr.device)].to(xf.device)])
            flag = torch.cat([torch.ones(n_forget, dtype=torch.long),
                              torch.zeros(n_keep, dtype=torch.long)]).to(xf.device)
            union: Dataset = TensorDataset(x, flag)
        else:  # D_f then the retain subset, each sample flagged 1 (D_f) or 0 (D_r)
            union = Joined([(forget, 1), (Subset(retain, keep.tolist()), 0)])
        self.info_.update(n_forget=n_forget, n_retain_used=n_keep)
        if self.epochs == 0:
            return model
        batches = EpochBatches(union, batch_size=self.batch_size, generator=self.generator(0),
                               device=device, label="D_f and the retain subset",
                               **self._loader_options())
        opt = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=0.0)
        set_train_mode(model, self.bn_stats)
        steps = self.epochs * len(batches)
        bar = progress_bar(total=steps, desc=self.name, enabled=self.progress)
        for _ in range(self.epochs):
            for xb, fb in batches.epoch():
                targets = bad_teacher_targets(competent, incompetent, xb, fb.bool(),
                                              temperature=self.temperature)
                loss = distillation_kl(model(xb), targets, self.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
        bar.close()
        return model

    @classmethod
    def search_space(cls, context: SpaceContext) -> dict[str, Param]:
        """Learning rate in [1e-5, 1e-2] (log), retain fraction in [0.1, 1], epochs up to
        ``context.max_passes`` (each reads ``retain_fraction`` of D_r)."""
        return {"lr": LogUniform(1e-5, 1e-2), "retain_fraction": Uniform(0.1, 1.0),
                "epochs": IntRange(1, context.max_passes)}
