"""The forgetting verdict, matched held-out sets, and the memorisation measure on the verdict's cases.

Models are small MLPs trained full-batch on Gaussian clusters (seconds on a 2-core CPU). A model
"that did not forget" is the original trained on D_f; a model "that never saw D_f" stands in for
gold.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from deepclean.errors import ConfigurationError, DataError
from deepclean.evaluation.memorisation import MIN_ACC_GAP, memorisation
from deepclean.evaluation.verdict import (
    ForgettingVerdict,
    forgetting_verdict,
    matched_holdout,
)

K, D = 4, 10


def _clusters(n_per_class: int, seed: int, *, noise: float = 0.0):
    """Gaussian clusters, K classes, D dims; ``noise`` = share of labels replaced at random."""
    g = torch.Generator().manual_seed(seed)
    means = 2.5 * torch.randn(K, D, generator=torch.Generator().manual_seed(99))
    y = torch.arange(K).repeat_interleave(n_per_class)
    x = means[y] + torch.randn(len(y), D, generator=g)
    if noise:
        flip = torch.rand(len(y), generator=g) < noise
        y = torch.where(flip, torch.randint(0, K, (len(y),), generator=g), y)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def _train(x, y, *, hidden: int, steps: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, hidden), nn.ReLU(), nn.Linear(hidden, K))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def class_case():
    """Class forgetting of class 0: original trained on every class, gold without class 0."""
    x, y = _clusters(60, seed=1)
    xh, yh = _clusters(60, seed=2)
    original = _train(x, y, hidden=32, steps=200, seed=0)
    keep = y != 0
    gold = _train(x[keep], y[keep], hidden=32, steps=200, seed=0)
    forget = TensorDataset(x[~keep], y[~keep])
    holdout = TensorDataset(xh, yh)  # a whole pool: matched to class 0 inside the verdict
    retained = TensorDataset(xh[yh != 0], yh[yh != 0])
    return original, gold, forget, holdout, retained


@pytest.fixture(scope="module")
def random_case():
    """Random forgetting with 30 % label noise: a wide MLP memorises its training set."""
    x, y = _clusters(100, seed=23, noise=0.3)
    xh, yh = _clusters(100, seed=24, noise=0.3)
    is_f = torch.zeros(len(y), dtype=torch.bool)
    is_f[torch.randperm(len(y), generator=torch.Generator().manual_seed(5))[:80]] = True
    original = _train(x, y, hidden=256, steps=600, seed=0)
    gold = _train(x[~is_f], y[~is_f], hidden=256, steps=600, seed=0)
    return (original, gold, TensorDataset(x[is_f], y[is_f]), TensorDataset(x[~is_f], y[~is_f]),
            TensorDataset(xh, yh))


def test_matched_holdout_class_mix_random_mix_and_determinism():
    g = torch.Generator().manual_seed(0)
    holdout_y = torch.randint(0, 5, (1000,), generator=g)
    # class forgetting: every held-out sample of the class, nothing else
    idx = matched_holdout(holdout_y, torch.full((37,), 3), seed=0)
    assert torch.equal(idx, torch.nonzero(holdout_y == 3).squeeze(1))
    # a label mix of 2:1:0:0:1 is reproduced to within one sample per class
    forget_y = torch.tensor([0] * 20 + [1] * 10 + [4] * 10)
    idx = matched_holdout(holdout_y, forget_y, seed=7)
    counts = torch.bincount(holdout_y[idx], minlength=5)
    assert counts[2] == 0 and counts[3] == 0
    scarcest = min(int((holdout_y == 0).sum()) / 20, int((holdout_y == 1).sum()) / 10,
                   int((holdout_y == 4).sum()) / 10)
    for k, c in ((0, 20), (1, 10), (4, 10)):
        assert abs(int(counts[k]) - scarcest * c) <= 1.0, (k, counts)
    assert torch.equal(idx, matched_holdout(holdout_y, forget_y, seed=7))
    assert not torch.equal(idx, matched_holdout(holdout_y, forget_y, seed=8))
    assert torch.equal(idx, torch.sort(idx).values) and len(set(idx.tolist())) == len(idx)


def test_matched_holdout_rejects_a_class_without_held_out_samples():
    with pytest.raises(DataError, match=r"no sample of class\(es\) \[7\]"):
        matched_holdout(torch.tensor([0, 1, 2]), torch.tensor([7]), seed=0)
    with pytest.raises(ConfigurationError, match="seed"):
        matched_holdout(torch.tensor([0, 1]), torch.tensor([0]), seed=-1)


def test_class_forgetting_original_is_not_forgotten_gold_is(class_case):
    original, gold, forget, holdout, retained = class_case
    v = forgetting_verdict(original, forget, holdout, original=original, retained_holdout=retained)
    assert v.scenario == "class"
    assert v.metrics["acc_forget"] > 90.0  # the original still predicts the class
    assert not v.forgotten and not v.passed and v.utility_kept
    assert any("the class was not forgotten" in r for r in v.reasons)
    assert v.summary_line().startswith("NOT FORGOTTEN: Acc_Df")
    # the line says which rule failed (rule of three on 60 samples: 300 / 60 = 5 %)
    assert v.summary_line().endswith("a forgotten class needs accuracy at most 5.0 % on D_f and "
                                     "on its held-out samples"), v.summary_line()
    # matched held-out = the 60 held-out samples of class 0
    assert v.metrics["n_holdout"] == 60.0 and v.metrics["n_forget"] == 60.0

    g = forgetting_verdict(gold, forget, holdout, original=original, retained_holdout=retained)
    assert g.metrics["acc_forget"] == 0.0 and g.metrics["acc_holdout"] == 0.0
    assert g.forgotten and g.utility_kept and g.passed, g.reasons
    assert abs(g.metrics["attack_auc"] - 0.5) <= g.metrics["auc_tolerance"]
    assert g.metrics["original_acc_forget"] > 90.0
    assert g.summary_line().startswith("FORGOTTEN: ")
    d = g.to_dict()
    json.dumps(d, allow_nan=False)  # JSON-safe: NaN became None
    assert d["passed"] is True and d["metrics"]["acc_forget"] == 0.0


def test_utility_lost_is_flagged(class_case):
    original, _gold, forget, holdout, retained = class_case
    # a barely trained model on noise: it predicts no class well
    broken = _train(torch.randn(40, D), torch.randint(1, K, (40,)), hidden=8, steps=5, seed=1)
    v = forgetting_verdict(broken, forget, holdout, original=original, retained_holdout=retained)
    assert v.metrics["utility_drop"] > 20.0
    assert not v.utility_kept and not v.passed
    assert any("at the expense of the retained data" in r for r in v.reasons)


def test_random_forgetting_memorised_original_is_not_forgotten_gold_is(random_case):
    original, gold, forget, _retain, holdout = random_case
    v = forgetting_verdict(original, forget, holdout, scenario="sample")
    assert v.metrics["acc_forget"] - v.metrics["acc_holdout"] > 20.0  # memorised noisy labels
    assert v.metrics["attack_auc"] > 0.6  # measured 0.69
    assert not v.forgotten
    assert any("remembered" in r for r in v.reasons)
    g = forgetting_verdict(gold, forget, holdout, scenario="sample")
    assert g.forgotten, g.reasons
    assert abs(g.metrics["attack_auc"] - 0.5) <= g.metrics["auc_tolerance"]
    assert abs(g.metrics["acc_gap"]) <= g.metrics["acc_tolerance"]
    # utility not measured without retained_holdout: kept, with a reason
    assert g.utility_kept and any("utility not measured" in r for r in g.reasons)
    assert math.isnan(g.metrics["acc_retained_holdout"])


def test_one_sample_forget_set_uses_the_loss_percentile():
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(D, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
        model.weight[0, 0] = 1.0  # margin of class 0 = x[0]
    xh = torch.randn(200, D, generator=g)
    holdout = TensorDataset(xh, torch.zeros(200, dtype=torch.long))
    remembered = torch.zeros(1, D)
    remembered[0, 0] = 10.0  # far more confident than any held-out sample
    typical = torch.zeros(1, D)
    typical[0, 0] = 0.1
    v = forgetting_verdict(model, TensorDataset(remembered, torch.zeros(1, dtype=torch.long)),
                           holdout)
    assert math.isnan(v.metrics["attack_auc"]) and v.metrics["auc_measurable"] == 0.0
    assert v.metrics["loss_percentile"] < 0.025
    assert not v.forgotten
    assert any("not measurable" in r for r in v.reasons)
    assert "AUC not measurable on 1 D_f and" in v.summary_line()
    ok = forgetting_verdict(model, TensorDataset(typical, torch.zeros(1, dtype=torch.long)),
                            holdout)
    assert 0.3 < ok.metrics["loss_percentile"] < 0.7
    assert ok.forgotten, ok.reasons
    json.dumps(ok.to_dict(), allow_nan=False)


def test_memorisation_separates_memorising_and_non_memorising_models(random_case):
    original, _, forget, retain, holdout = random_case
    x = torch.cat([forget.tensors[0], retain.tensors[0]])
    y = torch.cat([forget.tensors[1], retain.tensors[1]])
    mem = memorisation(original, x, y, *holdout.tensors)
    assert mem["acc_gap"] > 20.0 and mem["loss_gap"] > 0.5 and mem["attack_auc"] > 0.6  # measured 0.68
    assert mem["too_small_for_random_forgetting"] is False
    # a linear model on clean clusters generalises: train and held-out alike
    xc, yc = _clusters(100, seed=10)
    xh, yh = _clusters(100, seed=11)
    torch.manual_seed(0)
    linear = nn.Linear(D, K)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(linear(xc), yc).backward()
        opt.step()
    low = memorisation(linear, xc, yc, xh, yh)
    assert abs(low["acc_gap"]) < MIN_ACC_GAP
    assert abs(low["attack_auc"] - 0.5) < 0.05
    assert low["too_small_for_random_forgetting"] is True
    json.dumps(low, allow_nan=False)


def test_bad_input_raises_library_errors(class_case):
    original, _, forget, holdout, _ = class_case
    with pytest.raises(ConfigurationError, match="scenario"):
        forgetting_verdict(original, forget, holdout, scenario="classes")
    with pytest.raises(ConfigurationError, match="acc_tolerance"):
        forgetting_verdict(original, forget, holdout, acc_tolerance=-1)
    bad = TensorDataset(torch.randn(3, D), torch.tensor([0, 9, 0]))
    with pytest.raises(DataError, match="outputs"):
        forgetting_verdict(original, bad, TensorDataset(torch.randn(20, D),
                                                        torch.tensor([0, 9] * 10)))


def test_verdict_is_a_frozen_dataclass(class_case):
    original, _, forget, holdout, _ = class_case
    v = forgetting_verdict(original, forget, holdout)
    assert isinstance(v, ForgettingVerdict)
    with pytest.raises(AttributeError):
        v.passed = True  # type: ignore[misc]


@pytest.mark.parametrize("nf,nh", [(148, 6), (20, 9), (1, 6), (1, 400), (9, 300)])
def test_the_loss_percentile_range_holds_its_level_under_the_null(nf, nh):
    """When D_f and the held-out samples are drawn alike, the 95 % range of the mean loss
    percentile rejects at most about 5 % of draws, whatever the two sizes (simulated, 2,000
    draws; the bound 8 % leaves room for the normal approximation with tiny held-out sets)."""
    from deepclean.evaluation.verdict import _attack

    g = torch.Generator().manual_seed(nf * 1000 + nh)
    rejected = 0
    draws = 2000
    for _ in range(draws):
        # two classes, true label 0: the logit-scaled confidence is z0 - z1 = the score drawn
        sf, sh = torch.randn(nf, generator=g), torch.randn(nh, generator=g)
        lf = torch.stack([sf, torch.zeros(nf)], 1).double()
        lh = torch.stack([sh, torch.zeros(nh)], 1).double()
        out = _attack(lf, torch.zeros(nf, dtype=torch.long), lh,
                      torch.zeros(nh, dtype=torch.long), None)
        rejected += not (out["loss_percentile_low"] <= out["loss_percentile"]
                         <= out["loss_percentile_high"])
    assert rejected / draws <= 0.08, rejected / draws


class _Lookup(nn.Module):
    """Right on the inputs it was given (by exact match), ``fallback`` elsewhere."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, fallback: nn.Module):
        super().__init__()
        self.x, self.y, self.fallback = x, y, fallback

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fallback(x)
        hit = (x[:, None, :] == self.x[None]).all(-1)
        known = hit.any(1)
        out = out.clone()
        out[known] = 0.0
        out[known, self.y[hit[known].float().argmax(1)]] = 20.0
        return out


