"""Evaluation of any map-style Dataset: a data set whose samples are built on the fly (not a
TensorDataset) is read through a DataLoader one batch at a time and gives the same outputs and
metrics as tensors of the same samples; a TensorDataset gives exactly today's numbers."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from deepclean import ConfigurationError, DataError, build_model
from deepclean.data.datasets import iterate_batches
from deepclean.data.splits import random_split
from deepclean.evaluation import (
    accuracy,
    build_reference,
    evaluate,
    evaluate_model,
    memorisation,
    model_outputs,
    predict_logits,
    predict_proba,
    sample_outputs,
)
from deepclean.evaluation.mia import cross_entropy_loss
from deepclean.evaluation.verdict import forgetting_verdict
from deepclean.fisher.diagonal import eval_mode

N_TRAIN, N_TEST = 150, 90


class OnTheFly(Dataset):
    """Sample ``i`` is built when read: an input ``(1, 8, 8)`` from a generator seeded with
    ``offset + i`` and the label ``(offset + i) * 7 % 10``. Records the indices read."""

    def __init__(self, n: int, offset: int = 0) -> None:
        self.n, self.offset = n, offset
        self.reads: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.reads.append(i)
        g = torch.Generator().manual_seed(self.offset + i)
        return torch.randn(1, 8, 8, generator=g), (self.offset + i) * 7 % 10

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        items = [OnTheFly.__getitem__(self, i) for i in range(self.n)]
        self.reads.clear()
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _model(seed: int) -> torch.nn.Module:
    return build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=seed)


@pytest.fixture(scope="module")
def case():
    train, test = OnTheFly(N_TRAIN), OnTheFly(N_TEST, offset=10_000)
    return {"model": _model(0), "train": train, "test": test, "tensors_train": train.tensors(),
            "tensors_test": test.tensors(), "split": random_split(N_TRAIN, 0.2, seed=0)}


def _todays_logits(model, x, batch_size=1000):
    """predict_logits before Datasets were accepted: batches of in-memory tensors."""
    with torch.no_grad(), eval_mode(model):
        return torch.cat([model(xb).float() for _, xb, _ in
                          iterate_batches(x, torch.zeros(x.shape[0]), batch_size=batch_size)])


def test_tensors_and_a_tensor_dataset_give_todays_numbers(case) -> None:
    model, (x, y) = case["model"], case["tensors_train"]
    want = _todays_logits(model, x, batch_size=64)
    assert torch.equal(predict_logits(model, x, batch_size=64), want)
    assert torch.equal(predict_logits(model, TensorDataset(x, y), batch_size=64), want)
    out = sample_outputs(model, Subset(TensorDataset(x, y), range(10, 50)), batch_size=64)
    assert torch.equal(out.logits, _todays_logits(model, x[10:50], batch_size=64))
    assert torch.equal(out.labels, y[10:50])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_on_the_fly_dataset_streams_in_batches(case, num_workers) -> None:
    model, (x, y) = case["model"], case["tensors_train"]
    data = OnTheFly(N_TRAIN)
    sizes = []
    hook = model.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    try:
        out = sample_outputs(model, data, batch_size=32, num_workers=num_workers)
    finally:
        hook.remove()
    assert sizes == [32, 32, 32, 32, 22]  # one batch at a time, every sample once
    if num_workers == 0:
        assert data.reads == list(range(N_TRAIN))  # in the data set's order
    assert torch.equal(out.labels, y)
    want = predict_logits(model, x, batch_size=32)
    assert (out.logits - want).abs().max().item() <= 1e-6
    assert (out.losses - cross_entropy_loss(want, y)).abs().max().item() <= 1e-6
    assert torch.equal(out.correct, want.argmax(1) == y)
    assert out.probs.shape == (N_TRAIN, 10)


def test_accuracy_of_a_model_on_a_dataset(case) -> None:
    model, (x, y) = case["model"], case["tensors_train"]
    want = accuracy(predict_proba(model, x), y)
    assert accuracy(model, case["train"]) == want
    assert accuracy(model, TensorDataset(x, y), batch_size=7) == want
    with pytest.raises(ConfigurationError, match="no options"):
        accuracy(predict_proba(model, x), y, batch_size=7)


def test_evaluate_on_datasets_gives_the_tensor_metrics(case) -> None:
    model, split = case["model"], case["split"]
    (xtr, ytr), (xte, yte) = case["tensors_train"], case["tensors_test"]
    gold, other = _model(1), _model(2)
    tensors = dict(x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, split=split)
    reference = build_reference(gold=gold, gold_outputs=model_outputs(gold, xtr, xte),
                                split=split, original=model,
                                extra=[(other, model_outputs(other, xtr, xte))])
    want = evaluate(model, reference=reference, seed=3, **tensors)
    got = evaluate(model, x_train=case["train"], x_test=case["test"], split=split,
                   reference=reference, seed=3)
    for key in ("acc_retain", "acc_forget", "acc_test"):  # accuracies: exact
        assert got[0][key] == want[0][key], key
    assert got[0]["mia"] == pytest.approx(want[0]["mia"], abs=1e-6)
    fam_got, fam_want = got[1]["mia_family"], want[1]["mia_family"]
    for key in ("entropy_lr", "efficacy", "loss_lr_accuracy"):
        assert fam_got[key] == pytest.approx(fam_want[key], abs=1e-6), key
    for key in ("auc", "tpr_at_1fpr"):
        assert fam_got["lira"][key] == pytest.approx(fam_want["lira"][key], abs=1e-6), key
    assert got[1]["distances"].keys() == want[1]["distances"].keys()
    only = evaluate_model(model, x_train=case["train"], x_test=TensorDataset(xte, yte),
                          split=split)
    assert only == pytest.approx(want[0], abs=1e-6)
    assert [only[k] for k in ("acc_retain", "acc_test")] == \
        [want[0][k] for k in ("acc_retain", "acc_test")]


def test_memorisation_of_datasets_equals_tensors(case) -> None:
    model = case["model"]
    (xtr, ytr), (xte, yte) = case["tensors_train"], case["tensors_test"]
    for max_samples in (5000, 60):  # all samples, and a seeded draw of 60 of each
        want = memorisation(model, xtr, ytr, xte, yte, max_samples=max_samples, seed=4)
        got = memorisation(model, case["train"], case["test"], max_samples=max_samples, seed=4)
        assert got.keys() == want.keys()
        for key, value in want.items():
            if key.startswith(("acc", "n_", "too")):
                assert got[key] == value, key
            else:
                assert got[key] == pytest.approx(value, abs=1e-6), key


def test_forgetting_verdict_of_streamed_data_equals_in_memory(case) -> None:
    model, original = _model(3), case["model"]
    (xtr, ytr), (xte, yte) = case["tensors_train"], case["tensors_test"]
    forget = case["split"].forget.tolist()
    kept = [i for i in range(N_TEST) if int(yte[i]) != 0]
    want = forgetting_verdict(model, TensorDataset(xtr[forget], ytr[forget]),
                              TensorDataset(xte, yte), original=original,
                              retained_holdout=TensorDataset(xte[kept], yte[kept]), batch_size=32)
    got = forgetting_verdict(model, Subset(case["train"], forget), case["test"],
                             original=original, retained_holdout=Subset(case["test"], kept),
                             batch_size=32)
    assert (got.forgotten, got.utility_kept, got.scenario) == \
        (want.forgotten, want.utility_kept, want.scenario)
    for key, value in want.metrics.items():
        assert got.metrics[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key
    assert got.metrics["acc_forget"] == want.metrics["acc_forget"]


def test_bad_data_and_options_are_reported(case) -> None:
    model, (x, y) = case["model"], case["tensors_train"]
    with pytest.raises(DataError, match="TensorDataset"):
        sample_outputs(model, x)
    with pytest.raises(DataError, match="no samples"):
        sample_outputs(model, OnTheFly(0))
    with pytest.raises(DataError, match="sized"):
        predict_logits(model, iter([(x[0], 1)]))
    with pytest.raises(ConfigurationError, match="num_workers"):
        predict_logits(model, case["train"], num_workers=-1)
    with pytest.raises(ConfigurationError, match="batch_size"):
        predict_logits(model, x, batch_size=0)
    with pytest.raises(ConfigurationError, match="init_process_group"):
        predict_logits(model, x, distributed=True)
    with pytest.raises(ConfigurationError, match="y_train=None"):
        evaluate_model(model, x_train=case["train"], y_train=y, x_test=case["test"],
                       split=case["split"])
    with pytest.raises(ConfigurationError, match="y_test is required"):
        evaluate_model(model, x_train=x, y_train=y, x_test=case["tensors_test"][0],
                       split=case["split"])
    with pytest.raises(ConfigurationError, match="not a mix"):
        memorisation(model, case["train"], y, x, y)
