"""One contract test over every registered unlearning method (issue 3; GUIDE section 7).

For each name in ``deepclean.available_methods()``: a new model is returned and the input model's
parameters, buffers and modes are bitwise unchanged; the same seed gives a bitwise-identical result
and the global torch RNG is not touched; a model with BatchNorm works; an empty D_f or D_r raises
``DataError`` before any forward pass. Plus the registry's errors and the Retrain guarantees.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import deepclean
from deepclean import ConfigurationError, DataError, TrainConfig, build_model, make_method
from deepclean.methods import method_class
from deepclean.methods.retrain import reinitialise

NUM_CLASSES = 4
MODEL_KW = dict(in_channels=1, num_classes=NUM_CLASSES, width=0.25)

# Small hyperparameters that keep every method under a second or two on 2 CPU cores. A method not
# listed here runs with its defaults, except that a constructor argument named ``epochs`` is set
# to 1.
FAST: dict[str, dict] = {
    "deepclean": dict(epochs=1, batch_size=64),
    "finetune": dict(epochs=1, batch_size=64),
    "retrain": dict(train_config=TrainConfig(epochs=1, batch_size=64)),
    "sparse_mu": dict(epochs=1, batch_size=64),
    "fisher_forgetting": dict(),
    "ssd": dict(),
    "lcodec": dict(n_perturbations=20, selection_samples=16, scrub_batch_size=16, max_units=4,
                   max_parameters=300,
                   hessian_samples=64),
    "neggrad": dict(epochs=1),
    "random_label": dict(epochs=1),
    "teacher": dict(epochs=1),
    "scrub": dict(epochs=1, max_steps=1),
    "salun": dict(epochs=1),
}


def fast_hyperparameters(name: str) -> dict:
    kwargs = dict(FAST.get(name, {}))
    accepted = inspect.signature(method_class(name).__init__).parameters
    if "epochs" in accepted and "epochs" not in kwargs:
        kwargs["epochs"] = 1
    return {k: v for k, v in kwargs.items() if k in accepted}


def build(name: str, **extra) -> deepclean.Unlearner:
    return make_method(name, **{**fast_hyperparameters(name), **extra})


@pytest.fixture(scope="module")
def data() -> tuple[TensorDataset, TensorDataset]:
    """(D_f, D_r): 40 and 200 samples of 1x8x8 inputs with 4 classes."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(240, 1, 8, 8, generator=g)
    y = torch.randint(0, NUM_CLASSES, (240,), generator=g)
    return TensorDataset(x[:40], y[:40]), TensorDataset(x[40:], y[40:])


@pytest.fixture(scope="module")
def trained(data) -> nn.Module:
    """A small CNN with BatchNorm, trained briefly so that its BN statistics are not defaults;
    returned in train mode to check that methods leave the modes alone too."""
    forget, retain = data
    x = torch.cat([forget.tensors[0], retain.tensors[0]])
    y = torch.cat([forget.tensors[1], retain.tensors[1]])
    model = build_model("small_cnn", **MODEL_KW, seed=0)
    deepclean.train_model(model, x, y, TrainConfig(epochs=2, batch_size=64), seed=0,
                          progress=False)
    return model.train()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key} differs"


METHODS = deepclean.available_methods()


@pytest.mark.parametrize("name", METHODS)
def test_new_model_input_untouched_and_deterministic(name, data, trained):
    forget, retain = data
    before = snapshot(trained)
    modes = [m.training for m in trained.modules()]
    rng = torch.get_rng_state()

    first = build(name, seed=3).unlearn(trained, forget, retain)
    second = build(name, seed=3).unlearn(trained, forget, retain)

    assert first is not trained and second is not first
    assert isinstance(first, nn.Module)
    assert_state_equal(snapshot(trained), before)  # parameters AND buffers, bitwise
    assert [m.training for m in trained.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng), "the global torch RNG was used"
    assert_state_equal(snapshot(first), snapshot(second))  # same seed, same result
    # no shared storage with the input
    ptrs = {p.data_ptr() for p in trained.parameters()}
    assert not ptrs & {p.data_ptr() for p in first.parameters()}


@pytest.mark.parametrize("name", METHODS)
def test_works_with_batchnorm(name, data, trained):
    forget, retain = data
    assert any(isinstance(m, nn.BatchNorm2d) for m in trained.modules())
    out = build(name).unlearn(trained, forget, retain)
    assert not out.training
    with torch.no_grad():
        logits = out(retain.tensors[0][:16])
    assert logits.shape == (16, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    for key, value in out.state_dict().items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("which", ["forget", "retain"])
@pytest.mark.parametrize("name", METHODS)
def test_empty_set_raises_before_any_work(name, which, data, trained):
    forget, retain = data
    empty = TensorDataset(forget.tensors[0][:0], forget.tensors[1][:0])
    model = copy.deepcopy(trained)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    method = build(name)
    with pytest.raises(DataError, match="empty"):
        if which == "forget":
            method.unlearn(model, empty, retain)
        else:
            method.unlearn(model, forget, empty)
    assert calls == [], "a forward pass ran before the empty set was rejected"


@pytest.mark.parametrize("name", METHODS)
def test_registered_class_is_documented(name):
    cls = method_class(name)
    assert cls.name == name
    assert cls.summary.strip() and "\n" not in cls.summary
    assert cls.reference.strip()
    assert (cls.__doc__ or "").strip()
    # hyperparameters are keyword-only
    for pname, param in inspect.signature(cls.__init__).parameters.items():
        if pname != "self":
            assert param.kind is inspect.Parameter.KEYWORD_ONLY, f"{name}: {pname}"


def test_make_method_unknown_name_lists_valid_ones():
    with pytest.raises(ConfigurationError) as info:
        make_method("no_such_method")
    for name in METHODS:
        assert name in str(info.value)


@pytest.mark.parametrize("name", METHODS)
def test_make_method_unknown_hyperparameter_lists_valid_ones(name):
    with pytest.raises(ConfigurationError) as info:
        make_method(name, no_such_hyperparameter=1)
    message = str(info.value)
    assert "no_such_hyperparameter" in message
    assert "seed" in message


# --------------------------------------------------------------------------------------------
# Retrain (gold)
# --------------------------------------------------------------------------------------------

LAYERS = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


def test_retrain_changes_every_layer_tensor(data, trained):
    forget, retain = data
    gold = build("retrain", seed=1).unlearn(trained, forget, retain)
    old = dict(trained.named_modules())
    checked = 0
    for name, module in gold.named_modules():
        if not isinstance(module, LAYERS):
            continue
        for key, tensor in list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)
        ):
            if key == "num_batches_tracked":  # a step counter, equal whenever step counts match
                continue
            ref = getattr(old[name], key)
            assert not torch.equal(tensor, ref), f"{name}.{key} equals the trained model's"
            checked += 1
    assert checked > 10


def test_reinitialise_equals_fresh_build(trained):
    model = copy.deepcopy(trained)
    reinitialise(model, seed=5)
    fresh = build_model("small_cnn", **MODEL_KW, seed=5)
    assert_state_equal(snapshot(model), snapshot(fresh))  # BN statistics reset too


def test_retrain_without_builder_trains_a_fresh_build(data, trained):
    forget, retain = data
    config = TrainConfig(epochs=1, batch_size=64)
    gold = make_method("retrain", train_config=config, seed=4).unlearn(trained, forget, retain)
    fresh = build_model("small_cnn", **MODEL_KW, seed=4)
    expected = deepclean.train_model(fresh, *retain.tensors, config, seed=4, progress=False)
    assert_state_equal(snapshot(gold), snapshot(expected))
