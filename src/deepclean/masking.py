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

Data: tensors ``(x, y)``, or a ``Dataset``. Data in memory (a ``TensorDataset`` or a ``Subset`` of
one) is sliced directly; any other ``Dataset`` is read through a ``DataLoader`` in every epoch
(:class:`deepclean.data.datasets.ShuffledBatches`), one batch in memory at a time, in the same
shuffled order as the in-memory path draws from the same generator.

Under ``torch.distributed`` (several processes, e.g. launched with ``torchrun``) the fine-tune
runs as DistributedDataParallel: each step's batch is split over the ranks (see
:func:`masked_finetune`), DDP averages the gradients, and every rank ends with the same weights.
"""

from __future__ import annotations

import hashlib
import math
import struct

import torch
from torch import nn
from torch.utils.data import Dataset

from deepclean.data.datasets import (
    ShuffledBatches,
    check_loader_options,
    dataset_size,
    iterate_batches,
    iterate_rank_blocks,
    tensors_or_dataset,
)
from deepclean.distributed import (
    all_gather_ints,
    average_running_stats,
    error_code,
    is_main_process,
    raise_if_any_rank_failed,
    use_distributed,
    world_size,
    wrap_ddp,
)
from deepclean.errors import ConfigurationError, DataError
from deepclean.progress import progress_bar
from deepclean.selection import check_mask
from deepclean.validation import check_inputs, check_labels_fit

__all__ = ["masked_finetune", "check_finetune_settings", "BN_STATS"]

BN_STATS = ("update", "freeze")

def check_finetune_settings(*, bn_stats: str, epochs: int) -> None:
    """Raise ``ConfigurationError`` unless ``bn_stats`` is one of :data:`BN_STATS` and
    ``epochs >= 0`` (the masked fine-tune's settings, static or dynamic)."""
    if bn_stats not in BN_STATS:
        raise ConfigurationError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
    if epochs < 0:
        raise ConfigurationError(f"epochs must be >= 0, got {epochs}")


def masked_finetune(
    model: nn.Module,
    mask: dict[str, torch.Tensor] | None,
    x: torch.Tensor | Dataset,
    y: torch.Tensor | None = None,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    bn_stats: str = "update",
    desc: str = "fine-tune",
    progress: bool = True,
    distributed: bool | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> nn.Module:
    """Fine-tune ``model`` in place on ``(x, y)``: Adam, cosine annealing, cross-entropy.

    Args:
        model: the network (already reset where needed).
        mask: ``{name: bool tensor}`` over ``named_parameters()``; True entries are trained, the
            rest stay bitwise equal. ``None`` trains every weight (plain fine-tune).
        x: inputs ``(N, ...)``; y: int64 labels ``(N,)``. Or ``x`` a ``Dataset`` of ``(x, y)``
            pairs and ``y=None``: one in memory is sliced as tensors; any other is read through
            a ``DataLoader`` afresh in every epoch (each epoch's order drawn from ``generator``
            as for tensors; a data set with ``set_epoch`` is told the epoch first), so memory
            holds one batch at a time and per-sample transforms run again each epoch; every
            batch is checked (finite inputs, labels in range) as it arrives.
        epochs: passes over the data; 0 returns the model unchanged.
        lr: initial Adam learning rate, annealed to 0 by a cosine over all steps.
        batch_size: samples per step.
        generator: source of the shuffling order.
        device: where to train.
        bn_stats: ``"update"`` or ``"freeze"`` (see the module docstring).
        distributed: run as DistributedDataParallel over the ranks of the initialised
            ``torch.distributed`` process group. ``None`` (default): when one is initialised with
            more than one rank; ``True``: always (requires an initialised group); ``False``:
            never, every rank fine-tunes alone on all of ``(x, y)``. A data set read through a
            ``DataLoader`` is not split over ranks: pass it as tensors or ``distributed=False``.
        num_workers: ``DataLoader`` worker processes for a data set that is not in memory
            (0: read in the main process). The result does not depend on it when the data
            set's randomness is a function of index and epoch
            (:class:`deepclean.data.datasets.ShuffledBatches`).
        pin_memory: page-locked batches before the copy to a CUDA device (ignored elsewhere).
        persistent_workers: keep the ``DataLoader`` workers alive between epochs.

    Under a process group every rank passes the same model, mask, ``(x, y)``, hyperparameters and
    a generator in the same state (checked before any work: otherwise ``ConfigurationError`` on
    every rank). Every epoch all ranks draw the same permutation from ``generator``; each step's
    batch of ``batch_size`` samples is split into contiguous blocks, one per rank
    (:func:`deepclean.distributed.shard_indices`), so over an epoch the ranks see disjoint shards
    of the data. Each rank's loss is the sum over its block divided by the whole batch's size
    (times the number of ranks, which DDP's gradient average divides out), so the gradient of
    every step is that of the mean loss over the whole batch and the number of steps, the
    learning-rate schedule and the result are those of one process (up to rounding, when
    BatchNorm runs in eval mode). With ``bn_stats="update"`` BatchNorm normalises each block
    with its own batch statistics (as DistributedDataParallel does without SyncBatchNorm) and
    the running statistics are averaged over the ranks at the end. Unselected weights stay
    bitwise equal on every rank; all ranks end with identical weights and buffers.

    Returns:
        The same model (never a DDP wrapper), in eval mode.

    Raises:
        MaskError: the mask's keys or shapes do not match the model's parameters.
        DataError: a data set that is empty or whose items are not ``(x, y)`` pairs with
            finite inputs and integer labels the model can output.
        ConfigurationError: ``bn_stats`` is not one of :data:`BN_STATS`, or ``epochs < 0``;
            tensors without labels or a data set with labels; invalid loader options;
            ``distributed`` is not a bool or None, or True without a process group; under a
            process group, ranks whose data, hyperparameters, masks or generators differ.
    """
    sharded = use_distributed(distributed)
    error = None
    data: Dataset | None = None
    n = 0
    try:
        check_loader_options(num_workers=num_workers, pin_memory=pin_memory,
                             persistent_workers=persistent_workers)
        x, y, data = tensors_or_dataset(x, y)
        if data is not None:
            if sharded:
                raise ConfigurationError(
                    f"under torch.distributed the fine-tune splits tensors over the ranks, but "
                    f"a {type(data).__name__} read through a DataLoader arrived; pass tensors "
                    "(or a TensorDataset), or distributed=False")
        if data is None:
            n = int(x.shape[0])
        else:
            n = dataset_size(data, "the fine-tune's data")
            if n == 0:
                raise DataError("the fine-tune's data set is empty; expected at least one sample")
        check_finetune_settings(bn_stats=bn_stats, epochs=epochs)
        device = torch.device(device)
        model.to(device)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if mask is not None:
            check_mask(model, mask)
    except Exception as exc:
        if not sharded:
            raise
        error = exc  # every rank must learn of it before the first collective of the others
    if sharded:
        _check_same_on_every_rank(error, mask, n, epochs, batch_size, lr, generator)
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
        steps = epochs * math.ceil(n / batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        model.train()
        if bn_stats == "freeze":
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        net = model
        if sharded:
            net = wrap_ddp(model, device)
            batches = _rank_batches
        elif data is not None:
            loader = ShuffledBatches(data, batch_size=batch_size, generator=generator,
                                     num_workers=num_workers,
                                     pin_memory=pin_memory and device.type == "cuda",
                                     persistent_workers=persistent_workers)
            batches = _loader_batches(loader)
        else:
            batches = _batches
        bar = progress_bar(total=steps, desc=desc, enabled=progress and is_main_process())
        for _ in range(epochs):
            for xb, yb, loss_scale, y_cpu in batches(x, y, batch_size, generator, device):
                logits = net(xb)
                if y_cpu is not None:
                    check_labels_fit(y_cpu, logits.shape[1], "fine-tune data")
                if loss_scale is None:
                    loss = nn.functional.cross_entropy(logits, yb)
                else:
                    loss = nn.functional.cross_entropy(logits, yb, reduction="sum") * loss_scale
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
        if sharded and bn_stats == "update":
            average_running_stats(model)
    finally:
        net = None  # the DDP wrapper and its gradient hooks go with it
        for p in frozen:
            p.requires_grad_(True)
    return model.eval()


def _batches(x, y, batch_size, generator, device):
    """One process: the batches of :func:`iterate_batches`, loss the mean over the batch."""
    for _, xb, yb in iterate_batches(
        x, y, batch_size=batch_size, shuffle=True, generator=generator, device=device
    ):
        yield xb, yb, None, None


def _loader_batches(loader: ShuffledBatches):
    """A data set read through a ``DataLoader``: each batch checked on the CPU as it arrives
    (the in-memory path's inputs were checked as a whole before), then moved to the device."""

    def batches(x, y, batch_size, generator, device):
        for xb, yb in loader.epoch():
            check_inputs(xb, yb, "fine-tune data")
            yield (xb.to(device, non_blocking=True), yb.to(device, non_blocking=True), None, yb)

    return batches


def _rank_batches(x, y, batch_size, generator, device):
    """Under a process group: the same permutation and batches as :func:`iterate_batches` on
    every rank, of which this rank takes its contiguous block of each batch (possibly empty); the
    loss scale makes DDP's average of the ranks' gradients the gradient of the batch mean."""
    world = world_size()
    for xb, yb, size in iterate_rank_blocks(x, y, batch_size=batch_size, generator=generator,
                                            device=device):
        yield xb, yb, world / size, None


def _check_same_on_every_rank(error, mask, n, epochs, batch_size, lr, generator) -> None:
    """A collective: raise on every rank if any rank failed its checks, or if the ranks'
    inputs differ (they would silently train on different samples or hang in DDP)."""
    try:
        state = generator.get_state() if isinstance(generator, torch.Generator) else None
        rng = -1 if state is None else \
            int.from_bytes(hashlib.sha256(state.numpy().tobytes()).digest()[:7], "little")
        selected = -1 if mask is None else sum(int(m.sum()) for m in mask.values())
        lr_bits = int.from_bytes(struct.pack("<d", float(lr)), "little") >> 8
        values = [int(n), int(epochs), int(batch_size), lr_bits, selected, rng]
    except Exception as exc:  # unusable arguments: a failure like any other
        error = error or exc
        values = [-1] * 6
    row = [error_code(error), *values]
    table = all_gather_ints(row)
    raise_if_any_rank_failed(table[:, 0].tolist(), error, what="masked_finetune")
    names = ["samples", "epochs", "batch_size", "lr", "selected weights", "generator state"]
    differ = [name for i, name in enumerate(names) if len(set(table[:, i + 1].tolist())) > 1]
    if differ:
        raise ConfigurationError(
            f"under torch.distributed every rank must fine-tune the same data with the same "
            f"settings, mask and generator state; the ranks differ in {', '.join(differ)} "
            f"(per rank: {table[:, 1:].tolist()}). Pass the same whole data set and a generator "
            "seeded alike on every rank (masked_finetune splits the batches itself), or "
            "distributed=False"
        )
