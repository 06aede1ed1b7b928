"""Methods that stream their data (``Unlearner.streams``): DeepClean, Zero Weights and Fine-tune on
a ``Dataset`` that is not in memory, and ``train_model`` on one.

Equality with the in-memory path is bitwise (``torch.equal``), not approximate: a streamed data
set that returns the same samples is read in the same batches, in the same order (each epoch's
permutation drawn from the same generator, the Fisher passes in the data set's own order), so
every operation sees the same values and CPU kernels give the same bits.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from deepclean import DeepClean, FineTune, ZeroWeights, fisher_diagonal, masked_finetune
from deepclean.errors import ConfigurationError, DataError
from deepclean.fisher.train_fisher import precompute_train_fisher
from deepclean.methods import make_method
from deepclean.methods.deepclean import reset_weights
from deepclean.selection import select_weights
from deepclean.training import TrainConfig, train_model


class Wrapped(Dataset):
    """Tensors behind a plain ``Dataset`` (not a ``TensorDataset``): the streamed path. Labels
    come back as Python ints; every ``__getitem__`` is counted."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.calls = x, y, 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        self.calls += 1
        return self.x[i], int(self.y[i])


class Augmented(Wrapped):
    """Per-sample noise seeded from (index, epoch); ``set_epoch`` is called by the loaders, and
    reads are counted per epoch (in the main process, i.e. with ``num_workers=0``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(x, y)
        self.epoch = 0
        self.per_epoch: Counter = Counter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sample(self, i: int, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1_000 * int(i) + epoch)
        return self.x[i] + 0.1 * torch.randn(self.x[i].shape, generator=g)

    def __getitem__(self, i: int):
        self.per_epoch[self.epoch] += 1
        return self.sample(i, self.epoch), int(self.y[i])

    def materialised(self, epoch: int) -> TensorDataset:
        return TensorDataset(torch.stack([self.sample(i, epoch) for i in range(len(self))]),
                             self.y.clone())


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bitwise(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _streamed(data: tuple[TensorDataset, TensorDataset], cls=Wrapped):
    (xf, yf), (xr, yr) = data[0].tensors, data[1].tensors
    return cls(xf, yf), cls(xr, yr)


@pytest.mark.parametrize("method", [
    lambda: DeepClean(gamma=1.1, epochs=2, batch_size=16, fisher_batch_size=32, seed=3),
    lambda: DeepClean(gamma=1.1, epochs=1, batch_size=16, bn_stats="freeze", seed=1),
    lambda: ZeroWeights(gamma=1.1, fisher_batch_size=32),
    lambda: FineTune(epochs=2, batch_size=16, seed=5),
])
def test_streamed_dataset_gives_the_in_memory_result_bitwise(bn_model, tiny_data, method):
    memory = method()
    expected = memory.unlearn(bn_model, *tiny_data)
    streamed = method()
    forget, retain = _streamed(tiny_data)
    got = streamed.unlearn(bn_model, forget, retain)
    _assert_bitwise(got, expected)
    assert streamed.info_ == memory.info_
    assert retain.calls >= len(retain)  # D_r was really read through the Dataset
    if isinstance(memory, DeepClean):
        assert all(torch.equal(streamed.mask_[k], memory.mask_[k]) for k in memory.mask_)


def test_in_memory_deepclean_is_the_paper_steps_on_tensors(bn_model, tiny_data):
    """The default (in-memory) path computes exactly the composition of the library's steps on
    the tensors, as before streaming existed: Fisher pair, eq. 2, reset, masked fine-tune."""
    (xf, yf), (xr, yr) = tiny_data[0].tensors, tiny_data[1].tensors
    method = DeepClean(gamma=1.1, epochs=2, batch_size=16, fisher_batch_size=32, seed=3)
    got = method.unlearn(bn_model, *tiny_data)
    work = copy.deepcopy(bn_model)
    ff = fisher_diagonal(work, TensorDataset(xf, yf), batch_size=32)
    fr = fisher_diagonal(work, TensorDataset(xr, yr), batch_size=32)
    mask = select_weights(ff, fr, 1.1)
    reset_weights(work, mask)
    masked_finetune(work, mask, xr, yr, epochs=2, lr=1e-3, batch_size=16,
                    generator=torch.Generator().manual_seed(3 * 1_000_003), progress=False)
    _assert_bitwise(got, work)


@pytest.mark.parametrize("cls", [DeepClean, FineTune])
def test_num_workers_do_not_change_the_result(bn_model, tiny_data, cls):
    kwargs = {"epochs": 2, "batch_size": 32, "seed": 2}
    if cls is DeepClean:
        kwargs.update(gamma=1.1, fisher_batch_size=64)
    results = []
    for workers in (0, 2):
        forget, retain = _streamed(tiny_data, Augmented)
        results.append(cls(num_workers=workers, **kwargs).unlearn(bn_model, forget, retain))
    _assert_bitwise(results[0], results[1])


def test_every_epoch_reads_and_transforms_d_r_again(bn_model, tiny_data):
    forget, retain = _streamed(tiny_data, Augmented)
    method = DeepClean(gamma=1.1, epochs=3, batch_size=16)
    method.unlearn(bn_model, forget, retain)
    n = len(retain)
    # epoch 0: the Fisher pass, the first batch checked up front (all 200 samples: <= 256) and
    # the first fine-tune epoch; epochs 1 and 2: exactly one pass each
    assert retain.per_epoch[1] == n and retain.per_epoch[2] == n
    assert retain.per_epoch[0] == 3 * n
    assert sorted(retain.per_epoch) == [0, 1, 2]
    # one fine-tune epoch on the augmented set is the in-memory run on epoch 0's samples;
    # with three epochs the later epochs' fresh samples change the result
    one = DeepClean(gamma=1.1, epochs=1, batch_size=16)
    streamed = one.unlearn(bn_model, *_streamed(tiny_data, Augmented))
    aug_f, aug_r = _streamed(tiny_data, Augmented)
    _assert_bitwise(streamed, DeepClean(gamma=1.1, epochs=1, batch_size=16).unlearn(
        bn_model, aug_f.materialised(0), aug_r.materialised(0)))
    three = method.unlearn(bn_model, *_streamed(tiny_data, Augmented))
    fixed = DeepClean(gamma=1.1, epochs=3, batch_size=16).unlearn(
        bn_model, aug_f.materialised(0), aug_r.materialised(0))
    s3, sf = three.state_dict(), fixed.state_dict()
    assert any(not torch.equal(s3[k], sf[k]) for k in s3)


def test_frozen_weights_stay_bitwise_when_streamed(bn_model, tiny_data):
    before = _state(bn_model)
    method = DeepClean(gamma=1.1, epochs=2, batch_size=16, num_workers=2)
    out = method.unlearn(bn_model, *_streamed(tiny_data, Augmented))
    assert _state(bn_model).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in _state(bn_model).items())  # input untouched
    params = dict(out.named_parameters())
    selected = sum(int(m.sum()) for m in method.mask_.values())
    assert 0 < selected < sum(m.numel() for m in method.mask_.values())
    for name, m in method.mask_.items():
        assert torch.equal(params[name].detach()[~m], before[name][~m]), name


def test_auto_gamma_on_streamed_sets_matches_the_in_memory_search(bn_model, tiny_data):
    g = torch.Generator().manual_seed(9)
    holdout = TensorDataset(torch.randn(120, 1, 8, 8, generator=g), torch.arange(10).repeat(12))
    (xf, yf), (xr, yr) = tiny_data[0].tensors, tiny_data[1].tensors
    keep = yr != 0
    memory_sets = (TensorDataset(xf, yf), TensorDataset(xr[keep], yr[keep]))
    a = DeepClean(gamma="auto", holdout=holdout, epochs=3, batch_size=16)
    expected = a.unlearn(bn_model, *memory_sets)
    b = DeepClean(gamma="auto", holdout=holdout, epochs=3, batch_size=16)
    got = b.unlearn(bn_model, Wrapped(xf, yf), Wrapped(xr[keep], yr[keep]))
    assert a.info_["auto_gamma"]["candidates"], "the search must have run"
    assert b.info_ == a.info_
    _assert_bitwise(got, expected)


def test_train_fisher_on_streamed_sets(bn_model, tiny_data):
    (xf, yf), (xr, yr) = tiny_data[0].tensors, tiny_data[1].tensors
    tf = precompute_train_fisher(bn_model, TensorDataset(torch.cat([xf, xr]), torch.cat([yf, yr])))
    expected = DeepClean(train_fisher=tf, epochs=1).unlearn(bn_model, *tiny_data)
    got = DeepClean(train_fisher=tf, epochs=1).unlearn(bn_model, *_streamed(tiny_data))
    _assert_bitwise(got, expected)
    other = Wrapped(xr[:-1], yr[:-1])  # a sample missing: refused before any work
    with pytest.raises(Exception, match="not the"):
        DeepClean(train_fisher=tf, epochs=1).unlearn(bn_model, Wrapped(xf, yf), other)


def test_train_model_on_a_dataset_equals_the_tensor_path():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g)
    config = TrainConfig(epochs=2, batch_size=32, crop_padding=1, flip=True)
    from deepclean import build_model

    def fresh():
        return build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=0)

    expected = train_model(fresh(), x, y, config, seed=4, progress=False)
    for workers in (0, 2):
        data = Wrapped(x, y)
        got = train_model(fresh(), data, config=config, seed=4, progress=False,
                          num_workers=workers)
        _assert_bitwise(got, expected)
        if workers == 0:
            assert data.calls == 2 * 96  # read once per epoch
    _assert_bitwise(train_model(fresh(), TensorDataset(x, y), config, seed=4, progress=False),
                    expected)


def test_execution_options_are_not_hyperparameters():
    for name in ("deepclean", "zero_weights", "finetune"):
        plain = make_method(name).hyperparameters()
        assert make_method(name, num_workers=2, pin_memory=True,
                           persistent_workers=True).hyperparameters() == plain
        assert "num_workers" not in plain
        with pytest.raises(ConfigurationError, match="num_workers must be an integer >= 0"):
            make_method(name, num_workers=-1)
        with pytest.raises(ConfigurationError, match="pin_memory must be True or False"):
            make_method(name, pin_memory="yes")


def test_persistent_workers_with_set_epoch_are_refused(bn_model, tiny_data):
    method = FineTune(epochs=1, num_workers=1, persistent_workers=True)
    with pytest.raises(ConfigurationError, match="persistent_workers=False"):
        method.unlearn(bn_model, *_streamed(tiny_data, Augmented))
    # without set_epoch persistent workers are fine and give the same result
    out = method.unlearn(bn_model, *_streamed(tiny_data))
    _assert_bitwise(out, FineTune(epochs=1).unlearn(bn_model, *tiny_data))


class _Bad(Wrapped):
    def __init__(self, x, y, *, bad_at: int, what: str) -> None:
        super().__init__(x, y)
        self.bad_at, self.what = bad_at, what

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        if i == self.bad_at:
            if self.what == "nan":
                x = torch.full_like(x, float("nan"))
            else:
                y = 99
        return x, y


@pytest.mark.parametrize("what, match", [("nan", "NaN or infinite"), ("label", "labels from")])
def test_bad_sample_after_the_first_batch_fails_as_it_is_read(bn_model, tiny_data, what, match):
    (xf, yf), (xr, yr) = tiny_data[0].tensors, tiny_data[1].tensors
    retain = _Bad(xr, yr, bad_at=len(yr) - 1, what=what)  # in the first 256: refused up front
    with pytest.raises(DataError, match=match):
        FineTune(epochs=1).unlearn(bn_model, Wrapped(xf, yf), retain)
    big_x = torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    big_y = torch.randint(0, 10, (300,), generator=torch.Generator().manual_seed(2))
    late = _Bad(big_x, big_y, bad_at=290, what=what)  # beyond the first 256: found while reading
    with pytest.raises(DataError, match=match):
        masked_finetune(copy.deepcopy(bn_model), None, late, epochs=1, lr=1e-3, batch_size=16,
                        generator=torch.Generator().manual_seed(0), progress=False)


def test_streamed_sets_are_checked_before_any_work(bn_model, tiny_data):
    (xf, yf), (xr, yr) = tiny_data[0].tensors, tiny_data[1].tensors
    method = DeepClean(epochs=1)
    with pytest.raises(DataError, match="empty"):
        method.unlearn(bn_model, Wrapped(xf[:0], yf[:0]), Wrapped(xr, yr))
    with pytest.raises(DataError, match="model does not accept"):
        method.unlearn(bn_model, Wrapped(torch.randn(4, 3, 8, 8), yf[:4]), Wrapped(
            torch.randn(4, 3, 8, 8), yr[:4]))
    with pytest.raises(DataError, match="same input shape"):
        method.unlearn(bn_model, Wrapped(xf, yf), Wrapped(torch.randn(4, 1, 9, 9), yr[:4]))
    with pytest.raises(DataError, match="labels from"):
        method.unlearn(bn_model, Wrapped(xf, yf + 10), Wrapped(xr, yr))
    base = Wrapped(torch.cat([xf, xr]), torch.cat([yf, yr]))
    with pytest.raises(DataError, match="share 1 samples"):
        method.unlearn(bn_model, Subset(base, [0, 1]), Subset(base, [1, 2, 3]))
    with pytest.raises(DataError, match="repeated"):
        method.unlearn(bn_model, Subset(base, [0, 0]), Subset(base, [2, 3]))


def test_masked_finetune_rejects_mixed_arguments(bn_model, tiny_data):
    xr, yr = tiny_data[1].tensors
    kw = {"epochs": 1, "lr": 1e-3, "batch_size": 16, "generator": torch.Generator(),
          "progress": False}
    with pytest.raises(ConfigurationError, match="y=None"):
        masked_finetune(bn_model, None, Wrapped(xr, yr), yr, **kw)
    with pytest.raises(ConfigurationError, match="labels y as NoneType"):
        masked_finetune(bn_model, None, xr, None, **kw)
    with pytest.raises(ConfigurationError, match="num_workers"):
        masked_finetune(bn_model, None, xr, yr, num_workers=-2, **kw)


def test_num_workers_reaches_the_streaming_methods_and_no_key():
    import torch as _torch

    from deepclean.cli import _config_from_args, build_parser
    from deepclean.harness.config import _method_kwargs, with_overrides
    from deepclean.harness.resume import IGNORED_CONFIG_FIELDS

    args = build_parser().parse_args(["run", "--num-workers", "3", "--methods",
                                      "deepclean,finetune,neggrad,lcodec"])
    cfg = _config_from_args(args)
    assert cfg.num_workers == 3
    assert _config_from_args(build_parser().parse_args(["run"])).num_workers == 0
    assert "num_workers" in IGNORED_CONFIG_FIELDS
    for name, takes in (("deepclean", True), ("finetune", True), ("neggrad", True),
                        ("ssd", True), ("lcodec", False)):
        kwargs = _method_kwargs(cfg, name, "random", 0, _torch.device("cpu"), "resnet18", None)
        assert (kwargs.get("num_workers") == 3) is takes, name
        method = make_method(name, **kwargs)
        if takes:
            assert method.num_workers == 3
        assert "num_workers" not in method.hyperparameters()
    with pytest.raises(SystemExit):  # the parser refuses it in the flag's words
        build_parser().parse_args(["run", "--num-workers", "-1"])
    with pytest.raises(ConfigurationError, match="num_workers must be an integer >= 0"):
        with_overrides(_config_from_args(build_parser().parse_args(["run"])),
                       num_workers=-1).validate()
