"""Training-based unlearning methods: NegGrad, RandomLabel, Bad Teacher, SCRUB, SalUn.

Checks of issue 3 (KL loss value, random wrong labels, teacher targets paired with their samples
under shuffling) and, per method, a quick run on a tiny model that memorised noise.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import deepclean
from deepclean.data.models import build_model
from deepclean.errors import ConfigurationError, DataError
from deepclean.methods import scrub as scrub_module
from deepclean.methods import teacher as teacher_module
from deepclean.methods.losses import distillation_kl
from deepclean.methods.random_label import random_wrong_labels, wrong_label_distribution
from deepclean.training import TrainConfig, train_model

# ----------------------------------------------------------------------------- the KL loss


def test_distillation_kl_is_batch_mean_kl():
    student = torch.zeros(2, 4)
    teacher = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 2)
    value = float(distillation_kl(student, teacher))
    assert value == pytest.approx(0.44585, abs=1e-4)  # "mean" reduction would give 0.11146
    expected = float((teacher[0] * (teacher[0] / 0.25).log()).sum())
    assert value == pytest.approx(expected, abs=1e-6)


def test_distillation_kl_of_a_distribution_with_itself_is_zero():
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.4, 0.1], [1.0, 0.0, 0.0, 0.0]])
    logits = p.clamp_min(1e-30).log()
    assert float(distillation_kl(logits, p)) == pytest.approx(0.0, abs=1e-6)


def test_distillation_kl_temperature_softens_the_student_only():
    student = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    target = torch.softmax(student / 4.0, dim=1)
    assert float(distillation_kl(student, target, temperature=4.0)) == pytest.approx(0, abs=1e-6)
    assert float(distillation_kl(student, target, temperature=1.0)) > 0.01


# ----------------------------------------------------------------------------- random labels


def test_random_wrong_labels_on_three_classes():
    labels = torch.randint(1, 3, (3000,), generator=torch.Generator().manual_seed(123))
    new = random_wrong_labels(labels, 3, torch.Generator().manual_seed(0))
    assert new.shape == labels.shape and new.dtype == torch.long
    assert not bool((new == new[0]).all())
    counts = torch.bincount(new, minlength=3)
    assert all(900 <= int(c) <= 1100 for c in counts), counts
    assert not bool((new == labels).any())
    again = random_wrong_labels(labels, 3, torch.Generator().manual_seed(0))
    assert torch.equal(new, again)


def test_random_wrong_labels_for_one_class_are_uniform_over_the_others():
    labels = torch.full((3000,), 2)
    new = random_wrong_labels(labels, 4, torch.Generator().manual_seed(0))
    counts = torch.bincount(new, minlength=4)
    assert int(counts[2]) == 0
    assert all(900 <= int(counts[c]) <= 1100 for c in (0, 1, 3)), counts


def test_wrong_label_distribution_rows_and_marginal():
    labels = torch.tensor([0] * 50 + [1] * 30 + [3] * 20)
    q = wrong_label_distribution(labels, 4)
    assert torch.all(q.diagonal() == 0)
    assert torch.allclose(q.sum(1), torch.ones(4, dtype=torch.float64))
    prior = torch.bincount(labels, minlength=4).double() / labels.numel()
    assert torch.allclose(prior @ q, torch.full((4,), 0.25, dtype=torch.float64), atol=1e-9)
    plain = wrong_label_distribution(labels, 4, balanced=False)
    assert torch.allclose(plain, (1 - torch.eye(4, dtype=torch.float64)) / 3)


def test_random_wrong_labels_rejects_bad_input():
    with pytest.raises(DataError, match="at least 2 classes"):
        random_wrong_labels(torch.zeros(3, dtype=torch.long), 1, torch.Generator())
    with pytest.raises(DataError, match="labels in"):
        random_wrong_labels(torch.tensor([0, 5]), 3, torch.Generator())


# ----------------------------------------------------------------------------- teacher pairing

N_CLASSES = 10
SCALE = 1e4  # exp(-1e4 / T) underflows to 0: the teachers' probabilities are exact one-hots


class IdNet(nn.Module):
    """Logits ``SCALE * one_hot((id + shift) mod C)`` where ``id = x[:, 0, 0, 0]``, plus a small
    trainable term (so a student copy trains) through a BatchNorm layer (buffers to watch)."""

    def __init__(self, shift: int = 0) -> None:
        super().__init__()
        self.shift = shift
        self.lin = nn.Linear(1, N_CLASSES)
        self.bn = nn.BatchNorm1d(N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x[:, 0, 0, 0].round().long()
        onehot = nn.functional.one_hot((ids + self.shift) % N_CLASSES, N_CLASSES).float()
        return SCALE * onehot + 0.01 * self.bn(self.lin(x[:, 0, 1, 1:2]))


def id_data():
    """D_f: 30 samples whose id mod 10 is in 0..4; D_r: 100 samples whose id mod 10 is in 5..9."""
    ids = torch.arange(400)
    forget_ids = ids[ids % 10 < 5][:30]
    retain_ids = ids[ids % 10 >= 5][:100]

    def make(id_values):
        x = torch.zeros(len(id_values), 1, 4, 4)
        x[:, 0, 0, 0] = id_values.float()
        x[:, 0, 1, 1] = torch.linspace(-1, 1, len(id_values))
        return TensorDataset(x, id_values % N_CLASSES)

    return make(forget_ids), make(retain_ids), forget_ids, retain_ids


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_bad_teacher_pairs_every_target_with_its_own_sample(monkeypatch):
    forget, retain, forget_ids, _ = id_data()
    model, bad = IdNet(shift=0), IdNet(shift=1)
    model_before, bad_before = snapshot(model), snapshot(bad)
    records, losses, teachers = [], [], {}
    real_targets, real_kl = teacher_module.bad_teacher_targets, teacher_module.distillation_kl

    def recording_targets(competent, incompetent, x, is_forget, *, temperature):
        if not teachers:
            teachers.update(competent=(competent, snapshot(competent)),
                            incompetent=(incompetent, snapshot(incompetent)))
        out = real_targets(competent, incompetent, x, is_forget, temperature=temperature)
        records.append((x.clone(), is_forget.clone(), out.clone()))
        return out

    def recording_kl(student_logits, teacher_probs, temperature=1.0):
        losses.append((student_logits.detach().argmax(1), teacher_probs.argmax(1)))
        return real_kl(student_logits, teacher_probs, temperature)

    monkeypatch.setattr(teacher_module, "bad_teacher_targets", recording_targets)
    monkeypatch.setattr(teacher_module, "distillation_kl", recording_kl)
    method = deepclean.BadTeacher(epochs=2, lr=1e-2, batch_size=16, retain_fraction=0.3,
                                  incompetent_teacher=bad, seed=0)
    out = method.unlearn(model, forget, retain)

    seen = torch.cat([x[:, 0, 0, 0].long() for x, _, _ in records])
    assert sorted(seen.tolist()) != seen.tolist()  # the loader did shuffle
    assert len(seen) == 2 * (30 + 30)
    for x, is_forget, targets in records:
        ids = x[:, 0, 0, 0].round().long()
        assert torch.equal(is_forget.bool(), torch.isin(ids, forget_ids))
        expected = nn.functional.one_hot((ids + is_forget.long()) % N_CLASSES, N_CLASSES).float()
        assert torch.equal(targets, expected)
    for student_class, target_class in losses:  # the student saw the sample of its target
        is_forget = student_class < 5
        assert torch.equal(target_class, (student_class + is_forget.long()) % N_CLASSES)
    for module, before in teachers.values():
        assert not module.training
        assert_same_state(module, before)
    assert_same_state(bad, bad_before)
    assert_same_state(model, model_before)
    assert bad.training and model.training  # the caller's modules keep their mode
    assert not torch.equal(out.lin.weight, model.lin.weight)  # the student did train


def test_scrub_pairs_every_target_with_its_own_sample(monkeypatch):
    forget, retain, _, _ = id_data()
    model = IdNet(shift=0)
    model_before = snapshot(model)
    records, losses, teachers = [], [], []
    real_probs, real_kl = scrub_module.teacher_probabilities, scrub_module.distillation_kl

    def recording_probs(teacher, x, temperature=1.0):
        if not teachers:
            teachers.append((teacher, snapshot(teacher)))
        out = real_probs(teacher, x, temperature)
        records.append((x.clone(), out.clone()))
        return out

    def recording_kl(student_logits, teacher_probs, temperature=1.0):
        losses.append((student_logits.detach().argmax(1), teacher_probs.argmax(1)))
        return real_kl(student_logits, teacher_probs, temperature)

    monkeypatch.setattr(scrub_module, "teacher_probabilities", recording_probs)
    monkeypatch.setattr(scrub_module, "distillation_kl", recording_kl)
    method = deepclean.SCRUB(epochs=3, max_steps=2, lr=1e-2, batch_size=32,
                             forget_batch_size=8, seed=0)
    out = method.unlearn(model, forget, retain)

    assert len(records) == 2 * 4 + 3 * 4  # D_f batches in 2 max epochs, D_r batches in 3
    seen = torch.cat([x[:, 0, 0, 0].long() for x, _ in records])
    assert sorted(seen.tolist()) != seen.tolist()
    for x, targets in records:
        ids = x[:, 0, 0, 0].round().long()
        assert torch.equal(targets, nn.functional.one_hot(ids % N_CLASSES, N_CLASSES).float())
    for student_class, target_class in losses:
        assert torch.equal(student_class, target_class)
    (teacher, before), = teachers
    assert not teacher.training
    assert_same_state(teacher, before)
    assert_same_state(model, model_before)
    assert not torch.equal(out.lin.weight, model.lin.weight)


def test_bad_teacher_default_incompetent_teacher_is_a_fresh_network(monkeypatch):
    forget, retain, _, _ = id_data()
    model = build_model("small_cnn", in_channels=1, num_classes=N_CLASSES, width=0.25, seed=0)
    teachers = []
    real = teacher_module.bad_teacher_targets

    def spy(competent, incompetent, x, is_forget, *, temperature):
        teachers.append((competent, incompetent))
        return real(competent, incompetent, x, is_forget, temperature=temperature)

    monkeypatch.setattr(teacher_module, "bad_teacher_targets", spy)
    deepclean.BadTeacher(seed=3).unlearn(model, forget, retain)
    competent, incompetent = teachers[0]
    original = model.state_dict()
    for key, value in competent.state_dict().items():
        assert torch.equal(value, original[key])
    for name, value in incompetent.named_parameters():
        if value.ndim > 1:  # convolution and linear weights (BatchNorm's start at 1 and 0 anyway)
            assert not torch.equal(value, dict(model.named_parameters())[name]), name
    bn = [m for m in incompetent.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn and all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in bn)


# ----------------------------------------------------------------------------- per method

N_TOTAL, N_FORGET, C = 160, 32, 4


@pytest.fixture(scope="module")
def memorised():
    """A small CNN with BatchNorm that memorised 160 noise images with random labels."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N_TOTAL, 1, 8, 8, generator=gen)
    y = torch.randint(0, C, (N_TOTAL,), generator=gen)
    model = build_model("small_cnn", in_channels=1, num_classes=C, width=0.25, seed=0)
    train_model(model, x, y, TrainConfig(epochs=24, lr=0.05, batch_size=32, weight_decay=0.0),
                seed=0, progress=False)
    forget = TensorDataset(x[:N_FORGET], y[:N_FORGET])
    retain = TensorDataset(x[N_FORGET:], y[N_FORGET:])
    assert accuracy_of(model, forget) == 1.0 and accuracy_of(model, retain) == 1.0
    return model, forget, retain


