"""DeepClean (Shi et al., arXiv 2311.10448, section 3) and its "Zero Weights" ablation (Table 4)."""

from __future__ import annotations

import torch
from torch import nn

from deepclean.errors import ConfigurationError
from deepclean.fisher import fisher_diagonal
from deepclean.masking import BN_STATS, masked_finetune
from deepclean.methods.base import (
    Unlearner,
    check_non_negative_int,
    check_positive,
    check_positive_int,
    register_method,
)
from deepclean.selection import check_mask, mask_summary, select_weights
from torch.utils.data import TensorDataset

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
        seed: seeds the fine-tune's shuffling.

    After :meth:`unlearn`, ``mask_`` holds the selection and ``info_`` the number and share of
    weights reset (``n_reset``, ``n_weights``, ``share_reset`` as a fraction).
    """

    name = "deepclean"
    summary = "Reset weights with Fisher ratio I_f/I_r > gamma, fine-tune only those on D_r"
    reference = "Shi et al., DeepClean, arXiv 2311.10448 (2023)"

    def __init__(
        self,
        *,
        gamma: float = 1.1,
        epochs: int = 3,
        lr: float = 1e-3,
        batch_size: int = 128,
        fisher_batch_size: int = 256,
        bn_stats: str = "update",
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__(seed=seed, device=device, progress=progress)
        check_positive(gamma=gamma, lr=lr)
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
        self.mask_: dict[str, torch.Tensor] | None = None

    def fisher_pair(
        self, model: nn.Module, xf: torch.Tensor, yf: torch.Tensor, xr: torch.Tensor,
        yr: torch.Tensor, device: torch.device,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The Fisher diagonals on D_f and D_r (step 1)."""
        fisher_f = fisher_diagonal(model, TensorDataset(xf, yf),
                                   batch_size=self.fisher_batch_size, device=device)
        fisher_r = fisher_diagonal(model, TensorDataset(xr, yr),
                                   batch_size=self.fisher_batch_size, device=device)
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


@register_method
class ZeroWeights(DeepClean):
    """Ablation "Zero Weights" (paper Table 4): DeepClean's reset of W_f without the fine-tune.

    Same selection as :class:`DeepClean` (``gamma``, ``fisher_batch_size``); the timed step is the
    two Fisher passes and the reset.
    """

    name = "zero_weights"
    summary = "DeepClean's Fisher-ratio reset of W_f to zero, without the fine-tune (ablation)"
    reference = "Shi et al., DeepClean, arXiv 2311.10448 (2023), Table 4"

    def __init__(
        self,
        *,
        gamma: float = 1.1,
        fisher_batch_size: int = 256,
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__(gamma=gamma, epochs=0, fisher_batch_size=fisher_batch_size, seed=seed,
                         device=device, progress=progress)
