"""Retrain (gold model): train a freshly initialised network on D_r only."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepclean.methods._common import LoaderOptions
from deepclean.methods.base import Builder, Unlearner, register_method
from deepclean.training import TrainConfig, train_model

__all__ = ["Retrain", "reinitialise"]


def reinitialise(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every layer of ``model`` in place from ``seed``: each module's
    ``reset_parameters()`` in ``modules()`` order (BatchNorm also resets its running statistics).
    The caller's global random state is left unchanged.

    For the models of :mod:`deepclean.data.models` the result equals a fresh build with the same seed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return model


@register_method
class Retrain(LoaderOptions, Unlearner):
    """Gold standard: retrain from scratch on D_r with the original recipe.

    Every layer is re-initialised (``builder(seed)`` if given, else :func:`reinitialise` on a copy
    of the model) and trained on D_r with ``train_config`` (SGD; see :class:`TrainConfig`). The timed
    step is the whole training. ``seed`` seeds the initial weights and the data order.

    Hyperparameters: ``train_config`` (default ``TrainConfig()``), ``builder`` (optional callable
    ``seed -> nn.Module``), ``seed``. Execution options: ``num_workers``, ``pin_memory`` and
    ``persistent_workers`` for a D_r that is not in memory, read through a ``DataLoader`` every
    epoch (``streams``); data in memory gives the same model either way.
    """

    name = "retrain"
    summary = "Gold model: re-initialise every layer and train on D_r with the original recipe"
    reference = "the exact-unlearning reference used by every paper of the field"
    in_all = False  # the harness trains the gold model itself
    harness_args = {"train_config": "train_recipe", "builder": "model_builder"}
    collaborators = ("builder",)
    streams = True

    def __init__(
        self,
        *,
        train_config: TrainConfig | None = None,
        builder: Builder | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(seed=seed, device=device, progress=progress)
        self._set_loader_options(num_workers, pin_memory, persistent_workers)
        self.train_config = train_config or TrainConfig()
        self.builder = builder

    def _unlearn(self, model, xf, yf, xr, yr, device):
        return self._unlearn_data(model, None, TensorDataset(xr, yr), device)

    def _unlearn_data(self, model, forget, retain, device):
        fresh = self.builder(self.seed) if self.builder is not None else reinitialise(model, self.seed)
        return train_model(
            fresh.to(device), retain, None, self.train_config, seed=self.seed, device=device,
            desc="retrain (gold)", progress=self.progress, **self._loader_options(),
        )