def accuracy_of(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def forget_loss_of(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model.eval()(x), y))


# Settings that move a model of this size within a few steps (the defaults are for real data).
QUICK = {
    "neggrad": dict(optimizer="adam", lr=1e-3, epochs=5, batch_size=16),
    "random_label": dict(lr=1e-2, epochs=5, batch_size=16),
    "teacher": dict(lr=1e-2, epochs=5, batch_size=32),
    "scrub": dict(lr=5e-3, epochs=4, max_steps=2, batch_size=32, forget_batch_size=8),
    "salun": dict(lr=1e-2, epochs=5, batch_size=16),
}
OURS = sorted(QUICK)


@pytest.fixture(scope="module")
def quick_run(memorised):
    """``quick_run(name)``: the method (seed 0, :data:`QUICK` settings) and its result, run once."""
    cache = {}

    def run(name):
        if name not in cache:
            model, forget, retain = memorised
            method = deepclean.make_method(name, seed=0, **QUICK[name])
            cache[name] = (method, method.unlearn(model, forget, retain))
        return cache[name]

    return run


@pytest.mark.parametrize("name", OURS)
def test_method_contract_on_a_tiny_model(name, memorised, quick_run):
    model, forget, retain = memorised
    before = snapshot(model)
    method, first = quick_run(name)
    assert first is not model
    assert_same_state(model, before)
    assert not first.training
    second = deepclean.make_method(name, seed=0, **QUICK[name]).unlearn(model, forget, retain)
    state = second.state_dict()
    for key, value in first.state_dict().items():
        assert torch.equal(value, state[key]), key
    other = deepclean.make_method(name, seed=1, **QUICK[name]).unlearn(model, forget, retain)
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in state.items())
    assert type(method).summary and type(method).reference
    assert name in deepclean.available_methods()


