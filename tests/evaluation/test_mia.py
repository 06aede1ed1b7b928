"""The MIA family: chance level on pure noise with unbalanced sets, never scoring fitted samples,
and a finite logit-scaled confidence.

Tolerances (stated once, for 10 seeds of uniform or Gaussian noise, member : non-member = 5 : 1):
- entropy LR (share of targets called member): each seed within 50 +- 5 points, and the same
  attack calls held-out members and held-out non-members "member" at rates within 8 points;
- MIA-efficacy (share called non-member): its RBF boundary on noise is arbitrary, so a single
  value can be far from 50; the mean over seeds is within 50 +- 10 and, per seed, held-out
  members and non-members are called non-member at rates within 5 points (no advantage);
- loss LR with cross-validation: each seed's held-out accuracy within 50 +- 7 (balanced sets of
  300; the standard deviation is about 2 points);
- LiRA: AUC within 0.5 +- 0.06 and TPR at 1 % FPR at most 4 % (chance is 1 %).
"""

import numpy as np
import pytest
import sklearn.linear_model
import sklearn.svm
import torch

from deepclean import build_model
from deepclean.data.splits import random_split
from deepclean.evaluation.metrics import membership_attack
from deepclean.evaluation.mia import (
    DIRECTIONS,
    lira_mia,
    lira_zscores,
    logit_confidence,
    loss_lr_mia,
    mia_efficacy,
    mia_family,
)
from deepclean.evaluation.outputs import build_reference, extended_metrics, model_outputs

SEEDS = range(10)


def noise(seed):
    r = np.random.default_rng(seed)
    return r, r.random(2000), r.random(400), r.random(1000), r.random(1000)


def test_entropy_lr_is_at_chance_on_noise_with_unbalanced_sets():
    for seed in SEEDS:
        _, member, non_member, target_in, target_out = noise(seed)
        called_in = membership_attack(member, non_member, target_in)
        called_out = membership_attack(member, non_member, target_out)
        assert abs(called_in - 50) <= 5
        assert abs(called_in - called_out) <= 8


def test_mia_efficacy_is_at_chance_on_noise_with_unbalanced_sets():
    values = []
    for seed in SEEDS:
        _, member, non_member, target_in, target_out = noise(seed)
        a = mia_efficacy(member, non_member, target_in, seed=seed)
        b = mia_efficacy(member, non_member, target_out, seed=seed)
        values.append(a)
        assert abs(a - b) <= 5
    assert abs(np.mean(values) - 50) <= 10


def test_loss_lr_is_at_chance_on_noise_with_unbalanced_sets():
    for seed in SEEDS:
        r = np.random.default_rng(seed)
        assert abs(loss_lr_mia(r.exponential(size=300), r.exponential(size=1500), seed=seed)
                   - 50) <= 7


def test_lira_is_at_chance_on_noise_with_unbalanced_sets():
    for seed in SEEDS:
        r = np.random.default_rng(seed)
        res = lira_mia(r.normal(size=300), r.normal(size=1500), r.normal(size=(4, 300)),
                       r.normal(size=(4, 1500)))
        assert abs(res.auc - 0.5) <= 0.06
        assert res.tpr_at_1fpr <= 4.0
        assert res.n_forget == 300 and res.n_test == 1500 and res.n_reference == 4


def test_lira_finds_a_remembered_sample_and_ranks_it_first():
    r = np.random.default_rng(0)
    ref_f, ref_t = r.normal(size=(5, 50)), r.normal(size=(5, 500))
    phi_f = r.normal(size=50)
    phi_f[7] = 40.0  # the model is far more confident on this one than any gold model
    res = lira_mia(phi_f, r.normal(size=500), ref_f, ref_t, forget_index=np.arange(100, 150))
    assert res.top_remembered[0]["index"] == 107
    # members shifted up are detected
    strong = lira_mia(r.normal(size=50) + 5, r.normal(size=500), ref_f, ref_t)
    assert strong.auc > 0.95 and strong.tpr_at_1fpr > 30


def test_lira_zscore_of_a_sample_uses_only_that_sample_reference():
    r = np.random.default_rng(1)
    ref = r.normal(size=(3, 20))
    z = lira_zscores(np.zeros(20), ref)
    ref2 = ref.copy()
    ref2[:, 5] += 100.0
    z2 = lira_zscores(np.zeros(20), ref2)
    changed = np.flatnonzero(z != z2)
    assert changed.tolist() == [5]


class Recorder:
    """Stands in for a scikit-learn classifier, recording what it is fitted on and applied to."""

    log: list = []

    def __init__(self, real):
        self.real = real

    def fit(self, x, y):
        Recorder.log.append(("fit", np.array(x), np.array(y)))
        self.real.fit(x, y)
        return self

    def predict(self, x):
        Recorder.log.append(("predict", np.array(x), None))
        return self.real.predict(x)

    def predict_proba(self, x):
        Recorder.log.append(("predict", np.array(x), None))
        return self.real.predict_proba(x)


def _patch(monkeypatch, module, name):
    real = getattr(module, name)
    Recorder.log = []
    monkeypatch.setattr(module, name, lambda *a, **k: Recorder(real(*a, **k)))


def _values(a):
    return set(np.round(a.ravel(), 12).tolist())


