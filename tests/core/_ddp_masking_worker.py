"""The ranks of tests/core/test_masking_distributed.py: masked_finetune under DDP (gloo, CPU)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from _gloo import init_gloo, outcome
from torch import nn
from torch.utils.data import TensorDataset

from deepclean import DeepClean, MaskError, masked_finetune


def build_case(n: int = 37) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict]:
    """A float64 CNN with BatchNorm, ``n`` samples of 1x6x6 with labels in [0, 3), and a mask
    that freezes the first convolution whole and selects about half of every other tensor; all
    drawn from fixed generators."""
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 36, 3),
    ).to(torch.float64)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    mask = {name: (torch.zeros(p.shape, dtype=torch.bool) if name.startswith("0.")
                   else torch.rand(p.shape, generator=g) < 0.5)
            for name, p in model.named_parameters()}
    return model, x, y, mask


def finetune(model, mask, x, y, *, bn_stats: str, batch_size: int = 8, seed: int = 1,
             distributed: bool | None = None) -> nn.Module:
    return masked_finetune(model, mask, x, y, epochs=2, lr=1e-2, batch_size=batch_size,
                           generator=torch.Generator().manual_seed(seed), bn_stats=bn_stats,
                           progress=False, distributed=distributed)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}



def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    init_gloo(rank, world, init_file)
    try:
        torch.set_num_threads(1)
        out = {}
        for name, bn_stats, n, batch_size in [("update", "update", 37, 8),
                                              ("freeze", "freeze", 37, 8),
                                              ("empty_block", "freeze", 9, 4),
                                              ("empty_block_update", "update", 9, 4)]:
            model, x, y, mask = build_case(n)
            finetune(model, mask, x, y, bn_stats=bn_stats, batch_size=batch_size)
            out[name] = _state(model)
            out[name + "_requires_grad"] = all(p.requires_grad for p in model.parameters())
        # No gradient hook of the DDP wrapper is left behind: a backward on this rank alone
        # gives the plain gradient.
        model, x, y, mask = build_case()
        finetune(model, mask, x, y, bn_stats="update")
        reference = copy.deepcopy(model)
        model.zero_grad(set_to_none=True)  # the last step's gradients are still there
        for m in (model, reference):
            nn.functional.cross_entropy(m(x[:5]), y[:5]).backward()
        out["grads_after"] = [torch.equal(p.grad, q.grad) for p, q in
                              zip(model.parameters(), reference.parameters(), strict=True)]
        dist.barrier()
        # Ranks that disagree raise on every rank instead of waiting for each other.
        model, x, y, mask = build_case()
        out["different_seeds"] = outcome(
            lambda: finetune(model, mask, x, y, bn_stats="freeze", seed=rank))
        bad = dict(mask) if rank == 0 else {k: v for k, v in mask.items() if k != "4.bias"}
        out["bad_mask_on_rank_1"] = outcome(
            lambda: finetune(model, bad, x, y, bn_stats="freeze"))
        out["mask_error_class"] = MaskError.__name__
        # DeepClean end to end: the sharded Fisher pair, the selection, the DDP fine-tune.
        model, x, y, _ = build_case(60)
        method = DeepClean(gamma=1.1, epochs=1, batch_size=8, fisher_batch_size=16)
        unlearned = method.unlearn(model, TensorDataset(x[:12], y[:12]),
                                   TensorDataset(x[12:], y[12:]))
        out["deepclean"] = _state(unlearned)
        out["deepclean_mask"] = method.mask_
        torch.save(out, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
