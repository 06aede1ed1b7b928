"""Summaries against gold: exact zeros for a copy of gold, symmetric penalties, and the original
model under random forgetting knows D_f better than gold does."""

import copy

import pytest
import torch

from deepclean import TrainConfig, build_model, train_model
from deepclean.data.splits import random_split
from deepclean.evaluation import evaluate_model
from deepclean.evaluation.outputs import build_reference, extended_metrics, model_outputs
from deepclean.evaluation.summaries import avg_gap, relative_time_efficiency, summary, tug_of_war

GOLD = {"acc_forget": 80.0, "acc_retain": 99.0, "acc_test": 90.0, "mia": 30.0}


@pytest.fixture(scope="module")
def memorised():
    """Noise images with random labels: an original model trained on all, gold on D_r only."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 1, 8, 8, generator=g), torch.randint(0, 5, (200,), generator=g)
    xt, yt = torch.randn(100, 1, 8, 8, generator=g), torch.randint(0, 5, (100,), generator=g)
    split = random_split(200, 0.2, seed=0)
    recipe = TrainConfig(epochs=20, lr=0.05, batch_size=32, weight_decay=0.0)
    original = build_model("small_cnn", in_channels=1, num_classes=5, width=0.25, seed=0)
    train_model(original, x, y, recipe, seed=0, progress=False)
    gold = build_model("small_cnn", in_channels=1, num_classes=5, width=0.25, seed=1)
    train_model(gold, x[split.retain], y[split.retain], recipe, seed=1, progress=False)
    return x, y, xt, yt, split, original.eval(), gold.eval()


def evaluate(model, memorised, reference):
    x, y, xt, yt, split, _, _ = memorised
    out = model_outputs(model, x, xt)
    metrics = evaluate_model(model, x_train=x, y_train=y, split=split, x_test=xt, y_test=yt,
                             outputs=out)
    return metrics, extended_metrics(model, out, reference, split=split, y_train=y, y_test=yt)


def test_an_exact_copy_of_gold_has_every_gap_exactly_zero(memorised):
    x, y, xt, yt, split, original, gold = memorised
    reference = build_reference(gold=gold, gold_outputs=model_outputs(gold, x, xt), split=split,
                                original=original)
    gold_metrics, _ = evaluate(gold, memorised, reference)
    metrics, ext = evaluate(copy.deepcopy(gold), memorised, reference)
    assert all(metrics[k] - gold_metrics[k] == 0.0 for k in gold_metrics)
    s = summary(metrics, gold_metrics, time_s=2.0, gold_time_s=10.0)
    assert s["avg_gap"] == 0.0 and s["tug_of_war"] == 1.0 and s["rte"] == 5.0
    d = ext["distances"]
    assert all(v == 0.0 for part in ("forget", "test") for v in d[part].values())
    assert d["weights_to_gold"] == 0.0 and d["weights_to_original"] > 0
    assert ext["mia_family"]["lira"] is None  # one gold model only


def test_the_original_model_under_random_forgetting_knows_d_f_better_than_gold(memorised):
    x, y, xt, yt, split, original, gold = memorised
    reference = build_reference(gold=gold, gold_outputs=model_outputs(gold, x, xt), split=split)
    gold_metrics, _ = evaluate(gold, memorised, reference)
    metrics, _ = evaluate(original, memorised, reference)
    assert metrics["acc_forget"] - gold_metrics["acc_forget"] > 0
    assert avg_gap(metrics, gold_metrics) > 0 and tug_of_war(metrics, gold_metrics) < 1


@pytest.mark.parametrize("delta", [5.0, 12.5, 30.0])
def test_summaries_punish_both_directions_equally(delta):
    below = dict(GOLD, mia=GOLD["mia"] - delta)
    above = dict(GOLD, mia=GOLD["mia"] + delta)
    assert avg_gap(below, GOLD) == avg_gap(above, GOLD) == delta / 4
    low = dict(GOLD, acc_forget=GOLD["acc_forget"] - delta)
    high = dict(GOLD, acc_forget=GOLD["acc_forget"] + delta)
    assert tug_of_war(low, GOLD) == tug_of_war(high, GOLD) == pytest.approx(1 - delta / 100)
    assert avg_gap(low, GOLD) == avg_gap(high, GOLD)


def test_tug_of_war_is_the_product_over_three_sets():
    m = dict(GOLD, acc_forget=70.0, acc_retain=97.0, acc_test=85.0)
    assert tug_of_war(m, GOLD) == pytest.approx(0.9 * 0.98 * 0.95)


def test_rte():
    assert relative_time_efficiency(100.0, 4.0) == 25.0
    assert relative_time_efficiency(100.0, None) is None
    assert relative_time_efficiency(None, 3.0) is None
    assert relative_time_efficiency(100.0, 0.0) is None