@pytest.mark.parametrize("name", OURS)
def test_method_with_frozen_batchnorm_leaves_its_buffers(name, memorised):
    model, forget, retain = memorised
    out = deepclean.make_method(name, bn_stats="freeze", **QUICK[name]).unlearn(
        model, forget, retain
    )
    original = dict(model.named_buffers())
    for key, value in out.named_buffers():
        assert torch.equal(value, original[key]), key


def test_neggrad_raises_the_forget_loss(memorised, quick_run):
    model, forget, retain = memorised
    _, out = quick_run("neggrad")
    assert forget_loss_of(out, forget) > forget_loss_of(model, forget) + 1.0
    assert accuracy_of(out, forget) < 0.9
    plus = deepclean.NegGrad(alpha=0.5, **QUICK["neggrad"]).unlearn(model, forget, retain)
    assert forget_loss_of(plus, forget) > forget_loss_of(model, forget) + 0.5
    assert accuracy_of(plus, retain) > accuracy_of(out, retain)


def test_random_label_forgets_a_memorised_forget_set(memorised, quick_run):
    model, forget, retain = memorised
    method, out = quick_run("random_label")
    assert accuracy_of(out, forget) < 0.5
    assert accuracy_of(out, retain) > 0.9
    assert method.info_["n_relabelled"] == N_FORGET


