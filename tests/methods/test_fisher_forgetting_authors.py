"""Fisher Forgetting as the authors' code runs it (variance alpha/F, clamps, per-row mean, x10 on
the output layer and on 1-D tensors, the class-row step), against a literal re-derivation."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepclean.methods.fisher_forgetting import FisherForgetting, true_fisher_diagonal_reference


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3)).double().eval()


def _data(seed, n, classes):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor(classes, dtype=torch.int64)[torch.randint(0, len(classes), (n,), generator=g)]
    return x, y


def _authors(model, fisher, *, alpha, num_classes, forgotten, seed):
    """The authors' get_mean_var written out literally, one tensor at a time."""
    out = {}
    gen = torch.Generator().manual_seed(seed * 1_000_003)
    for name, p in model.named_parameters():
        var = 1.0 / (fisher[name] + 1e-8)
        var = var.clamp(max=1e3)
        is_last = name.startswith("4.")  # the Linear with num_classes outputs
        if is_last:
            var = var.clamp(max=1e2)
        var = alpha * var
        if p.ndim > 1:
            var = var.mean(dim=1, keepdim=True).expand_as(p).clone()
        mu = p.detach().clone()
        if is_last and forgotten is not None:
            mu[forgotten] = 0
            var[forgotten] = 0.0001
        if is_last:
            var = var * 10
        elif p.ndim == 1:
            var = var * 10
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        out[name] = mu + var.sqrt() * noise
    return out


@pytest.mark.parametrize("scenario", ["random", "class"])
def test_authors_form_matches_the_literal_recipe(scenario):
    model = _model()
    if scenario == "class":
        xf, yf = _data(1, 12, [2])
        xr, yr = _data(2, 40, [0, 1])
        forgotten = 2
    else:
        xf, yf = _data(1, 12, [0, 1, 2])
        xr, yr = _data(2, 40, [0, 1, 2])
        forgotten = None
    method = FisherForgetting(alpha=1e-3, seed=4)
    out = method.unlearn(model, TensorDataset(xf, yf), TensorDataset(xr, yr))
    fisher = true_fisher_diagonal_reference(model, TensorDataset(xr, yr))
    expected = _authors(model, fisher, alpha=1e-3, num_classes=3, forgotten=forgotten, seed=4)
    for name, p in out.named_parameters():
        assert torch.allclose(p.detach(), expected[name], rtol=1e-9, atol=1e-12), name
    if forgotten is not None:  # the row: mean 0, variance 1e-4 * 10
        assert out[4].weight[forgotten].abs().max() < 0.2
    assert method.info_["forgotten_class_row"] == (2 if scenario == "class" else -1)


def test_class_row_is_not_touched_when_told_not_to():
    model = _model()
    xf, yf = _data(1, 12, [2])
    xr, yr = _data(2, 40, [0, 1])
    out = FisherForgetting(alpha=1e-9, class_row="never", seed=0).unlearn(
        model, TensorDataset(xf, yf), TensorDataset(xr, yr))
    # alpha 1e-9: the row keeps (almost) its trained value instead of 0
    assert torch.allclose(out[4].weight[2], model[4].weight[2], atol=1e-2)
    assert out[4].weight[2].abs().max() > 0.05


def test_the_authors_form_adds_more_noise_than_the_paper_form_at_the_same_alpha():
    model = _model()
    xf, yf = _data(1, 12, [0, 1, 2])
    xr, yr = _data(2, 40, [0, 1, 2])
    stds = {}
    for form in ("authors", "paper"):
        m = FisherForgetting(alpha=1e-6, form=form, seed=0)
        m.unlearn(model, TensorDataset(xf, yf), TensorDataset(xr, yr))
        stds[form] = m.info_["noise_std_mean"]
    assert stds["authors"] > 2.0 * stds["paper"]
