"""Shared fixtures: tiny synthetic data and models, sized for a 2-core CPU."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from deepclean import build_model


@pytest.fixture
def tiny_data() -> tuple[TensorDataset, TensorDataset]:
    """(D_f, D_r): 40 and 200 samples of 1x8x8 inputs, 10 classes, from a fixed generator."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(240, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (240,), generator=g)
    return TensorDataset(x[:40], y[:40]), TensorDataset(x[40:], y[40:])


@pytest.fixture
def bn_model() -> torch.nn.Module:
    """A small CNN with BatchNorm whose running statistics are not the defaults."""
    model = build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model
