"""DeepClean's unlearn: reset of W_f to exactly 0, W_r bitwise frozen, BatchNorm policy, input intact."""

import copy

import pytest
import torch

import deepclean.methods.deepclean as dc_module
from deepclean import DeepClean, MaskError, ZeroWeights, reset_weights
from deepclean.masking import masked_finetune


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_unselected_weights_bitwise_equal_and_selected_start_from_zero(bn_model, tiny_data, monkeypatch):
    forget, retain = tiny_data
    before = _state(bn_model)
    starts = {}
    real = dc_module.masked_finetune

    def spy(model, mask, *args, **kwargs):
        starts.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return real(model, mask, *args, **kwargs)

    monkeypatch.setattr(dc_module, "masked_finetune", spy)
    method = DeepClean(gamma=1.1, epochs=2, seed=0)
    out = method.unlearn(bn_model, forget, retain)
    mask = method.mask_
    assert out is not bn_model
    # the input model is untouched, parameters and buffers
    for k, v in bn_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    selected, moved = 0, 0
    for name, p in out.named_parameters():
        m = mask[name]
        assert torch.equal(p.detach()[~m], before[name][~m]), f"{name}: a frozen weight moved"
        assert torch.all(starts[name][m] == 0), f"{name}: a selected weight did not start at 0"
        selected += int(m.sum())
        moved += int((p.detach()[m] != 0).sum())
    assert 0 < selected < sum(m.numel() for m in mask.values())
    assert moved > 0
    assert method.info_["n_reset"] == selected


def test_zero_weights_resets_exactly_and_does_not_train(bn_model, tiny_data):
    forget, retain = tiny_data
    method = ZeroWeights(gamma=1.1)
    out = method.unlearn(bn_model, forget, retain)
    orig = dict(bn_model.named_parameters())
    for name, p in out.named_parameters():
        m = method.mask_[name]
        assert torch.all(p.detach()[m] == 0)
        assert torch.equal(p.detach()[~m], orig[name].detach()[~m])
    for (k, a), b in zip(out.named_buffers(), bn_model.buffers()):
        assert torch.equal(a, b), k


def test_bn_running_statistics_update_by_default_and_freeze_on_request(bn_model, tiny_data):
    """Policy: bn_stats='update' re-estimates BatchNorm running statistics on D_r during the
    fine-tune (the reset changes activation statistics); bn_stats='freeze' keeps them bitwise."""
    forget, retain = tiny_data
    buffers = {k: v.clone() for k, v in bn_model.named_buffers()}
    updated = DeepClean(gamma=1.1, epochs=1, bn_stats="update").unlearn(bn_model, forget, retain)
    frozen = DeepClean(gamma=1.1, epochs=1, bn_stats="freeze").unlearn(bn_model, forget, retain)
    changed = [k for k, v in updated.named_buffers() if "running_mean" in k and not torch.equal(v, buffers[k])]
    assert changed, "bn_stats='update' should re-estimate running means"
    for k, v in frozen.named_buffers():
        assert torch.equal(v, buffers[k]), f"{k} moved under bn_stats='freeze'"


def test_same_seed_same_result(bn_model, tiny_data):
    forget, retain = tiny_data
    a = DeepClean(epochs=1, seed=5).unlearn(bn_model, forget, retain)
    b = DeepClean(epochs=1, seed=5).unlearn(bn_model, forget, retain)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_mask_with_wrong_keys_raises(bn_model, tiny_data):
    _, retain = tiny_data
    bad = {f"module.{n}": torch.ones_like(p, dtype=torch.bool) for n, p in bn_model.named_parameters()}
    with pytest.raises(MaskError, match="do not match"):
        reset_weights(copy.deepcopy(bn_model), bad)
    x, y = retain.tensors
    with pytest.raises(MaskError, match="do not match"):
        masked_finetune(copy.deepcopy(bn_model), bad, x, y, epochs=1, lr=1e-3, batch_size=32,
                        generator=torch.Generator().manual_seed(0))
    wrong_shape = {n: torch.ones(3, dtype=torch.bool) for n, _ in bn_model.named_parameters()}
    with pytest.raises(MaskError, match="shape"):
        reset_weights(copy.deepcopy(bn_model), wrong_shape)


@pytest.mark.parametrize("kwargs, word", [
    ({"gamma": 0}, "gamma"), ({"lr": -1}, "lr"), ({"epochs": -1}, "epochs"),
    ({"bn_stats": "sometimes"}, "bn_stats"), ({"seed": 1.5}, "seed"),
])
def test_bad_hyperparameters_raise_at_construction(kwargs, word):
    from deepclean import ConfigurationError

    with pytest.raises(ConfigurationError, match=word):
        DeepClean(**kwargs)
