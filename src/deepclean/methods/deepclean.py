"""DeepClean (Shi et al., arXiv 2311.10448, section 3) and its "Zero Weights" ablation (Table 4)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from deepclean.data.datasets import as_tensors, check_loader_options, in_memory
from deepclean.errors import ConfigurationError
from deepclean.fisher.diagonal import fisher_diagonal
from deepclean.fisher.train_fisher import TrainFisher
from deepclean.masking import BN_STATS, masked_finetune
from deepclean.methods.autogamma import (
    auto_gamma_data,
    check_holdout_disjoint,
    no_holdout_error,
)
from deepclean.methods.base import (
    Unlearner,
    check_non_negative_int,
    check_positive,
    check_positive_int,
    register_method,
)
from deepclean.methods.dynamic import dynamic_masked_finetune
from deepclean.methods.space import IntRange, LogUniform, Param, SpaceContext
from deepclean.selection import check_mask, mask_summary, select_weights
from deepclean.validation import check_inputs

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
        gamma: selection threshold (paper: 1.1 random samples, 2.0 a class). Default 1.1. Or
            ``"auto"``: chosen on held-out data from the Fisher pair already computed
            (:mod:`deepclean.methods.autogamma`: candidates by reset share, short fine-tunes on a
            subset of D_r, a forgetting verdict on small held-out slices; at most
            ``1 + auto_budget`` times the fine-tune steps of a fixed-gamma run). Needs
            ``holdout``; without it the constructor raises ``ConfigurationError`` naming the fix,
            which is why the library's default stays 1.1.
        holdout: held-out ``(x, y)`` Dataset for ``gamma="auto"``: samples the original model
            never trained on, drawn like the training data (not the test half results are
            reported on). A collaborator, not a hyperparameter (``info_["holdout_size"]`` records
            its size). Ignored with a numeric gamma.
        auto_budget: share (0 to 0.5) of the full fine-tune's steps that all candidates of the
            search may use together. Default 0.4.
        auto_candidates: candidates the search evaluates at most (bisection over 8 reset shares
            needs 3). Default 3.
        auto_eval_size: largest slice of D_f, matched held-out and retained held-out samples a
            candidate is scored on. Default 256.
        refresh_every: dynamic Fisher (paper limitation 3, :mod:`deepclean.methods.dynamic`):
            every so many fine-tune steps recompute the ratio on the current model and grow W_f
            (newly selected weights set to 0 and trained; the rest stays bitwise frozen).
            Default 0: off, the paper's static selection.
        refresh_size: D_r samples per refresh (None: all of D_r).
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
        num_workers, pin_memory, persistent_workers: ``DataLoader`` options for a D_f or D_r that
            is not in memory (execution options, not hyperparameters: never recorded). Default
            0, False, False.

    Data: D_f and D_r may be any map-style ``Dataset`` of ``(x, y)`` pairs. Data in memory (a
    ``TensorDataset`` or a ``Subset`` of one) is sliced as tensors; any other data set is never
    read whole: the Fisher passes and the fine-tune read it batch by batch through
    ``DataLoader`` s (the fine-tune afresh every epoch, in the order the in-memory path draws from
    the same seed), so memory holds one batch at a time and the same samples give the same model
    either way (:func:`deepclean.masking.masked_finetune`). ``num_workers`` does not change the
    result when the data set's randomness (if any) is a function of index and epoch (a data set
    with ``set_epoch`` is told each fine-tune epoch). What is read into memory from a streamed
    set: with ``gamma="auto"``, the labels of D_f and D_r (one pass that keeps only the labels)
    and the D_f slice the candidates are scored on (at most ``auto_eval_size`` samples); the
    held-out set is read whole, and the short fine-tunes stream their subset of D_r. With
    ``train_fisher``, D_f and D_r are read once more to check their sample digests. With
    ``refresh_every`` (the dynamic Fisher) both sets are read into memory.

    After :meth:`unlearn`, ``mask_`` holds the selection and ``info_`` the number and share of
    weights reset (``n_reset``, ``n_weights``, ``share_reset`` as a fraction) and the gamma used
    (``gamma``); with ``gamma="auto"`` also ``auto_gamma``: the candidates tried (gamma, target
    and actual reset share, scores, verdict numbers), the chosen index, the rule and the cost
    counts (JSON values only, see :class:`deepclean.methods.autogamma.AutoGammaResult`).

    Raises (constructor):
        ConfigurationError: ``gamma="auto"`` without ``holdout``; a non-positive gamma or lr;
            ``auto_budget`` outside [0, 0.5]; a holdout that is not a Dataset.
    """

    name = "deepclean"
    summary = "Reset weights with Fisher ratio I_f/I_r > gamma, fine-tune only those on D_r"
    reference = "Shi et al., DeepClean, arXiv 2311.10448 (2023)"
    scenario_threshold = "gamma"
    accepts_train_fisher = True
    harness_args = {"epochs": "unlearn_epochs", "lr": "unlearn_lr", "holdout": "holdout"}
    collaborators = ("train_fisher", "holdout")
    streams = True

    def __init__(
        self,
        *,
        gamma: float | str = 1.1,
        epochs: int = 3,
        lr: float = 1e-3,
        batch_size: int = 128,
        fisher_batch_size: int = 256,
        bn_stats: str = "update",
        train_fisher: TrainFisher | None = None,
        holdout: Dataset | None = None,
        auto_budget: float = 0.4,
        auto_candidates: int = 3,
        auto_eval_size: int = 256,
        refresh_every: int = 0,
        refresh_size: int | None = None,
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
        check_non_negative_int(refresh_every=refresh_every)
        if refresh_size is not None:
            check_positive_int(refresh_size=refresh_size)
        if gamma == "auto":
            if holdout is None:
                raise no_holdout_error()
        elif isinstance(gamma, str):
            raise ConfigurationError(
                f"gamma must be a finite number > 0 or 'auto', got {gamma!r}; e.g. gamma=1.1")
        else:
            check_positive(gamma=gamma)
        check_positive(lr=lr)
        if holdout is not None and not (hasattr(holdout, "__len__")
                                        and hasattr(holdout, "__getitem__")):
            raise ConfigurationError(
                f"holdout must be a torch Dataset of (x, y) pairs or None, got "
                f"{type(holdout).__name__}; wrap tensors as TensorDataset(x, y)")
        if not (isinstance(auto_budget, (int, float)) and not isinstance(auto_budget, bool)
                and 0 <= auto_budget <= 0.5):
            raise ConfigurationError(
                f"auto_budget must be a number in [0, 0.5] (a share of the fine-tune's steps), "
                f"got {auto_budget!r}")
        check_positive_int(auto_candidates=auto_candidates, auto_eval_size=auto_eval_size)
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
        self.holdout = holdout
        self.auto_budget = auto_budget
        self.auto_candidates = auto_candidates
        self.auto_eval_size = auto_eval_size
        self.refresh_every = refresh_every
        self.refresh_size = refresh_size
        self.mask_: dict[str, torch.Tensor] | None = None

    def unlearn(self, model: nn.Module, forget: Dataset, retain: Dataset) -> nn.Module:
        """As :meth:`Unlearner.unlearn`; with ``gamma="auto"`` the held-out set is first checked
        not to be D_f or D_r, nor to share samples with them (``DataError``)."""
        if self.gamma == "auto" and self.holdout is not None:
            check_holdout_disjoint(self.holdout, forget, retain)
        return super().unlearn(model, forget, retain)

    def _loader_options(self) -> dict:
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory,
                "persistent_workers": self.persistent_workers}

    def fisher_pair(
        self, model: nn.Module, xf: torch.Tensor, yf: torch.Tensor, xr: torch.Tensor,
        yr: torch.Tensor, device: torch.device,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The Fisher diagonals on D_f and D_r (step 1); with ``train_fisher``, I_Dr follows from
        the precomputed I_D and I_Df without a pass over D_r."""
        return self.fisher_pair_data(model, TensorDataset(xf, yf), TensorDataset(xr, yr), device)

    def fisher_pair_data(
        self, model: nn.Module, forget: Dataset, retain: Dataset, device: torch.device,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """:meth:`fisher_pair` on data sets (streamed through ``DataLoader`` s unless in memory)."""
        memory = in_memory(forget) and in_memory(retain)
        if self.train_fisher is not None:  # before any work
            if memory:
                self.train_fisher.check(model, *as_tensors(forget), *as_tensors(retain))
            else:
                self.train_fisher.check_data(model, forget, retain,
                                             batch_size=self.fisher_batch_size,
                                             num_workers=self.num_workers)
        fisher_f = fisher_diagonal(model, forget, batch_size=self.fisher_batch_size,
                                   device=device, num_workers=self.num_workers)
        if self.train_fisher is not None:
            fisher_r = self.train_fisher.retain_fisher_from(fisher_f, n_forget=len(forget),
                                                            n_retain=len(retain))
            self.info_["fisher_mode"] = "precomputed"
        else:
            fisher_r = fisher_diagonal(model, retain, batch_size=self.fisher_batch_size,
                                       device=device, num_workers=self.num_workers)
            self.info_["fisher_mode"] = "two_passes"
        return fisher_f, fisher_r

    def _unlearn(self, model, xf, yf, xr, yr, device):
        return self._unlearn_data(model, TensorDataset(xf, yf), TensorDataset(xr, yr), device)

    def _unlearn_data(self, model, forget, retain, device):
        if self.refresh_every and self.epochs and not (in_memory(forget) and in_memory(retain)):
            forget, retain = _read_whole(forget, "forget set D_f"), _read_whole(retain,
                                                                                 "retain set D_r")
        fisher_f, fisher_r = self.fisher_pair_data(model, forget, retain, device)
        gamma = None
        if self.gamma == "auto":
            result = auto_gamma_data(
                model, fisher_f, fisher_r, forget, retain, holdout=self.holdout,
                epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                bn_stats=self.bn_stats, seed=self.seed, device=device, budget=self.auto_budget,
                max_candidates=self.auto_candidates, eval_size=self.auto_eval_size,
                loader_options=self._loader_options())
            gamma = result.gamma
            self.info_["auto_gamma"] = result.to_info()
            self.info_["holdout_size"] = len(self.holdout)
        return self._select_and_finetune(model, fisher_f, fisher_r, forget, retain, device,
                                         gamma=gamma)

    def apply_selection(
        self,
        model: nn.Module,
        fisher_forget: dict[str, torch.Tensor],
        fisher_retain: dict[str, torch.Tensor],
        xr: torch.Tensor,
        yr: torch.Tensor,
        device: torch.device,
        *,
        gamma: float | None = None,
        xf: torch.Tensor | None = None,
        yf: torch.Tensor | None = None,
    ) -> nn.Module:
        """Steps (2)-(4) on ``model`` in place, from precomputed Fisher diagonals (used by the
        gamma sweep, which computes the two diagonals once) at ``gamma`` (default: the method's
        numeric ``gamma``). With ``refresh_every`` the fine-tune is dynamic and needs D_f
        (``xf``, ``yf``).

        Raises:
            ConfigurationError: no numeric gamma (``gamma="auto"`` and none passed), or
                ``refresh_every`` without ``xf``/``yf``.
        """
        forget = None if xf is None or yf is None else TensorDataset(xf, yf)
        return self._select_and_finetune(model, fisher_forget, fisher_retain, forget,
                                         TensorDataset(xr, yr), device, gamma=gamma)

    def _select_and_finetune(
        self, model: nn.Module, fisher_forget: dict[str, torch.Tensor],
        fisher_retain: dict[str, torch.Tensor], forget: Dataset | None, retain: Dataset,
        device: torch.device, *, gamma: float | None = None,
    ) -> nn.Module:
        gamma = self.gamma if gamma is None else gamma
        if gamma == "auto":
            raise ConfigurationError(
                "apply_selection needs a numeric gamma; with gamma='auto' call unlearn(), which "
                "chooses it, or pass gamma=<number>")
        mask = select_weights(fisher_forget, fisher_retain, gamma)
        reset_weights(model, mask)
        self.mask_ = mask
        selected, total = mask_summary(mask)
        self.info_.update(n_reset=selected, n_weights=total, share_reset=selected / total,
                          gamma=float(gamma))
        if self.refresh_every and self.epochs:
            if forget is None:
                raise ConfigurationError(
                    "refresh_every needs D_f for the recomputed Fisher; pass xf and yf to "
                    "apply_selection, or use unlearn()")
            xf, yf = as_tensors(forget)
            xr, yr = as_tensors(retain)
            out, mask, refreshes = dynamic_masked_finetune(
                model, mask, xf, yf, xr, yr, gamma=float(gamma), refresh_every=self.refresh_every,
                epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                generator=self.generator(), device=device, bn_stats=self.bn_stats,
                fisher_batch_size=self.fisher_batch_size, refresh_size=self.refresh_size)
            self.mask_ = mask
            final, _ = mask_summary(mask)
            self.info_.update(n_reset_initial=selected, n_reset=final,
                              share_reset=final / total, refreshes=refreshes)
            return out
        return masked_finetune(
            model, mask, retain, None, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
            generator=self.generator(), device=device, bn_stats=self.bn_stats,
            desc=f"{self.name} fine-tune", progress=self.progress, **self._loader_options(),
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

    Same selection as :class:`DeepClean` (``gamma``, ``fisher_batch_size``, ``train_fisher``;
    ``gamma="auto"`` with ``holdout`` scores the reset models without fine-tunes, so its search
    costs only forward passes); the timed step is the Fisher passes and the reset. Streams D_f
    and D_r as :class:`DeepClean` does (``num_workers``, ``pin_memory``, ``persistent_workers``).
    """

    name = "zero_weights"
    summary = "DeepClean's Fisher-ratio reset of W_f to zero, without the fine-tune (ablation)"
    reference = "Shi et al., DeepClean, arXiv 2311.10448 (2023), Table 4"
    scenario_threshold = "gamma"
    accepts_train_fisher = True
    harness_args = {"holdout": "holdout"}
    collaborators = ("train_fisher", "holdout")

    def __init__(
        self,
        *,
        gamma: float | str = 1.1,
        fisher_batch_size: int = 256,
        train_fisher: TrainFisher | None = None,
        holdout: Dataset | None = None,
        auto_candidates: int = 3,
        auto_eval_size: int = 256,
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ) -> None:
        super().__init__(gamma=gamma, epochs=0, fisher_batch_size=fisher_batch_size,
                         train_fisher=train_fisher, holdout=holdout,
                         auto_candidates=auto_candidates, auto_eval_size=auto_eval_size,
                         seed=seed, device=device, progress=progress, num_workers=num_workers,
                         pin_memory=pin_memory, persistent_workers=persistent_workers)

    @classmethod
    def search_space(cls, context: SpaceContext) -> dict[str, Param]:
        """gamma only, over DeepClean's range (no fine-tune)."""
        return {"gamma": DeepClean.search_space(context)["gamma"]}


def _read_whole(ds: Dataset, label: str) -> TensorDataset:
    """A data set read into memory, every sample checked (the dynamic Fisher needs tensors)."""
    x, y = as_tensors(ds)
    check_inputs(x, y, label)
    return TensorDataset(x, y)
