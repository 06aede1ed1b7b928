"""SSD: the hard bound of per-sample importance is refused; the authors' batch-mean importance."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepclean import build_model
from deepclean.errors import ConfigurationError
from deepclean.fisher.diagonal import fisher_diagonal
from deepclean.methods import make_method
from deepclean.methods.ssd import batch_mean_importance


def _sets(n_f=10, n_r=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_f + n_r, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n_f + n_r,), generator=g)
    return TensorDataset(x[:n_f], y[:n_f]), TensorDataset(x[n_f:], y[n_f:])


def _model():
    return build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=0).eval()


def test_the_per_sample_bound_holds_and_alpha_at_it_is_refused_before_any_work(monkeypatch):
    forget, retain = _sets()  # |D| / |D_f| = 10
    model = _model()
    imp_f, imp_r = fisher_diagonal(model, forget), fisher_diagonal(model, retain)
    for k in imp_f:  # I_D = (90 I_r + 10 I_f) / 100 >= I_f / 10: nothing passes alpha = 10
        imp_d = (90 * imp_r[k] + 10 * imp_f[k]) / 100  # (equality up to float32 rounding)
        assert not bool((imp_f[k] > 10.0 * imp_d * (1 + 1e-5)).any())
    import deepclean.methods.ssd as ssd_module

    monkeypatch.setattr(ssd_module, "fisher_diagonal", lambda *a, **k: pytest.fail("work done"))
    with pytest.raises(ConfigurationError, match=r"alpha >= \|D\| / \|D_f\| = 10"):
        make_method("ssd", alpha=10.0, importance="per_sample").unlearn(model, forget, retain)


def test_per_sample_below_the_bound_and_retain_reference_are_accepted():
    forget, retain = _sets()
    make_method("ssd", alpha=5.0, importance="per_sample").unlearn(_model(), forget, retain)
    make_method("ssd", alpha=10.0, importance="per_sample",
                reference_set="retain").unlearn(_model(), forget, retain)


def test_batch_mean_importance_is_the_mean_of_squared_batch_gradients():
    forget, _ = _sets(n_f=10)
    model = _model().double()
    x, y = forget.tensors[0].double(), forget.tensors[1]
    got = batch_mean_importance(model, x, y, batch_size=4, device=torch.device("cpu"))
    # literal: batches [0:4], [4:8], [8:10]; square each batch-mean gradient, divide by 3
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for a, b in ((0, 4), (4, 8), (8, 10)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[a:b]), y[a:b]).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.square() / 3
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-10, atol=1e-14)


def test_default_ssd_with_the_authors_importance_acts_at_ten_percent():
    forget, retain = _sets(seed=3)
    model = _model()
    method = make_method("ssd")  # batch_mean, alpha 10
    out = method.unlearn(model, forget, retain)
    assert method.info_["n_dampened"] > 0
    changed = sum(int((a != b).sum()) for a, b in zip(out.parameters(), model.parameters()))
    # every changed weight was dampened (a dampened weight of value 0 stays 0)
    assert 0 < changed <= method.info_["n_dampened"]
