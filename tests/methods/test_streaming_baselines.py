"""The baselines that stream D_f and D_r (``Unlearner.streams``): NegGrad, RandomLabel, Bad
Teacher, SCRUB, SalUn, Sparse MU, SSD and Fisher Forgetting.

A data set that is not a ``TensorDataset`` (samples built in ``__getitem__``, reads counted) gives
the same unlearned weights, bitwise (``torch.equal``), as the ``TensorDataset`` of the same
samples: the streamed path reads the same batches in the same order (shuffled ones drawn from the
same seeded generator, ordered passes in the data set's own order). The exact read counts show
that nothing reads a set whole beyond what the method's passes need: D_r has 300 samples, more
than the 256 that the checks before any work read (``base.FIRST_BATCH``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from deepclean.errors import ConfigurationError, DataError
from deepclean.methods import make_method
from deepclean.training import TrainConfig

N_FORGET, N_RETAIN = 40, 300
OTHER = [c for c in range(10) if c != 3]


def _random_label(i: int) -> int:
    return (7 * i + 1) % 10


def _not_three(i: int) -> int:
    return OTHER[(7 * i) % 9]


class OnTheFly(Dataset):
    """``n`` samples of 1x8x8 built in ``__getitem__`` from (seed, index, epoch): no tensor of
    the whole set exists. Labels are Python ints; every read is counted (per epoch too, in the
    main process); ``bad_at`` makes one sample NaN (``"nan"``) or its label 99 (``"label"``)."""

    def __init__(self, n: int, seed: int, label=_random_label, *, bad_at: int = -1,
                 what: str = "") -> None:
        self.n, self.seed, self.label = n, seed, label
        self.bad_at, self.what = bad_at, what
        self.calls = 0
        self.epoch = 0

    def __len__(self) -> int:
        return self.n

    def sample(self, i: int, epoch: int = 0) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + 1_009 * epoch + int(i))
        x, y = torch.randn(1, 8, 8, generator=g), self.label(int(i))
        if i == self.bad_at:
            if self.what == "nan":
                x = torch.full_like(x, float("nan"))
            else:
                y = 99
        return x, y

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.calls += 1
        return self.sample(i, self.epoch)

    def materialised(self, epoch: int = 0) -> TensorDataset:
        """The same samples as one ``TensorDataset`` (not counted as reads)."""
        items = [self.sample(i, epoch) for i in range(self.n)]
        return TensorDataset(torch.stack([x for x, _ in items]),
                             torch.tensor([y for _, y in items], dtype=torch.long))


class PerEpoch(OnTheFly):
    """Samples drawn from (index, epoch): ``set_epoch`` is what the loaders call; the epochs
    seen are recorded."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epochs_seen: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epochs_seen.append(epoch)


def _sets(scenario: str = "random", cls=OnTheFly) -> tuple[OnTheFly, OnTheFly]:
    if scenario == "class":  # D_f all of class 3, D_r none of it
        return cls(N_FORGET, 1, lambda i: 3), cls(N_RETAIN, 2, _not_three)
    return cls(N_FORGET, 1), cls(N_RETAIN, 2)


