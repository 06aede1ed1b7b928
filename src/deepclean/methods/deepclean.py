"""DeepClean (Shi et al., arXiv 2311.10448, section 3) and its "Zero Weights" ablation (Table 4)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepclean.errors import ConfigurationError
from deepclean.fisher.diagonal import fisher_diagonal
from deepclean.fisher.train_fisher import TrainFisher
from deepclean.masking import BN_STATS, masked_finetune
from deepclean.methods.base import (
    Unlearner,
    check_non_negative_int,
    check_positive,
    check_positive_int,
    register_method,
)
from deepclean.methods.space import IntRange, LogUniform, Param, SpaceContext
from deepclean.selection import check_mask, mask_summary, select_weights

__all__ = ["DeepClean", "ZeroWeights", "reset_weights"]


def reset_weights(model: nn.Module, mask: dict[str, torch.Tensor]) -> None:
    """Set every selected weight (True in ``mask``) to exactly 0, in place.

    Raises:
        MaskError: the mask's keys or shapes do not match the model's parameters.
    """
    check_mask(model, mask)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in mask:
                p.masked_fill_(mask[name].to(p.device), 0.0)


@register_method
class DeepClean(Unlearner):
    """DeepClean: reset the weights that matter more to D_f than to D_r, fine-tune them on D_r.

    Steps (paper section 3): (1) Fisher diagonals I_Df and I_Dr (eq. 1, :func:`fisher_diagonal`);
    (2) W_f = {w_i : I_Df / I_Dr > gamma} (eq. 2, :func:`select_weights`); (3) set W_f to 0;
    (4) freeze W_r bitwise and fine-tune W_f on D_r with cross-entropy, Adam and cosine annealing
    (:func:`masked_finetune`). The whole of (1)-(4) is the timed unlearning step.

    Hyperparameters:
        gamma: selection threshold (paper: 1.1 random samples, 2.0 a class). Default 1.1.
        epochs: fine-tune epochs on D_r (paper: 3 for CIFAR, 1 for MNIST). Default 3.
        lr: initial Adam learning rate (paper 1e-3).
        batch_size: fine-tune batch size. Default 128.
        fisher_batch_size: batch size of the Fisher pass (does not change the result). Default 256.
        bn_stats: ``"update"`` (default: BatchNorm re-estimates its running statistics on D_r
            during the fine-tune) or ``"freeze"`` (BatchNorm buffers bitwise unchanged).
        train_fisher: optional :class:`deepclean.fisher.train_fisher.TrainFisher`, I_D of this model on
            D = D_f + D_r computed once beforehand; then only D_f gets a Fisher pass and
            ``I_Dr = (|D| I_D - |D_f| I_Df) / |D_r|`` (same diagonal up to rounding). It must
            belong to this model and exactly these samples (else ``ConfigurationError`` /
            ``SplitMismatchError`` before any reset). Default None: both passes, as in the paper.
        seed: seeds the fine-tune's shuffling.

    After :meth:`unlearn`, ``mask_`` holds the selection and ``info_`` the number and share of
    weights reset (``n_reset``, ``n_weights``, ``share_reset`` as a fraction).
    """

    name = "deepclean"
    summary = "Reset weights with Fisher ratio I_f/I_r > gamma, fine-tune only those on D_r"
    reference = "Shi et al., DeepClean, arXiv 2311.10448 (2023)"
    scenario_threshold = "gamma"
    accepts_train_fisher = True
    harness_args = {"epochs": "unlearn_epochs", "lr": "unlearn_lr"}
    collaborators = ("train_fisher",)

    def __init__(
        self,
        *,
        gamma: float = 1.1,
        epochs: int = 3,
        lr: float = 1e-3,
        batch_size: int = 128,
        fisher_batch_size: int = 256,
        bn_stats: str = "update",
        train_fisher: TrainFisher | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__(seed=seed, device=device, progress=progress)
        check_positive(gamma=gamma, lr=lr)
        if train_fisher is not None and not isinstance(train_fisher, TrainFisher):
            raise ConfigurationError(
                f"train_fisher must be a TrainFisher (deepclean.precompute_train_fisher) or None, "
                f"got {type(train_fisher).__name__}"
            )
        check_positive_int(batch_size=batch_size, fisher_batch_size=fisher_batch_size)
        check_non_negative_int(epochs=epochs)
        if bn_stats not in BN_STATS:
            raise ConfigurationError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
        self.gamma = gamma
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.fisher_batch_size = fisher_batch_size
        self.bn_stats = bn_stats
        self.train_fisher = train_fisher
        self.mask_: dict[str, torch.Tensor] | None = None

    def fisher_pair(
        self, model: nn.Module, xf: torch.Tensor, yf: torch.Tensor, xr: torch.Tensor,
        yr: torch.Tensor, device: torch.device,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The Fisher diagonals on D_f and D_r (step 1); with ``train_fisher``, I_Dr follows from
        the precomputed I_D and I_Df without a pass over D_r."""
        if self.train_fisher is not None:
            self.train_fisher.check(model, xf, yf, xr, yr)  # before any work
        fisher_f = fisher_diagonal(model, TensorDataset(xf, yf),
                                   batch_size=self.fisher_batch_size, device=device)
        if self.train_fisher is not None:
            fisher_r = self.train_fisher.retain_fisher(model, fisher_f, xf, yf, xr, yr,
                                                       check=False)
            self.info_["fisher_mode"] = "precomputed"
        else:
            fisher_r = fisher_diagonal(model, TensorDataset(xr, yr),
                                       batch_size=self.fisher_batch_size, device=device)
            self.info_["fisher_mode"] = "two_passes"
        return fisher_f, fisher_r

    def _unlearn(self, model, xf, yf, xr, yr, device):
        fisher_f, fisher_r = self.fisher_pair(model, xf, yf, xr, yr, device)
        return self.apply_selection(model, fisher_f, fisher_r, xr, yr, device)

    def apply_selection(
        self,
        model: nn.Module,
        fisher_forget: dict[str, torch.Tensor],
        fisher_retain: dict[str, torch.Tensor],
        xr: torch.Tensor,
        yr: torch.Tensor,
        device: torch.device,
    ) -> nn.Module:
        """Steps (2)-(4) on ``model`` in place, from precomputed Fisher diagonals (used by the
        gamma sweep, which computes the two diagonals once)."""
        mask = select_weights(fisher_forget, fisher_retain, self.gamma)
        reset_weights(model, mask)
        self.mask_ = mask
        selected, total = mask_summary(mask)
        self.info_.update(n_reset=selected, n_weights=total, share_reset=selected / total)
        return masked_finetune(
            model, mask, xr, yr, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
            generator=self.generator(), device=device, bn_stats=self.bn_stats,
            desc=f"{self.name} fine-tune", progress=self.progress,
        )

    @classmethod
    def search_space(cls, context: SpaceContext) -> dict[str, Param]:
        """gamma log-uniform (random forgetting: [1.01, 10]; a class or a request: [1.1, 100]),
        fine-tune epochs up to ``context.max_passes``, Adam learning rate in [1e-4, 1e-2]."""
        high = 10.0 if context.scenario == "random" else 100.0
        low = 1.01 if context.scenario == "random" else 1.1
        return {"gamma": LogUniform(low, high), "epochs": IntRange(1, context.max_passes),
                "lr": LogUniform(1e-4, 1e-2)}


@register_method
class ZeroWeights(DeepClean):
    """Ablation "Zero Weights" (paper Table 4): DeepClean's reset of W_f without the fine-tune.

    Same selection as :class:`DeepClean` (``gamma``, ``fisher_batch_size``, ``train_fisher``); the
    timed step is the Fisher passes and the reset.
    """

    name = "zero_weights"
    summary = "DeepClean's Fisher-ratio reset of W_f to zero, without the fine-tune (ablation)"
    reference = "Shi et al., DeepClean, arXiv 2311.10448 (2023), Table 4"
    scenario_threshold = "gamma"
    accepts_train_fisher = True
    collaborators = ("train_fisher",)

    def __init__(
        self,
        *,
        gamma: float = 1.1,
        fisher_batch_size: int = 256,
        train_fisher: TrainFisher | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__(gamma=gamma, epochs=0, fisher_batch_size=fisher_batch_size,
                         train_fisher=train_fisher, seed=seed, device=device, progress=progress)

    @classmethod
    def search_space(cls, context: SpaceContext) -> dict[str, Param]:
        """gamma only, over DeepClean's range (no fine-tune)."""
        return {"gamma": DeepClean.search_space(context)["gamma"]}
