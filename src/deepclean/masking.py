"""Masked fine-tuning: train only the selected weights W_f, leave every other weight bitwise as is.

Paper (Shi et al., arXiv 2311.10448, section 3): after the reset, W_r is frozen and W_f is
fine-tuned on D_r with cross-entropy, no augmentation, Adam and cosine annealing from lr 1e-3.

"Frozen" is exact here:

- a parameter tensor with no selected entry gets ``requires_grad=False`` for the fine-tune, so no
  weight gradient is computed for it at all (cheaper than a plain fine-tune);
- in a partly selected tensor the gradient of unselected entries is zeroed before the step, Adam
  runs without weight decay, and after every step the unselected entries are written back from
  the original, so no momentum, epsilon or rounding can move them.

BatchNorm running statistics: with ``bn_stats="update"`` (default) BatchNorm runs in train mode and
its running statistics are re-estimated on D_r, which the reset makes necessary (zeroed weights
change every later activation's distribution); with ``bn_stats="freeze"`` BatchNorm runs in eval
mode and its buffers stay bitwise unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deepclean.data.datasets import iterate_batches
from deepclean.errors import ConfigurationError
from deepclean.progress import progress_bar
from deepclean.selection import check_mask

__all__ = ["masked_finetune", "BN_STATS"]

BN_STATS = ("update", "freeze")


def masked_finetune(
    model: nn.Module,
    mask: dict[str, torch.Tensor] | None,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    bn_stats: str = "update",
    desc: str = "fine-tune",
    progress: bool = True,
) -> nn.Module:
    """Fine-tune ``model`` in place on ``(x, y)``: Adam, cosine annealing, cross-entropy.

    Args:
        model: the network (already reset where needed).
        mask: ``{name: bool tensor}`` over ``named_parameters()``; True entries are trained, the
            rest stay bitwise equal. ``None`` trains every weight (plain fine-tune).
        x: inputs ``(N, ...)``; y: int64 labels ``(N,)``.
        epochs: passes over the data; 0 returns the model unchanged.
        lr: initial Adam learning rate, annealed to 0 by a cosine over all steps.
        batch_size: samples per step.
        generator: source of the shuffling order.
        device: where to train.
        bn_stats: ``"update"`` or ``"freeze"`` (see the module docstring).

    Returns:
        The same model, in eval mode.

    Raises:
        MaskError: the mask's keys or shapes do not match the model's parameters.
        ConfigurationError: ``bn_stats`` is not one of :data:`BN_STATS`, or ``epochs < 0``.
    """
    if bn_stats not in BN_STATS:
        raise ConfigurationError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
    if epochs < 0:
        raise ConfigurationError(f"epochs must be >= 0, got {epochs}")
    device = torch.device(device)
    model.to(device)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if mask is not None:
        check_mask(model, mask)
    if epochs == 0:
        return model.eval()
    trainable: dict[str, nn.Parameter] = {}
    partial: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    frozen: list[nn.Parameter] = []
    for name, p in params.items():
        m = None if mask is None else mask[name].to(device)
        if m is None or bool(m.all()):
            trainable[name] = p
        elif bool(m.any()):
            trainable[name] = p
            partial[name] = (m, p.detach().clone())
        else:
            frozen.append(p)
    if not trainable:
        return model.eval()
    # Partly selected tensors: a mask in the parameter's dtype for one fused multiply of all
    # their gradients per step, and the original values to write back into unselected entries.
    partial_params = [trainable[name] for name in partial]
    partial_masks = [m.to(trainable[name].dtype) for name, (m, _) in partial.items()]
    try:
        for p in frozen:
            p.requires_grad_(False)
        opt = torch.optim.Adam(list(trainable.values()), lr=lr, weight_decay=0.0)
        steps = epochs * math.ceil(x.shape[0] / batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        model.train()
        if bn_stats == "freeze":
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        bar = progress_bar(total=steps, desc=desc, enabled=progress)
        for _ in range(epochs):
            for _, xb, yb in iterate_batches(
                x, y, batch_size=batch_size, shuffle=True, generator=generator, device=device
            ):
                loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if partial:
                    with torch.no_grad():
                        grads = [p.grad for p in partial_params]
                        if all(g is not None for g in grads):
                            torch._foreach_mul_(grads, partial_masks)
                        else:
                            for g, m in zip(grads, partial_masks, strict=True):
                                if g is not None:
                                    g.mul_(m)
                opt.step()
                if partial:
                    with torch.no_grad():
                        for p, (m, original) in zip(partial_params, partial.values(), strict=True):
                            torch.where(m, p, original, out=p)  # bitwise restore, no copy
                sched.step()
                bar.update(1)
        bar.close()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return model.eval()