def _assert_bitwise(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# (method, hyperparameters, scenario, reads of D_f, reads of D_r) with num_workers=0. Every
# streamed run first reads all 40 of D_f and the first 256 of D_r (checks before any work).
CASES = [
    # one sample to read the number of classes; two passes over D_f; 2 x 3 batches of 16 of D_r
    ("neggrad", {"epochs": 2, "batch_size": 16, "alpha": 0.5}, "random",
     40 + 1 + 2 * 40, 256 + 2 * 3 * 16),
    # the number of classes, D_f's labels (one pass), two epochs of the union
    ("random_label", {"epochs": 2, "batch_size": 32}, "random",
     40 + 1 + 40 + 2 * 40, 256 + 2 * 300),
    # two epochs of D_f and half of D_r (labels unused: no class read)
    ("teacher", {"epochs": 2, "batch_size": 32, "retain_fraction": 0.5}, "random",
     40 + 2 * 40, 256 + 2 * 150),
    # one max-step pass over D_f, two min-step passes over D_r
    ("scrub", {"epochs": 2, "max_steps": 1, "batch_size": 32, "forget_batch_size": 16},
     "random", 40 + 1 + 40, 256 + 2 * 300),
    # classes read twice (saliency, new labels); one saliency pass; one epoch of the union
    ("salun", {"epochs": 1, "batch_size": 32, "grad_batch_size": 16}, "class",
     40 + 1 + 40 + 1 + 40, 256 + 300),
    ("sparse_mu", {"epochs": 2, "batch_size": 32}, "random", 40 + 1, 256 + 2 * 300),
    # batch-mean importance: D_f, then D_r followed by D_f (the authors' order); each pass
    # reads its first sample for the number of classes
    ("ssd", {}, "random", 40 + 1 + 40 + 40, 256 + 1 + 300),
    ("ssd", {"importance": "per_sample", "reference_set": "retain", "alpha": 1.5}, "class",
     40 + 40, 256 + 300),
    # the true Fisher: one pass over D_r per class (10); D_f's labels show several classes
    ("fisher_forgetting", {"fisher_batch_size": 64}, "random", 40 + 1 + 40, 256 + 1 + 10 * 300),
    # class forgetting: D_r's labels read to the end (no sample of class 3)
    ("fisher_forgetting", {}, "class", 40 + 1 + 40, 256 + 1 + 10 * 300 + 300),
    # the gold model: D_f only checked; two training epochs over D_r
    ("retrain", {"train_config": TrainConfig(epochs=2, batch_size=32, lr=0.01)}, "random",
     40, 256 + 2 * 300),
]


@pytest.mark.parametrize("name, kwargs, scenario, forget_reads, retain_reads", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_streamed_baseline_gives_the_in_memory_result_bitwise(
        bn_model, name, kwargs, scenario, forget_reads, retain_reads):
    forget, retain = _sets(scenario)
    memory = make_method(name, **kwargs)
    expected = memory.unlearn(bn_model, forget.materialised(), retain.materialised())
    assert forget.calls == retain.calls == 0
    streamed = make_method(name, **kwargs)
    assert streamed.streams
    got = streamed.unlearn(bn_model, forget, retain)
    _assert_bitwise(got, expected)
    assert streamed.info_ == memory.info_
    if name == "salun":
        assert all(torch.equal(streamed.mask_[k], memory.mask_[k]) for k in memory.mask_)
    if name == "fisher_forgetting":
        assert streamed.info_["forgotten_class_row"] == (3 if scenario == "class" else -1)
    # the weights moved (the comparison is not between two untouched copies)
    before, after = bn_model.state_dict(), got.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (forget.calls, retain.calls) == (forget_reads, retain_reads)


@pytest.mark.parametrize("name, kwargs", [
    ("neggrad", {"epochs": 1, "batch_size": 32, "alpha": 0.5}),  # two loaders alive at once
    ("random_label", {"epochs": 2, "batch_size": 64}),           # the union, set_epoch
])
def test_num_workers_do_not_change_a_baseline(bn_model, name, kwargs):
    results = []
    for workers in (0, 2):
        forget, retain = _sets(cls=PerEpoch)
        results.append(make_method(name, num_workers=workers, **kwargs).unlearn(
            bn_model, forget, retain))
        if name == "random_label":  # each epoch announced to both parts of the union
            assert forget.epochs_seen == retain.epochs_seen == [0, 1]
    _assert_bitwise(results[0], results[1])
    # an epoch-1 sample differs from its epoch-0 one, so epoch 1 did not reread epoch 0
    one, _ = _sets(cls=PerEpoch)
    assert not torch.equal(one.sample(0, 0)[0], one.sample(0, 1)[0])


def _dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(32, 10))


@pytest.mark.parametrize("name", ["random_label", "salun"])
def test_streamed_passes_leave_dropout_draws_alone(name):
    """The ordered passes before training (D_f's labels, the saliency) read through a
    ``DataLoader``, which draws a seed from torch's global generator: forked, so the fine-tune's
    dropout masks are those of the in-memory path."""
    model = _dropout_model()
    forget, retain = _sets()
    kwargs = {"epochs": 1, "batch_size": 32}
    expected = make_method(name, **kwargs).unlearn(model, forget.materialised(),
                                                  retain.materialised())
    _assert_bitwise(make_method(name, **kwargs).unlearn(model, forget, retain), expected)


# NegGrad+ reads D_r only as far as its steps need: 8 steps of 40 read one whole pass of D_r
BAD_CASES = [("neggrad", {"epochs": 8, "batch_size": 40, "alpha": 0.5}), ("scrub", {"epochs": 1}),
             ("sparse_mu", {"epochs": 1}), ("random_label", {"epochs": 1}),
             ("ssd", {"reference_set": "retain"}), ("fisher_forgetting", {})]


@pytest.mark.parametrize("name, kwargs", BAD_CASES, ids=[c[0] for c in BAD_CASES])
@pytest.mark.parametrize("what, match", [("nan", "NaN or infinite"), ("label", "labels from")])
def test_a_bad_retain_sample_after_the_first_batch_fails_as_it_is_read(bn_model, name, kwargs,
                                                                       what, match):
    forget = OnTheFly(N_FORGET, 1)
    retain = OnTheFly(N_RETAIN, 2, bad_at=290, what=what)  # beyond the 256 checked up front
    method = make_method(name, **kwargs)
    if name == "fisher_forgetting" and what == "label":
        # the true Fisher never reads D_r's labels (it sums over the model's classes), nor does
        # the class-row check when D_f holds several classes: nothing to refuse
        method.unlearn(bn_model, forget, retain)
        return
    with pytest.raises(DataError, match=match):
        method.unlearn(bn_model, forget, retain)


def test_streaming_baselines_take_loader_options_as_execution_options():
    shuffled = ("neggrad", "random_label", "teacher", "scrub", "salun", "sparse_mu")
    for name in shuffled + ("ssd", "fisher_forgetting"):
        plain = make_method(name).hyperparameters()
        assert make_method(name, num_workers=2).hyperparameters() == plain
        assert make_method(name, num_workers=2).num_workers == 2
        assert "num_workers" not in plain
        with pytest.raises(ConfigurationError, match="num_workers must be an integer >= 0"):
            make_method(name, num_workers=-1)
    for name in shuffled:
        assert make_method(name, pin_memory=True, persistent_workers=True).hyperparameters() \
            == make_method(name).hyperparameters()
        with pytest.raises(ConfigurationError, match="pin_memory must be True or False"):
            make_method(name, pin_memory="yes")


def test_persistent_workers_with_set_epoch_are_refused_by_the_union(bn_model):
    forget, retain = _sets(cls=PerEpoch)
    method = make_method("random_label", epochs=1, num_workers=1, persistent_workers=True)
    with pytest.raises(ConfigurationError, match="persistent_workers=False"):
        method.unlearn(bn_model, forget, retain)


def test_true_fisher_of_a_streamed_set_is_the_in_memory_one(bn_model):
    from deepclean.methods.fisher_forgetting import true_fisher_diagonal

    data = OnTheFly(50, 4)
    expected = true_fisher_diagonal(bn_model, data.materialised(), batch_size=16)
    got = true_fisher_diagonal(bn_model, data, batch_size=16)
    assert data.calls == 1 + 10 * 50  # the number of classes, then one pass per class
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert any(float(v.abs().max()) > 0 for v in got.values())
