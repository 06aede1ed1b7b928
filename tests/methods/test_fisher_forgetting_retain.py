"""FisherForgetting with a precomputed true Fisher of D_r (what ``deepclean tune`` shares between
trials) gives bitwise the same model as computing it itself, and a Fisher of another model is
refused before any change."""

import pytest
import torch
from torch.utils.data import TensorDataset

from deepclean import build_model
from deepclean.errors import ConfigurationError
from deepclean.methods.fisher_forgetting import FisherForgetting, true_fisher_diagonal


def _case():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 1, 8, 8, generator=g), torch.arange(60) % 3
    model = build_model("small_cnn", in_channels=1, num_classes=3, width=0.25, seed=0)
    return model, TensorDataset(x[:10], y[:10]), TensorDataset(x[10:], y[10:])


def test_precomputed_retain_fisher_gives_the_same_model():
    model, forget, retain = _case()
    shared = FisherForgetting.tuning_collaborators(model, forget, retain)
    assert set(shared) == {"retain_fisher"}
    for form in ("authors", "paper"):
        a = FisherForgetting(alpha=1e-6, form=form, seed=3).unlearn(model, forget, retain)
        b = FisherForgetting(alpha=1e-6, form=form, seed=3, **shared).unlearn(model, forget, retain)
        for (n, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(pa, pb), n
    assert "retain_fisher" not in FisherForgetting(**shared).hyperparameters()


def test_a_fisher_of_another_model_is_refused():
    model, forget, retain = _case()
    other = build_model("small_cnn", in_channels=1, num_classes=3, width=0.5, seed=0)
    wrong = true_fisher_diagonal(other, retain)
    with pytest.raises(ConfigurationError, match="retain_fisher does not fit the model"):
        FisherForgetting(retain_fisher=wrong).unlearn(model, forget, retain)
    with pytest.raises(ConfigurationError, match="retain_fisher must be a dict of tensors"):
        FisherForgetting(retain_fisher=[1, 2])