def test_small_sets_make_a_pass_weak_evidence_and_say_so():
    """The 95 % two-sample bound on the accuracy gap (``acc_resolution``) by hand: above 10
    points a pass is flagged as weak evidence in the summary line and in ``to_dict``."""
    g = torch.Generator().manual_seed(3)
    model = nn.Linear(D, 2)
    with torch.no_grad():  # the same logits for every input: D_f and held-out data alike
        model.weight.zero_()
        model.bias.zero_()

    def sets(nf: int, nh: int):  # half of each set of either label: 50 % accuracy on both
        x = torch.randn(nf + nh, D, generator=g)
        y = torch.cat([torch.arange(nf) % 2, torch.arange(nh) % 2])
        return TensorDataset(x[:nf], y[:nf]), TensorDataset(x[nf:], y[nf:])

    small = forgetting_verdict(model, *sets(20, 20), match=False)
    m = small.metrics
    kf, kh = m["acc_forget"] * 20 / 100, m["acc_holdout"] * 20 / 100
    p = (kf + kh + 1) / 42
    by_hand = 100 * 1.959964 * math.sqrt(p * (1 - p) * (2 / 20))  # about 31 points
    assert m["acc_resolution"] == pytest.approx(by_hand, rel=1e-5) and by_hand > 25
    assert small.weak_evidence and small.to_dict()["weak_evidence"] is True
    assert small.forgotten and m["acc_gap"] == 0.0
    assert (f"weak evidence: at these sizes (20 D_f, 20 held-out) and accuracies only accuracy "
            f"gaps above {by_hand:.1f} points can be told apart") in small.summary_line()
    # an explicit tolerance does not hide how little the sizes can resolve
    assert forgetting_verdict(model, *sets(20, 20), match=False, acc_tolerance=2.0).weak_evidence

    # a failure is not made doubtful by the suffix: it is shown only when D_f counts as forgotten
    xf, yf = sets(20, 20)[0].tensors
    remembered = nn.Linear(D, 2)
    with torch.no_grad():  # predicts D_f's labels perfectly through a lookup on its inputs
        remembered.weight.zero_()
        remembered.bias.zero_()
    fails = forgetting_verdict(_Lookup(xf, yf, remembered), TensorDataset(xf, yf),
                               sets(0, 20)[1], match=False)
    assert fails.weak_evidence and not fails.forgotten
    assert "weak evidence" not in fails.summary_line()

    large = forgetting_verdict(model, *sets(2000, 2000), match=False)
    assert large.metrics["acc_resolution"] < 3.2  # 1.96 * sqrt(0.25 * 2 / 2000) = 3.1 points
    assert not large.weak_evidence and "weak evidence" not in large.summary_line()
