"""Distances to gold: JS bounds, agreement with scipy, batchmean KL, weight distance."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr

from deepclean import build_model
from deepclean.errors import DataError
from deepclean.evaluation.distances import (
    activation_distance,
    distances_to_gold,
    js_divergence,
    kl_divergence,
    weight_distance,
)


def random_probs(n, k, seed, sparse=False):
    r = np.random.default_rng(seed)
    p = r.dirichlet(np.ones(k) * 0.5, size=n)
    if sparse:
        p[r.random((n, k)) < 0.3] = 0.0
        p[:, 0] += 1e-3
        p /= p.sum(1, keepdims=True)
    return torch.from_numpy(p)


def test_js_of_identical_distributions_is_zero():
    p = random_probs(20, 10, 0, sparse=True)
    assert js_divergence(p, p) == 0.0
    assert kl_divergence(p, p) == 0.0


def test_js_of_disjoint_one_hots_is_one():
    p = torch.eye(5)
    q = torch.roll(torch.eye(5), 1, dims=1)
    assert js_divergence(p, q) == pytest.approx(1.0, abs=1e-12)
    assert js_divergence(p, q, reduction="none").tolist() == pytest.approx([1.0] * 5)


@pytest.mark.parametrize("sparse", [False, True])
def test_js_and_kl_agree_with_scipy(sparse):
    p, q = random_probs(50, 10, 1, sparse), random_probs(50, 10, 2, sparse)
    js_ref = np.mean(jensenshannon(p.numpy(), q.numpy(), base=2, axis=1) ** 2)
    assert js_divergence(p, q) == pytest.approx(js_ref, rel=1e-10, abs=1e-12)
    assert 0.0 <= js_divergence(p, q) <= 1.0
    # KL(p || q) with zeros only in p (0 log 0 = 0); batchmean: the sum over classes averaged
    # over samples, not the mean over every element
    q = random_probs(50, 10, 3, sparse=False)
    kl_ref = rel_entr(p.numpy(), q.numpy()).sum(1).mean()
    assert kl_divergence(p, q) == pytest.approx(kl_ref, rel=1e-10)
    assert kl_divergence(p, q) != pytest.approx(rel_entr(p.numpy(), q.numpy()).mean())


def test_kl_is_infinite_where_the_model_gives_zero_to_a_gold_class():
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert kl_divergence(p, q) == math.inf
    assert kl_divergence(q, p) == pytest.approx(math.log(2))


def test_js_is_not_kl_from_the_mixture_averaged_over_classes():
    p = torch.tensor([[0.9, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.2, 0.8]], dtype=torch.float64)
    m = 0.5 * (p + q)
    wrong = float((m * torch.log2(m / p)).mean())
    right = 0.5 * float((p * torch.log2(p / m)).sum()) + 0.5 * float((q * torch.log2(q / m)).sum())
    assert js_divergence(p, q) == pytest.approx(right)
    assert js_divergence(p, q) != pytest.approx(wrong)


def test_activation_distance_is_the_mean_l2_between_probability_vectors():
    p, q = random_probs(30, 4, 3), random_probs(30, 4, 4)
    assert activation_distance(p, q) == pytest.approx(
        float(np.linalg.norm(p.numpy() - q.numpy(), axis=1).mean()))


def test_weight_distance_over_all_parameters_only():
    a = build_model("small_cnn", in_channels=1, num_classes=3, width=0.25, seed=0)
    b = build_model("small_cnn", in_channels=1, num_classes=3, width=0.25, seed=1)
    ref = math.sqrt(sum(float(((pa - pb).detach() ** 2).sum()) for pa, pb in
                        zip(a.parameters(), b.parameters())))
    assert weight_distance(a, b) == pytest.approx(ref)
    assert weight_distance(a, a) == 0.0
    for m in b.modules():  # buffers do not count
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.add_(5.0)
    assert weight_distance(a, b) == pytest.approx(ref)
    other = build_model("small_cnn", in_channels=1, num_classes=5, width=0.25, seed=0)
    with pytest.raises(DataError):
        weight_distance(a, other)


def test_distances_to_gold_normalise_by_the_gold_vs_gold_distance():
    gold = build_model("small_cnn", in_channels=1, num_classes=3, width=0.25, seed=0)
    gold2 = build_model("small_cnn", in_channels=1, num_classes=3, width=0.25, seed=1)
    model = build_model("small_cnn", in_channels=1, num_classes=3, width=0.25, seed=2)
    pg = {"forget": random_probs(10, 3, 0), "test": random_probs(12, 3, 1)}
    p2 = {"forget": random_probs(10, 3, 2), "test": random_probs(12, 3, 3)}
    pm = {"forget": random_probs(10, 3, 4), "test": random_probs(12, 3, 5)}
    ref = distances_to_gold(probs=p2, gold_probs=pg, model=gold2, gold=gold)
    assert ref["normalised"] is None and ref["weights_to_original"] is None
    out = distances_to_gold(probs=pm, gold_probs=pg, model=model, gold=gold, original=gold2,
                            gold_reference=ref)
    assert out["normalised"]["forget"]["js"] == pytest.approx(
        out["forget"]["js"] / ref["forget"]["js"])
    assert out["normalised"]["weights_to_gold"] == pytest.approx(
        out["weights_to_gold"] / ref["weights_to_gold"])
    assert out["weights_to_original"] == pytest.approx(weight_distance(model, gold2))
    same = distances_to_gold(probs=pg, gold_probs=pg, model=gold, gold=gold)
    assert all(v == 0.0 for s in ("forget", "test") for v in same[s].values())
