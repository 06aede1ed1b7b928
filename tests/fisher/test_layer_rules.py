"""The registry of per-layer Fisher rules: a user's rule is used and exact; duplicates refused."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepclean import fisher_diagonal
from deepclean.errors import ConfigurationError
from deepclean.fisher import layer_rule, register_layer_rule, registered_layer_types
from deepclean.fisher.diagonal import fisher_diagonal_reference


class Scale(nn.Module):
    """y = x * w, one weight per feature: a layer of a user's own."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.w


def _scale_per_sample(module, x, g):
    return {"w": x * g}  # d(x * w)/dw, per sample: (B, n)


def test_built_in_rules_cover_linear_conv_and_batchnorm():
    types = registered_layer_types()
    assert nn.Linear in types and nn.Conv2d in types and nn.BatchNorm2d in types
    assert layer_rule(nn.Linear(2, 2)) is not None
    assert layer_rule(nn.Conv1d(1, 1, 1)) is None  # generic exact path


def test_a_registered_rule_is_used_and_exact(recwarn):
    calls = []

    def per_sample(module, x, g):
        calls.append(x.shape[0])
        return _scale_per_sample(module, x, g)

    register_layer_rule(Scale, per_sample=per_sample)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), Scale(6), nn.ReLU(), nn.Linear(6, 3)).double()
    data = TensorDataset(torch.randn(11, 4, dtype=torch.float64), torch.randint(0, 3, (11,)))
    fast = fisher_diagonal(model, data, batch_size=4)
    slow = fisher_diagonal_reference(model, data)
    assert calls == [4, 4, 3]  # the rule ran on every batch
    assert not [w for w in recwarn if "no closed form" in str(w.message)]
    for k in slow:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-12, atol=1e-15)
    with pytest.raises(ConfigurationError, match="already has a Fisher layer rule"):
        register_layer_rule(Scale, per_sample=_scale_per_sample)


@pytest.mark.parametrize("bad", [int, "Linear"])
def test_bad_registrations_are_refused(bad):
    with pytest.raises(ConfigurationError):
        register_layer_rule(bad, per_sample=_scale_per_sample)
