"""The fast Fisher diagonal against the float64 single-sample reference, and its contract."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import deepclean.fisher.rules as fisher_module
from deepclean import ConfigurationError, DataError, fisher_diagonal, fisher_diagonal_reference
from deepclean.data.models import build_model

RTOL = 1e-5


def _max_rel_err(got: dict, ref: dict) -> float:
    assert set(got) == set(ref)
    worst = 0.0
    for name, r in ref.items():
        g = got[name].to(torch.float64)
        assert g.shape == r.shape, name
        scale = r.abs().max().item()
        err = (g - r).abs().max().item()
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


def _randomise_bn(model: nn.Module, generator: torch.Generator) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=generator) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
            if m.weight is not None:
                with torch.no_grad():
                    m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=generator) - 0.5)
    return model


class Shared(nn.Module):
    """One Linear called twice: its parameters are used by two module calls."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 5)
        self.shared = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(torch.relu(self.conv(x)))).flatten(1))


class Seq3d(nn.Module):
    """Linear on (B, T, in) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).mean(1)


def _conv_model(conv: nn.Conv2d, hw: int) -> nn.Module:
    m = nn.Sequential(conv, nn.ReLU(), nn.Flatten())
    with torch.no_grad():
        width = m(torch.zeros(1, conv.in_channels, hw, hw)).shape[1]
    return nn.Sequential(m, nn.Linear(width, 3))


def _image(c: int, hw: int) -> tuple[int, ...]:
    return (c, hw, hw)


CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), (5,)),
    "linear_3d_input": (Seq3d, (4, 4)),
    "batchnorm1d_eval": (
        lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)),
        (5,),
    ),
    "batchnorm2d_inplace_relu": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
            nn.Flatten(), nn.Linear(4 * 25, 3),
        ),
        _image(2, 5),
    ),
    "batchnorm_first_inplace": (
        lambda: nn.Sequential(
            nn.BatchNorm2d(2), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(2 * 16, 3)
        ),
        _image(2, 4),
    ),
    "shared_linear": (Shared, (6,)),
    "shared_conv": (SharedConv, _image(2, 4)),
    "layernorm_generic": (
        lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3)),
        (5,),
    ),
}
for _name, _conv, _hw in [
    ("conv_large_map", lambda: nn.Conv2d(3, 4, 3, padding=1), 12),  # grouped path
    ("conv_mid_map", lambda: nn.Conv2d(3, 4, 3, padding=1), 5),  # unfold + bmm path
    ("conv_small_map", lambda: nn.Conv2d(3, 4, 3, padding=1), 2),  # position-pair path
    ("conv_groups", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), 6),
    ("conv_groups_large", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), 12),
    ("conv_groups_small", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), 2),
    ("conv_stride_dilation", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2), 9),
    ("conv_stride_large", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), 24),
    ("conv_no_bias", lambda: nn.Conv2d(3, 4, 3, bias=False), 7),
    ("conv_1x1_stride", lambda: nn.Conv2d(3, 4, 1, stride=2, bias=False), 8),
    ("conv_reflect", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), 6),
    ("conv_reflect_large", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), 12),
    ("conv_circular", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), 2),
    ("conv_replicate", lambda: nn.Conv2d(3, 4, (3, 2), padding=(1, 2), padding_mode="replicate"), 5),
    ("conv_same", lambda: nn.Conv2d(3, 4, 3, padding="same", dilation=2), 6),
    ("conv_valid_rect", lambda: nn.Conv2d(3, 4, (2, 3), padding="valid"), 13),
]:
    CASES[_name] = (
        lambda _conv=_conv, _hw=_hw: _conv_model(_conv(), _hw),
        _image(_conv().in_channels, _hw),
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_reference(case: str) -> None:
    build, shape = CASES[case]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    model = _randomise_bn(build(), gen)
    x = torch.randn((11, *shape), generator=gen)
    y = torch.randint(0, 3, (11,), generator=gen)
    data = TensorDataset(x, y)
    ref = fisher_diagonal_reference(model, data)
    fisher_module._WARNED.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fisher_diagonal(model, data, batch_size=4, dtype=torch.float64)
        again = fisher_diagonal(model, data, batch_size=4, dtype=torch.float64)
    assert _max_rel_err(got, ref) <= RTOL
    assert _max_rel_err(again, ref) <= RTOL
    generic = [w for w in caught if "no closed form" in str(w.message)]
    if case == "layernorm_generic":
        assert len(generic) == 1 and "LayerNorm" in str(generic[0].message)
    else:
        assert generic == []
    for v in got.values():
        assert v.dtype == torch.float64 and bool((v >= 0).all())


CONV_CASES = sorted(c for c in CASES if "conv" in c)


@pytest.mark.parametrize("path", ["grouped", "pairs", "per_sample"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_every_conv_contraction_matches_float64_reference(
    case: str, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each of the three Conv2d contractions, forced for every conv case (the shape rule alone
    would send these small layers to one of them), agrees with the single-sample loop."""
    monkeypatch.setattr(fisher_module, "_conv_path", lambda length, numel: path)
    build, shape = CASES[case]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(1)
    model = build()
    x = torch.randn((11, *shape), generator=gen)
    y = torch.randint(0, 3, (11,), generator=gen)
    data = TensorDataset(x, y)
    got = fisher_diagonal(model, data, batch_size=4, dtype=torch.float64)
    assert _max_rel_err(got, fisher_diagonal_reference(model, data)) <= RTOL


