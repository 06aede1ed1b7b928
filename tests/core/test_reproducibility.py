"""Reproducibility (issue 6): same seed on the CPU, bitwise-identical splits, Fisher diagonals,
masks and weights; the caller's global random state untouched; the determinism switch; and
DataParallel-wrapped models handled without a "module." mismatch or a partial load."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from deepclean import (
    DeepClean,
    available_methods,
    build_model,
    deterministic,
    fisher_diagonal,
    make_method,
    make_split,
    preserve_global_rng,
    select_weights,
    set_deterministic,
    unwrap_model,
)
from deepclean.reproducibility import CUBLAS_WORKSPACE


def _model(seed=0):
    return build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=seed)


def _pipeline(forget, retain):
    model = _model()
    f_f = fisher_diagonal(model, forget, batch_size=16)
    f_r = fisher_diagonal(model, retain, batch_size=64)
    mask = select_weights(f_f, f_r, 1.1)
    method = DeepClean(epochs=1, batch_size=32, seed=3)
    out = method.unlearn(model, forget, retain)
    return f_f, f_r, mask, method.mask_, out.state_dict()


def _equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_gives_bitwise_identical_splits_fishers_masks_and_weights(tiny_data):
    forget, retain = tiny_data
    labels = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(0))
    for scenario in ("random", "class"):
        a = make_split(scenario, labels, fraction=0.1, classes=(3,), seed=5)
        b = make_split(scenario, labels, fraction=0.1, classes=(3,), seed=5)
        assert torch.equal(a.forget, b.forget) and torch.equal(a.retain, b.retain)
    torch.manual_seed(1)  # the global seed must not matter
    first = _pipeline(forget, retain)
    torch.manual_seed(2)
    second = _pipeline(forget, retain)
    for x, y in zip(first, second, strict=True):
        assert _equal(x, y)
    assert _equal(first[2], first[3])  # DeepClean selects what select_weights selects


def _global_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _same(s, t) -> bool:
    return torch.equal(s[0], t[0]) and np.array_equal(s[1], t[1]) and s[2] == t[2]


@pytest.mark.parametrize("name", ["deepclean", "finetune", "random_label", "neggrad"])
def test_methods_leave_every_global_random_state_alone(name, tiny_data):
    forget, retain = tiny_data
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    before = _global_states()
    make_method(name, seed=0, **({"epochs": 1} if name != "neggrad" else {"epochs": 1})
                ).unlearn(_model(), forget, retain)
    assert _same(before, _global_states())


class DropoutNet(nn.Module):
    """A user's model that draws from torch's global generator (dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Linear(32, 10))

    def forward(self, x):
        return self.body(x)


def test_a_model_with_dropout_is_reproducible_and_leaves_global_state_alone(tiny_data):
    forget, retain = tiny_data
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DropoutNet()
    torch.manual_seed(1)
    before = _global_states()
    a = make_method("finetune", epochs=1, seed=4).unlearn(model, forget, retain)
    assert _same(before, _global_states())
    torch.manual_seed(2)
    b = make_method("finetune", epochs=1, seed=4).unlearn(model, forget, retain)
    assert _equal(a.state_dict(), b.state_dict())


def test_preserve_global_rng_restores_everything():
    before = _global_states()
    with preserve_global_rng():
        torch.rand(3)
        np.random.rand(3)
        random.random()
    assert _same(before, _global_states())


def test_the_determinism_switch_sets_and_restores_the_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.benchmark = True
    try:
        with deterministic():
            assert torch.are_deterministic_algorithms_enabled()
            assert torch.backends.cudnn.deterministic is True
            assert torch.backends.cudnn.benchmark is False
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.benchmark is True
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        previous = set_deterministic(True, warn_only=True)
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert previous["cudnn_benchmark"] is True
        set_deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic is False
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = False
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def test_deepclean_runs_under_deterministic_algorithms(tiny_data):
    forget, retain = tiny_data
    plain = DeepClean(epochs=1, batch_size=32).unlearn(_model(), forget, retain)
    with deterministic():
        strict = DeepClean(epochs=1, batch_size=32).unlearn(_model(), forget, retain)
    assert _equal(plain.state_dict(), strict.state_dict())


# ---------------------------------------------------------------- DataParallel / wrappers


def test_data_parallel_models_give_plain_keys_and_the_same_result(tiny_data):
    forget, retain = tiny_data
    wrapped = nn.DataParallel(_model())
    # DataParallel moves its module to the first GPU when there is one: compare on that device,
    # under deterministic kernels there (on the CPU the kernels already are)
    device = next(wrapped.parameters()).device
    plain = _model().to(device)
    switch = deterministic(warn_only=True) if device.type == "cuda" else contextlib.nullcontext()
    assert unwrap_model(wrapped) is wrapped.module
    with switch:
        f_plain = fisher_diagonal(plain, forget)
        f_wrapped = fisher_diagonal(wrapped, forget)
        assert not any(k.startswith("module.") for k in f_wrapped)
        assert _equal(f_plain, f_wrapped)
        method = DeepClean(epochs=1, batch_size=32)
        out_wrapped = method.unlearn(wrapped, forget, retain)
        mask_wrapped = method.mask_
        out_plain = DeepClean(epochs=1, batch_size=32).unlearn(plain, forget, retain)
    assert not any(k.startswith("module.") for k in mask_wrapped)
    assert not any(k.startswith("module.") for k in out_wrapped.state_dict())
    assert _equal(out_plain.state_dict(), out_wrapped.state_dict())
    # the caller's wrapped model is untouched
    assert _equal({k: v.cpu() for k, v in wrapped.module.state_dict().items()},
                  _model().state_dict())


@pytest.mark.parametrize("name", [m for m in available_methods() if m not in ("retrain", "lcodec")])
def test_every_method_accepts_a_wrapped_model(name, tiny_data):
    forget, retain = tiny_data
    kwargs = {"epochs": 1} if "epochs" in make_method(name).hyperparameters() else {}
    if "max_steps" in make_method(name).hyperparameters():
        kwargs["max_steps"] = 1
    out = make_method(name, **kwargs).unlearn(nn.DataParallel(_model()), forget, retain)
    assert not isinstance(out, nn.DataParallel)
    assert not any(k.startswith("module.") for k in out.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_runs_are_bitwise_identical_under_the_switch(tiny_data):
    forget, retain = tiny_data
    with deterministic(warn_only=True):
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        runs = [DeepClean(epochs=1, batch_size=32, device="cuda").unlearn(_model(), forget, retain)
                for _ in range(2)]
    assert _equal(runs[0].state_dict(), runs[1].state_dict())