def test_entropy_lr_never_scores_fitted_samples(monkeypatch):
    _patch(monkeypatch, sklearn.linear_model, "LogisticRegression")
    r = np.random.default_rng(0)
    member, non_member, target = r.random(300), r.random(50), r.random(40)
    membership_attack(member, non_member, target)
    (kind1, xfit, yfit), (kind2, xpred, _) = Recorder.log
    assert (kind1, kind2) == ("fit", "predict")
    assert len(xfit) == 350 and len(xpred) == 40
    assert not _values(xfit) & _values(xpred)


def test_mia_efficacy_fits_equal_sized_samples_and_scores_only_the_forget_set(monkeypatch):
    _patch(monkeypatch, sklearn.svm, "SVC")
    r = np.random.default_rng(0)
    retain, test, forget = r.random(500), r.random(120), r.random(60)
    mia_efficacy(retain, test, forget, seed=3)
    (_, xfit, yfit), (_, xpred, _) = Recorder.log
    assert len(xfit) == 240 and (yfit == 1).sum() == 120 and (yfit == 0).sum() == 120
    assert _values(xfit[yfit == 0]) == _values(test)  # all 120 test samples (the smaller set)
    assert _values(xfit[yfit == 1]) <= _values(retain)
    assert np.array_equal(xpred.ravel(), forget)
    assert not _values(xfit) & _values(xpred)
    # the explicit seed makes it reproducible; another seed draws another retain sample
    first = Recorder.log[0][1]
    Recorder.log = []
    mia_efficacy(retain, test, forget, seed=3)
    assert np.array_equal(Recorder.log[0][1], first)


def test_loss_lr_predicts_each_balanced_sample_once_on_held_out_folds_only(monkeypatch):
    _patch(monkeypatch, sklearn.linear_model, "LogisticRegression")
    r = np.random.default_rng(0)
    forget, test = r.exponential(size=70), r.exponential(size=400)
    loss_lr_mia(forget, test, seed=0, n_splits=5)
    fits = [e for e in Recorder.log if e[0] == "fit"]
    preds = [e for e in Recorder.log if e[0] == "predict"]
    assert len(fits) == len(preds) == 5
    predicted = np.concatenate([p[1].ravel() for p in preds])
    assert len(predicted) == 140 and len(_values(predicted)) == 140  # balanced 70 + 70, once each
    for (_, xfit, yfit), (_, xpred, _) in zip(fits, preds):
        assert not _values(xfit) & _values(xpred)
        assert (yfit == 1).sum() == (yfit == 0).sum()  # stratified folds of balanced sets


def test_phi_is_finite_where_the_softmax_saturates():
    logits = torch.tensor([[200.0, -200.0, 0.0], [200.0, -200.0, 0.0], [1.0, 2.0, 3.0]])
    y = torch.tensor([0, 1, 2])
    phi = logit_confidence(logits, y)
    assert torch.isfinite(phi).all()
    p = torch.softmax(logits, 1)  # float32, as the harness's probabilities
    assert p[0, 0] == 1.0 and p[1, 1] == 0.0  # log(p / (1 - p)) would be inf / -inf here
    assert phi[0] == pytest.approx(200.0, abs=1e-9)  # 200 - logsumexp(-200, 0)
    assert phi[1] == pytest.approx(-400.0, abs=1e-9)
    p3 = torch.softmax(logits.double(), 1)[2, 2]
    assert phi[2] == pytest.approx(float(torch.log(p3 / (1 - p3))), rel=1e-12)


def test_directions_are_stated_for_every_reported_value():
    assert set(DIRECTIONS) == {"entropy_lr", "efficacy", "loss_lr_accuracy", "lira_auc",
                               "lira_tpr_at_1fpr"}
    for text in DIRECTIONS.values():
        assert "ideal" in text


def test_mia_family_without_two_gold_models_reports_lira_as_none_with_a_reason():
    g = torch.Generator().manual_seed(0)
    z = lambda n: torch.randn(n, 4, generator=g)  # noqa: E731
    y = lambda n: torch.randint(0, 4, (n,), generator=g)  # noqa: E731
    out = mia_family(z(50), y(50), z(20), y(20), z(40), y(40), reference_forget=[z(20)],
                     reference_test=[z(40)])
    assert out["lira"] is None and "at least 2" in out["lira_reason"]
    assert set(out) == {"entropy_lr", "efficacy", "loss_lr_accuracy", "loss_lr_reason", "lira",
                        "lira_reason"}
    assert out["loss_lr_reason"] is None


def test_gold_model_is_never_its_own_lira_reference():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 1, 8, 8, generator=g), torch.randint(0, 4, (60,), generator=g)
    xt, yt = torch.randn(30, 1, 8, 8, generator=g), torch.randint(0, 4, (30,), generator=g)
    split = random_split(60, 0.25, seed=0)
    models = [build_model("small_cnn", in_channels=1, num_classes=4, width=0.25, seed=s)
              for s in range(4)]
    outs = [model_outputs(m, x, xt) for m in models]
    ref = build_reference(gold=models[0], gold_outputs=outs[0], split=split,
                          extra=list(zip(models[1:3], outs[1:3])))
    as_gold = extended_metrics(models[0], outs[0], ref, split=split, y_train=y, y_test=yt,
                               is_gold=True)
    other = extended_metrics(models[3], outs[3], ref, split=split, y_train=y, y_test=yt)
    assert as_gold["mia_family"]["lira"]["n_reference"] == 2
    assert other["mia_family"]["lira"]["n_reference"] == 3