@pytest.mark.parametrize(
    ("length", "numel", "path"),
    [(128, 10**7, "grouped"), (49, 262_144, "grouped"), (4, 2_359_296, "pairs"),
     (16, 2_359_296, "per_sample"), (49, 589_824, "per_sample"), (1, 262_145, "pairs")],
)
def test_conv_path_rule(length: int, numel: int, path: str) -> None:
    assert fisher_module._conv_path(length, numel) == path


@pytest.mark.parametrize(
    ("name", "in_channels", "hw", "width"),
    [
        ("small_cnn", 1, 28, 0.25),
        ("resnet18", 3, 32, 0.0625),
        ("resnet18", 1, 28, 0.0625),
        ("vgg16_bn", 3, 32, 0.0625),
    ],
)
def test_library_models_match_reference(name: str, in_channels: int, hw: int, width: float) -> None:
    gen = torch.Generator().manual_seed(0)
    model = _randomise_bn(
        build_model(name, in_channels=in_channels, num_classes=10, width=width, seed=0), gen
    )
    x = torch.randn((6, in_channels, hw, hw), generator=gen)
    y = torch.randint(0, 10, (6,), generator=gen)
    data = TensorDataset(x, y)
    ref = fisher_diagonal_reference(model, data)
    got = fisher_diagonal(model, data, batch_size=4, dtype=torch.float64)
    assert _max_rel_err(got, ref) <= RTOL


@pytest.mark.parametrize("batch_size", [1, 2])
def test_exact_small_example(batch_size: int) -> None:
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    data = TensorDataset(torch.tensor([[1.0], [1.0]]), torch.tensor([0, 1]))
    got = fisher_diagonal(model, data, batch_size=batch_size)
    # log p(y|x) with equal logits: gradient +-1/2 per weight, squared 1/4, for both samples.
    assert torch.equal(got["weight"], torch.tensor([[0.25], [0.25]]))


def test_train_mode_model_is_left_untouched() -> None:
    torch.manual_seed(0)
    model = build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=0)
    model.train()
    model.features[2].eval()  # one submodule in its own mode
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorDataset(torch.randn(10, 1, 28, 28), torch.randint(0, 10, (10,)))
    fisher_diagonal(model, data, batch_size=4)
    assert model.training
    assert {name: m.training for name, m in model.named_modules()} == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # parameters and BatchNorm buffers bitwise
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_independent_of_batch_size(dtype: torch.dtype, rtol: float) -> None:
    gen = torch.Generator().manual_seed(3)
    model = _randomise_bn(build_model("resnet18", in_channels=1, num_classes=10, width=0.0625, seed=0), gen)
    data = TensorDataset(torch.randn(12, 1, 28, 28, generator=gen), torch.randint(0, 10, (12,), generator=gen))
    results = [fisher_diagonal(model, data, batch_size=b, dtype=dtype) for b in (1, 5, 12)]
    for other in results[1:]:
        for k, v in results[0].items():
            scale = v.abs().max().item()
            assert (other[k] - v).abs().max().item() <= rtol * max(scale, 1e-30) * 10, k


def test_float32_batch_size_relative_error() -> None:
    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    data = TensorDataset(torch.randn(9, 5, generator=gen), torch.randint(0, 3, (9,), generator=gen))
    a = fisher_diagonal(model, data, batch_size=1)
    b = fisher_diagonal(model, data, batch_size=9)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-6, atol=0), k


def test_batchnorm_without_running_stats_raises() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2))
    data = TensorDataset(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ConfigurationError, match="track_running_stats"):
        fisher_diagonal(model, data)


def test_empty_data_raises() -> None:
    data = TensorDataset(torch.empty(0, 3), torch.empty(0, dtype=torch.long))
    with pytest.raises(DataError):
        fisher_diagonal(nn.Linear(3, 2), data)


@pytest.mark.parametrize("label", [-1, 2, 5])
def test_labels_out_of_range_raise(label: int) -> None:
    model = nn.Linear(3, 2)
    data = TensorDataset(torch.randn(3, 3), torch.tensor([0, label, 1]))
    with pytest.raises(DataError, match="labels"):
        fisher_diagonal(model, data)
    assert all(p.grad is None for p in model.parameters())


def test_bad_batch_size_raises() -> None:
    data = TensorDataset(torch.randn(3, 3), torch.tensor([0, 1, 1]))
    with pytest.raises(ConfigurationError):
        fisher_diagonal(nn.Linear(3, 2), data, batch_size=0)


def test_frozen_parameters_are_skipped() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    data = TensorDataset(torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1]))
    got = fisher_diagonal(model, data, batch_size=2, dtype=torch.float64)
    assert "0.weight" not in got
    ref = fisher_diagonal_reference(model, data)
    assert _max_rel_err(got, ref) <= RTOL
    assert model[0].weight.requires_grad is False
