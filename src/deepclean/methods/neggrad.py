"""NegGrad: gradient ascent on the forget set, optionally with descent on the retain set
(NegGrad+)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepclean.errors import ConfigurationError
from deepclean.masking import BN_STATS
from deepclean.methods._common import (
    OPTIMIZERS,
    EpochBatches,
    LoaderOptions,
    check_choice,
    check_fraction,
    make_optimizer,
    set_train_mode,
    streamed_classes,
)
from deepclean.methods.base import (
    Unlearner,
    check_non_negative_int,
    check_positive,
    register_method,
)
from deepclean.methods.space import IntRange, LogUniform, Param, SpaceContext, Uniform
from deepclean.progress import progress_bar

__all__ = ["NegGrad"]


@register_method
class NegGrad(LoaderOptions, Unlearner):
    """NegGrad: maximise the cross-entropy of the forget set D_f by gradient ascent.

    Papers: gradient ascent on D_f as an unlearning baseline (Golatkar et al., "Eternal Sunshine
    of the Spotless Net", CVPR 2020; Thudi et al., "Unrolling SGD", EuroS&P 2022); the
    retain-regularised variant NegGrad+ of Kurmanji et al. ("Towards Unbounded Machine
    Unlearning", NeurIPS 2023).

    Each step minimises ``(1 - alpha) * (-CE(D_f batch)) + alpha * CE(D_r batch)``. With
    ``alpha = 0`` (default) this is plain NegGrad and D_r is never read; with ``0 < alpha < 1``
    it is NegGrad+, each forget batch paired with the next batch of an endless, reshuffled stream
    of D_r. One epoch is one pass over D_f. Cross-entropy ascent is unbounded, so the defaults are
    few, small steps; Adam or SGD (momentum 0.9), no weight decay, constant learning rate.

    BatchNorm: with ``bn_stats="update"`` (default) the model trains in train mode and BatchNorm
    re-estimates its running statistics from the batches it sees (only D_f when ``alpha = 0``);
    ``bn_stats="freeze"`` keeps every BatchNorm layer in eval mode, its buffers bitwise unchanged.

    Hyperparameters:
        epochs: passes over D_f. Default 3.
        lr: learning rate. Default 1e-4.
        optimizer: ``"adam"`` (default; its normalised steps move even when the loss on a memorised
            D_f is near 0 and plain gradients vanish) or ``"sgd"`` (momentum 0.9).
        alpha: weight of the retain loss, in [0, 1). Default 0.0 (plain NegGrad).
        batch_size: samples per D_f batch (and per D_r batch). Default 64.
        bn_stats: ``"update"`` (default) or ``"freeze"``.
        seed: seeds the shuffling of D_f and D_r (two independent streams).
        num_workers, pin_memory, persistent_workers: ``DataLoader`` options for a D_f or D_r that
            is not in memory (execution options, not hyperparameters: never recorded). Default
            0, False, False.

    Data: D_f and D_r may be any map-style ``Dataset`` of ``(x, y)`` pairs. Data in memory is
    sliced as tensors; any other data set is read through a ``DataLoader`` afresh every epoch,
    one batch in memory at a time, in the order the in-memory path draws from the same seed
    (:class:`deepclean.data.datasets.ShuffledBatches`), so the same samples give the same model;
    ``num_workers`` does not change it.

    The timed unlearning step is the whole training loop.
    """

    name = "neggrad"
    summary = "Gradient ascent on D_f (NegGrad); alpha > 0 adds descent on D_r (NegGrad+)"
    reference = (
        "Golatkar et al., CVPR 2020; Thudi et al., EuroS&P 2022; NegGrad+: Kurmanji et al., "
        "NeurIPS 2023"
    )
    streams = True

    def __init__(
        self,
        *,
        epochs: int = 3,
        lr: float = 1e-4,
        optimizer: str = "adam",
        alpha: float = 0.0,
        batch_size: int = 64,
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
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_choice("bn_stats", bn_stats, BN_STATS)
        check_fraction("alpha", alpha, allow_zero=True)
        if alpha >= 1:
            raise ConfigurationError(
                f"alpha must be < 1 (alpha = 1 would ignore D_f entirely), got {alpha!r}; "
                "use alpha = 0 for NegGrad or e.g. 0.5 to 0.99 for NegGrad+"
            )
        self.epochs = epochs
        self.lr = lr
        self.optimizer = optimizer
        self.alpha = alpha
        self.batch_size = batch_size
        self.bn_stats = bn_stats

    def _unlearn(self, model, xf, yf, xr, yr, device):
        return self._unlearn_data(model, TensorDataset(xf, yf), TensorDataset(xr, yr), device)

    def _unlearn_data(self, model, forget, retain, device):
        model.to(device)
        if self.epochs == 0:
            return model
        classes = streamed_classes(model, forget, retain, device)
        options = self._loader_options()
        forget_batches = EpochBatches(forget, batch_size=self.batch_size,
                                      generator=self.generator(0), device=device,
                                      label="forget set D_f", classes=classes, **options)
        retain_stream = (
            EpochBatches(retain, batch_size=self.batch_size, generator=self.generator(1),
                         device=device, label="retain set D_r", classes=classes,
                         **options).endless()
            if self.alpha > 0 else None
        )
        opt = make_optimizer(model.parameters(), self.optimizer, self.lr)
        set_train_mode(model, self.bn_stats)
        steps = self.epochs * len(forget_batches)
        bar = progress_bar(total=steps, desc=self.name, enabled=self.progress)
        last_forget_loss = float("nan")
        try:
            for _ in range(self.epochs):
                for xb, yb in forget_batches.epoch():
                    forget_loss = nn.functional.cross_entropy(model(xb), yb)
                    loss = -(1.0 - self.alpha) * forget_loss
                    if retain_stream is not None:
                        xrb, yrb = next(retain_stream)
                        loss = loss + self.alpha * nn.functional.cross_entropy(model(xrb), yrb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    last_forget_loss = float(forget_loss.detach())
                    bar.update(1)
        finally:
            if retain_stream is not None:
                retain_stream.close()  # ends the DataLoader of the epoch it was in
        bar.close()
        self.info_.update(steps=steps, last_forget_loss=last_forget_loss)
        return model

    @classmethod
    def search_space(cls, context: SpaceContext) -> dict[str, Param]:
        """Learning rate in [1e-6, 1e-3] (log), epochs (passes over D_f) up to
        ``context.max_passes``, retain weight alpha in [0, 0.99] (0: NegGrad, > 0: NegGrad+)."""
        return {"lr": LogUniform(1e-6, 1e-3), "epochs": IntRange(1, context.max_passes),
                "alpha": Uniform(0.0, 0.99)}