def test_bad_teacher_forgets_and_keeps_the_retain_set(memorised, quick_run):
    model, forget, retain = memorised
    _, out = quick_run("teacher")
    assert accuracy_of(out, forget) < 0.7
    assert accuracy_of(out, retain) > accuracy_of(out, forget)


def test_scrub_forgets_more_than_it_loses_on_the_retain_set(memorised, quick_run):
    model, forget, retain = memorised
    _, out = quick_run("scrub")
    assert accuracy_of(out, forget) < 0.8
    assert accuracy_of(out, retain) > accuracy_of(out, forget) + 0.1


def test_salun_moves_only_salient_weights(memorised, quick_run):
    model, forget, retain = memorised
    method, out = quick_run("salun")
    mask = method.mask_
    assert method.info_["share_salient"] == pytest.approx(0.5, abs=1e-3)
    original = dict(model.named_parameters())
    moved = 0
    for name, p in out.named_parameters():
        keep = ~mask[name]
        assert torch.equal(p.detach()[keep], original[name].detach()[keep]), name
        moved += int((p.detach() != original[name].detach())[mask[name]].sum())
    assert moved > 0
    assert accuracy_of(out, forget) < 0.5
    assert accuracy_of(out, retain) > 0.9


def test_saliency_mask_selects_the_largest_gradients(memorised):
    model, forget, _ = memorised
    x, y = forget.tensors
    mask = deepclean.methods.saliency_mask(copy.deepcopy(model), x, y, ratio=0.25, batch_size=7)
    work = copy.deepcopy(model).eval()
    nn.functional.cross_entropy(work(x), y).backward()
    grads = torch.cat([p.grad.abs().reshape(-1) for p in work.parameters()])
    chosen = torch.cat([m.reshape(-1) for m in mask.values()])
    assert int(chosen.sum()) == round(0.25 * grads.numel())
    assert float(grads[chosen].min()) >= float(grads[~chosen].max()) * (1 - 1e-4)


def test_random_label_with_classes_missing_from_the_forget_set(memorised):
    model, forget, retain = memorised
    x, y = forget.tensors
    keep = y != 0  # D_f without class 0; its new labels must still never be the true ones
    method = deepclean.RandomLabel(epochs=0)
    method.unlearn(model, TensorDataset(x[keep], y[keep]), retain)
    assert method.info_["n_relabelled"] == int(keep.sum())


def test_bad_teacher_refuses_a_teacher_with_other_classes(memorised):
    model, forget, retain = memorised
    other = build_model("small_cnn", in_channels=1, num_classes=C + 1, width=0.25, seed=1)
    with pytest.raises(DataError, match="classes"):
        deepclean.BadTeacher(incompetent_teacher=other).unlearn(model, forget, retain)


@pytest.mark.parametrize(
    "name, bad",
    [
        ("neggrad", dict(alpha=1.0)),
        ("neggrad", dict(optimizer="rmsprop")),
        ("random_label", dict(epochs=-1)),
        ("teacher", dict(retain_fraction=0.0)),
        ("teacher", dict(incompetent_teacher="resnet")),
        ("scrub", dict(temperature=0)),
        ("scrub", dict(alpha=-1.0)),
        ("salun", dict(saliency_ratio=1.5)),
        ("salun", dict(bn_stats="train")),
    ],
)
def test_invalid_hyperparameters_are_refused(name, bad):
    with pytest.raises(ConfigurationError, match="got"):
        deepclean.make_method(name, **bad)
