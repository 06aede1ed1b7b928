"""Shared fixtures: tiny synthetic data and models, sized for a 2-core CPU."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from deepclean import build_model


@pytest.fixture
def tiny_data() -> tuple[TensorDataset, TensorDataset]:
    """(D_f, D_r): 40 and 200 samples of 1x8x8 inputs, 10 classes, from a fixed generator."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(240, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (240,), generator=g)
    return TensorDataset(x[:40], y[:40]), TensorDataset(x[40:], y[40:])


def randomise_batchnorm(model: torch.nn.Module, g: torch.Generator, *, affine: bool = True) -> None:
    """Give every BatchNorm2d running statistics (and, with ``affine``, weights) that are not the
    defaults, drawn from ``g``, so that tests see BatchNorm doing something."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                if affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)


@pytest.fixture
def bn_model() -> torch.nn.Module:
    """A small CNN with BatchNorm whose running statistics are not the defaults."""
    model = build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=0)
    randomise_batchnorm(model, torch.Generator().manual_seed(7))
    return model


@pytest.fixture
def masked_case():
    """A function ``(seed=0) -> (model, x, y, mask)``: a small CNN, 24 inputs of 1x28x28 and a
    mask that freezes the first convolution whole and selects about half of every other tensor."""

    def make(seed: int = 0):
        model = build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(24, 1, 28, 28, generator=gen)
        y = torch.randint(0, 10, (24,), generator=gen)
        mask = {}
        for name, p in model.named_parameters():
            if name.startswith("features.0"):
                mask[name] = torch.zeros_like(p, dtype=torch.bool)  # whole tensor frozen
            else:
                mask[name] = torch.rand(p.shape, generator=gen) < 0.5
        return model, x, y, mask

    return make


def _run_ranks(worker: Callable, tmp: Path, world: int = 2, limit_s: float = 240.0) -> list[dict]:
    """Start ``world`` processes ``worker(rank, world, init_file, out_dir)`` (spawned, so each
    imports the worker's module afresh), wait for all of them (failing the test after
    ``limit_s`` seconds, the processes killed), and return each rank's results, which the worker
    saved with ``torch.save`` to ``out_dir/rank{rank}.pt``. The worker initialises its process
    group from the file ``init_file`` (``file://`` init, gloo)."""
    ctx = mp.start_processes(worker, args=(world, str(tmp / "pg"), str(tmp)),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + limit_s
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} ranks did not finish within {limit_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="session")
def run_ranks() -> Callable[..., list[dict]]:
    """The function ``(worker, tmp, world=2, limit_s=240.0) -> [rank 0's results, ...]`` that
    runs a worker in several processes, e.g. ``gloo`` ranks on the CPU (see ``_run_ranks``)."""
    return _run_ranks
