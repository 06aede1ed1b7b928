"""The memorisation measure: a model that memorised its training data against one that did not,
and the note in the run's tables and report."""

import json

import torch
from torch import nn

from deepclean.cli import main
from deepclean.evaluation.memorisation import memorisation


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 20, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_a_memorising_model_and_one_that_did_not():
    x_train, y_train = _data(64, 0)  # random labels: only memorisation can fit them
    x_hold, y_hold = _data(400, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 4))
    untrained = memorisation(model, x_train, y_train, x_hold, y_hold)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_train), y_train).backward()
        opt.step()
    trained = memorisation(model, x_train, y_train, x_hold, y_hold)
    assert trained["acc_train"] == 100.0 and trained["acc_gap"] > 50
    assert trained["attack_auc"] > 0.95 and trained["loss_gap"] > 1.0
    assert not trained["too_small_for_random_forgetting"]
    # before training, train and held-out samples look alike
    assert abs(untrained["acc_gap"]) < 20 and abs(untrained["attack_auc"] - 0.5) < 0.15
    assert untrained["too_small_for_random_forgetting"] in (True, False)
    assert trained["n_train"] == 64 and trained["n_holdout"] == 400


def test_the_run_records_and_reports_it(tmp_path):
    out = tmp_path / "run"
    argv = ["run", "--dataset", "digits", "--train-size", "all", "--model", "small_cnn",
            "--epochs", "1", "--methods", "finetune", "--hp", "finetune.epochs=1",
            "--scenarios", "random", "--no-progress", "--threads", "1",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    rec = json.loads((out / "results" / "digits_small_cnn_random_original_seed0.json").read_text())
    m = rec["memorisation"]
    assert m["holdout"].startswith("validation half of the test set")  # digits: no unused images
    assert 0 <= m["acc_train"] <= 100 and 0 <= m["attack_auc"] <= 1
    assert "Memorisation of the original model (seed 0)" in (out / "results.md").read_text()
    assert "Memorisation of the original model (seed 0)" in (out / "report.html").read_text()
