"""Compiled models work like plain ones; a sample read twice is refused everywhere alike."""

import pytest
import torch
from torch.utils.data import ConcatDataset, Subset, TensorDataset

from deepclean import DeepClean, build_model, fisher_diagonal
from deepclean.checkpoint import load_weights, save_checkpoint, strip_module_prefix
from deepclean.errors import DataError
from deepclean.validation import sample_ids, unwrap_model


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def _model(seed=0):
    return build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=seed).eval()


def test_compiled_model_gives_plain_keys_and_the_same_fisher():
    model = _model()
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    assert unwrap_model(compiled) is model
    # DataParallel moves its module to the first GPU when there is one: wrap another model
    other = _model()
    assert unwrap_model(torch.nn.DataParallel(torch.compile(other))) is other
    data = _data()
    plain = fisher_diagonal(model, data, dtype=torch.float64)
    through = fisher_diagonal(compiled, data, dtype=torch.float64)
    assert set(through) == set(plain) and not any(k.startswith("_orig_mod") for k in through)
    for k in plain:
        assert torch.equal(plain[k], through[k])


def test_deepclean_on_a_compiled_model_returns_a_plain_module_that_loads(tmp_path):
    model = _model()
    data = _data(40)
    forget, retain = Subset(data, range(8)), Subset(data, range(8, 40))
    out = DeepClean(epochs=1, gamma=1.5).unlearn(torch.compile(model), forget, retain)
    assert type(out).__name__ != "OptimizedModule"
    assert not any(k.startswith("_orig_mod") for k in out.state_dict())
    save_checkpoint(tmp_path / "m.safetensors", torch.compile(out))
    fresh = _model(seed=1)
    load_weights(fresh, tmp_path / "m.safetensors")
    for k, v in out.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_prefixes_are_stripped_in_any_nesting():
    state = {"module._orig_mod.a": torch.zeros(1), "module._orig_mod.b": torch.ones(1)}
    assert set(strip_module_prefix(state)) == {"a", "b"}
    mixed = {"module.a": torch.zeros(1), "b": torch.ones(1)}
    assert strip_module_prefix(mixed) is mixed  # not every key carries it: left alone


@pytest.mark.parametrize("make", [
    lambda d: Subset(d, [0, 1, 2, 2, 2, 2]),
    lambda d: ConcatDataset([Subset(d, [0, 1]), Subset(d, [5, 1])]),
    lambda d: ConcatDataset([d, d]),
    lambda d: Subset(ConcatDataset([d, Subset(d, [3])]), [3, len(d)]),
])
def test_repeated_samples_are_refused_by_the_fisher_and_every_method(make):
    data = _data()
    repeated = make(data)
    with pytest.raises(DataError, match="repeated samples"):
        fisher_diagonal(_model(), repeated)
    retain = Subset(_data(30, seed=1), range(30))
    with pytest.raises(DataError, match=r"forget set D_f holds \d+ repeated samples"):
        DeepClean(epochs=1).unlearn(_model(), repeated, retain)


def test_the_message_names_the_first_repeats():
    data = _data()
    with pytest.raises(DataError, match=r"holds 3 repeated samples \(positions 2 and 3, 2 and 4, "
                                        r"2 and 5 read the same sample\)"):
        fisher_diagonal(_model(), Subset(data, [0, 1, 2, 2, 2, 2]))


def test_equal_values_in_distinct_samples_are_not_duplicates():
    x = torch.zeros(6, 1, 8, 8)  # six identical images, six distinct samples
    data = TensorDataset(x, torch.arange(6))
    assert len(set(sample_ids(Subset(data, range(6))))) == 6
    fisher_diagonal(_model(), Subset(data, range(6)))  # accepted


def test_overlap_through_concat_views_is_refused():
    data = _data()
    forget = ConcatDataset([Subset(data, [0, 1])])
    retain = Subset(data, range(1, 24))
    with pytest.raises(DataError, match=r"share 1 samples .* \[1\]"):
        DeepClean(epochs=1).unlearn(_model(), forget, retain)
