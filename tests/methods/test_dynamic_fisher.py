"""Dynamic Fisher (paper limitation 3): the selection only grows, W_r stays bitwise frozen."""

from __future__ import annotations

import json

import pytest
import torch

from deepclean import DeepClean, fisher_diagonal, select_weights
from deepclean.errors import ConfigurationError


def _run(bn_model, tiny_data, **kw):
    forget, retain = tiny_data
    method = DeepClean(gamma=1.1, epochs=2, batch_size=32, refresh_every=2, seed=0, **kw)
    out = method.unlearn(bn_model, forget, retain)
    return method, out


def test_selection_grows_and_frozen_weights_stay_bitwise(bn_model, tiny_data):
    forget, retain = tiny_data
    initial = select_weights(fisher_diagonal(bn_model, forget), fisher_diagonal(bn_model, retain),
                             1.1)
    method, out = _run(bn_model, tiny_data)
    info = method.info_
    refreshes = info["refreshes"]
    assert [r["step"] for r in refreshes] == [2, 4, 6, 8, 10, 12]  # 2 epochs x 7 steps, not at 14
    shares = [r["share_reset"] for r in refreshes]
    assert shares == sorted(shares)  # only grows
    assert info["n_reset"] == info["n_reset_initial"] + sum(r["added"] for r in refreshes)
    assert sum(r["added"] for r in refreshes) > 0  # the refresh did select new weights here
    mask = method.mask_
    orig = dict(bn_model.named_parameters())
    for name, p in out.named_parameters():
        assert torch.all(mask[name] | ~initial[name]), f"{name}: an initial selection was dropped"
        assert torch.equal(p.detach()[~mask[name]], orig[name].detach()[~mask[name]]), name
    json.dumps(info, allow_nan=False)


def test_newly_selected_weights_start_from_zero(bn_model, tiny_data):
    # with a vanishing learning rate a trained weight moves by about lr per step: every weight of
    # the final selection (initial or added later) must then sit at 0 up to 1e-25
    method, out = _run(bn_model, tiny_data, lr=1e-30)
    assert sum(r["added"] for r in method.info_["refreshes"]) > 0
    for name, p in out.named_parameters():
        sel = p.detach()[method.mask_[name]]
        assert sel.abs().max().item() <= 1e-25 if sel.numel() else True, name


def test_refresh_zero_is_the_static_method(bn_model, tiny_data):
    forget, retain = tiny_data
    a = DeepClean(gamma=1.1, epochs=1, batch_size=32).unlearn(bn_model, forget, retain)
    b = DeepClean(gamma=1.1, epochs=1, batch_size=32, refresh_every=0).unlearn(bn_model, forget,
                                                                              retain)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), k


def test_bad_refresh_settings_are_configuration_errors():
    with pytest.raises(ConfigurationError, match="refresh_every"):
        DeepClean(refresh_every=-1)
    with pytest.raises(ConfigurationError, match="refresh_size"):
        DeepClean(refresh_every=2, refresh_size=0)
