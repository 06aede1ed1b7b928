"""Parametrised layers (weight_norm, spectral_norm): the exact Fisher with respect to the tensors
the optimizer sees, against the float64 single-sample loop; DeepClean runs on them."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils.data import Subset, TensorDataset

from deepclean import DeepClean, fisher_diagonal
from deepclean.fisher.diagonal import fisher_diagonal_reference


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 6 * 6, 5))
    if kind in ("weight_norm", "both"):
        parametrizations.weight_norm(model[4])
    if kind in ("spectral_norm", "both"):
        parametrizations.spectral_norm(model[0])
    return model.eval()


def _data(n=9):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g))


@pytest.mark.filterwarnings("ignore:fisher_diagonal. no closed form")
@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "both"])
def test_parametrised_fisher_matches_the_float64_loop(kind):
    model = _model(kind)
    data = _data()
    fast = fisher_diagonal(model, data, dtype=torch.float64)
    slow = fisher_diagonal_reference(model, data)
    assert set(fast) == set(slow) == {n for n, p in model.named_parameters()}
    assert any("parametrizations.weight.original" in k for k in fast)
    for k in slow:
        assert torch.allclose(fast[k], slow[k], rtol=1e-10, atol=1e-14), k


@pytest.mark.filterwarnings("ignore:fisher_diagonal. no closed form")
def test_deepclean_on_a_weight_normed_model_freezes_the_rest_bitwise():
    model = _model("weight_norm")
    data = TensorDataset(torch.randn(60, 1, 8, 8), torch.randint(0, 5, (60,)))
    dc = DeepClean(epochs=1, gamma=1.2, bn_stats="freeze")
    out = dc.unlearn(model, Subset(data, range(10)), Subset(data, range(10, 60)))
    before = dict(model.named_parameters())
    for name, p in out.named_parameters():
        frozen = ~dc.mask_[name]
        assert torch.equal(p.detach()[frozen], before[name].detach()[frozen]), name
    assert dc.info_["n_reset"] > 0
