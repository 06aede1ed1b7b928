"""Dynamic Fisher (paper limitation 3): recompute the ratio during the fine-tune, grow W_f.

The paper computes the Fisher pair once, before the reset (Shi et al., arXiv 2311.10448,
section 6: "the Fisher information is computed once and never recomputed"). As the reset weights
are re-trained on D_r, the weights that carry D_f can shift. :func:`dynamic_masked_finetune` runs
DeepClean's fine-tune (Adam without weight decay, cosine annealing from ``lr`` over all steps,
cross-entropy on D_r) and every ``refresh_every`` steps recomputes ``I_Df`` and ``I_Dr`` on the
current model (:func:`deepclean.fisher_diagonal`; D_r optionally subsampled to ``refresh_size``)
and **grows** the selection: ``W_f <- W_f | {r > gamma}``. Newly selected weights are set to 0
and trained from then on; the selection never shrinks; every weight outside the final W_f is
bitwise equal to its value before the fine-tune (its gradient is zeroed before each step and its
value written back after each step; Adam's moments of a never-selected entry are exactly 0, so a
newly selected entry starts with no stale state, while Adam's step count, shared per tensor, is
the tensor's).

Cost: each refresh is one Fisher pass over D_f and one over D_r (or ``refresh_size`` samples of
it), about 1.7 times a forward-backward pass each (GUIDE.md section 6); fully frozen tensors still
get gradients here (they are zeroed), unlike the static fine-tune, which skips them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepclean.data.datasets import iterate_batches
from deepclean.errors import ConfigurationError
from deepclean.fisher.diagonal import fisher_diagonal
from deepclean.masking import check_finetune_settings
from deepclean.selection import check_mask, mask_summary, select_weights

__all__ = ["dynamic_masked_finetune"]


def dynamic_masked_finetune(
    model: nn.Module,
    mask: dict[str, torch.Tensor],
    xf: torch.Tensor, yf: torch.Tensor, xr: torch.Tensor, yr: torch.Tensor,
    *,
    gamma: float,
    refresh_every: int,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    bn_stats: str = "update",
    fisher_batch_size: int = 256,
    refresh_size: int | None = None,
) -> tuple[nn.Module, dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Fine-tune the selected weights of ``model`` on D_r, growing the selection every
    ``refresh_every`` steps from a recomputed Fisher ratio.

    Args:
        model: the network, already reset at ``mask``; modified in place.
        mask: ``{name: bool tensor}``, the initial W_f (True = trained).
        xf, yf: D_f inputs ``(N_f, ...)`` and int64 labels ``(N_f,)`` (only for the Fisher).
        xr, yr: D_r inputs ``(N_r, ...)`` and labels ``(N_r,)``.
        gamma: the selection threshold (> 0).
        refresh_every: steps between refreshes (>= 1); no refresh after the last step.
        epochs, lr, batch_size, generator, device, bn_stats: as :func:`deepclean.masked_finetune`.
        fisher_batch_size: batch size of the Fisher passes (does not change the result).
        refresh_size: D_r samples per refresh (drawn from ``generator``); None: all of D_r.

    Returns:
        ``(model in eval mode, final mask, refreshes)``; ``refreshes`` lists per refresh the
        ``step``, ``added`` (weights newly selected) and ``share_reset`` (fraction, after it).

    Raises:
        ConfigurationError: ``refresh_every`` < 1, ``refresh_size`` < 1, ``epochs`` < 0, bad
            ``bn_stats``.
        MaskError: the mask does not match the model.
    """
    if not isinstance(refresh_every, int) or isinstance(refresh_every, bool) or refresh_every < 1:
        raise ConfigurationError(f"refresh_every must be an int >= 1, got {refresh_every!r}")
    if refresh_size is not None and (not isinstance(refresh_size, int) or refresh_size < 1):
        raise ConfigurationError(f"refresh_size must be an int >= 1 or None, got {refresh_size!r}")
    check_finetune_settings(bn_stats=bn_stats, epochs=epochs)
    device = torch.device(device)
    model.to(device)
    check_mask(model, mask)
    mask = {k: v.clone().to(device) for k, v in mask.items()}
    refreshes: list[dict[str, Any]] = []
    if epochs == 0:
        return model.eval(), {k: v.cpu() for k, v in mask.items()}, refreshes
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    plist = [params[n] for n in names]
    originals = [p.detach().clone() for p in plist]
    opt = torch.optim.Adam(plist, lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(xr.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    def train_mode() -> None:
        model.train()
        if bn_stats == "freeze":
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    train_mode()
    done = 0
    for _ in range(epochs):
        for _, xb, yb in iterate_batches(xr, yr, batch_size=batch_size, shuffle=True,
                                         generator=generator, device=device):
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for n, p in zip(names, plist, strict=True):
                    if p.grad is not None:
                        p.grad.mul_(mask[n].to(p.grad.dtype))
            opt.step()
            with torch.no_grad():
                for n, p, orig in zip(names, plist, originals, strict=True):
                    torch.where(mask[n], p, orig, out=p)  # bitwise restore of W_r
            sched.step()
            done += 1
            if done % refresh_every == 0 and done < steps:
                sub = None
                if refresh_size is not None and refresh_size < xr.shape[0]:
                    sub = torch.randperm(xr.shape[0], generator=generator)[:refresh_size]
                xs, ys = (xr, yr) if sub is None else (xr[sub], yr[sub])
                ff = fisher_diagonal(model, TensorDataset(xf, yf), batch_size=fisher_batch_size,
                                     device=device)
                fr = fisher_diagonal(model, TensorDataset(xs, ys), batch_size=fisher_batch_size,
                                     device=device)
                new = select_weights(ff, fr, gamma)
                added = 0
                with torch.no_grad():
                    for n, p in zip(names, plist, strict=True):
                        fresh = new[n].to(device) & ~mask[n]
                        if bool(fresh.any()):
                            added += int(fresh.sum())
                            p.masked_fill_(fresh, 0.0)
                            mask[n] = mask[n] | fresh
                            state = opt.state.get(p, {})
                            for key in ("exp_avg", "exp_avg_sq"):
                                if key in state:
                                    state[key].masked_fill_(fresh, 0.0)
                selected, total = mask_summary(mask)
                refreshes.append({"step": done, "added": added, "share_reset": selected / total})
                train_mode()
    return model.eval(), {k: v.cpu() for k, v in mask.items()}, refreshes
