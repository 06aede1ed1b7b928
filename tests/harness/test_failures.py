"""A diverging method is recorded as failed with its reason; the others and the other scenario
still run; the tables show the failure; the exit status says something failed."""

import json
import re

import pytest
import torch
from torch.utils.data import TensorDataset

from deepclean import build_model
from deepclean.cli import main
from deepclean.errors import DivergenceError
from deepclean.methods import make_method


def _sets():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (60,), generator=g)
    return TensorDataset(x[:10], y[:10]), TensorDataset(x[10:], y[10:])


def test_a_diverging_optimizer_stops_at_the_first_bad_step_and_names_it():
    model = build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=0)
    forget, retain = _sets()
    with pytest.raises(DivergenceError, match=r"neggrad after optimizer step \d+: non-finite"):
        make_method("neggrad", lr=1e30, optimizer="sgd", epochs=3).unlearn(model, forget, retain)


def test_a_method_without_optimizer_is_checked_after_unlearning():
    model = build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=0)
    forget, retain = _sets()
    with pytest.raises(DivergenceError, match="fisher_forgetting after unlearning"):
        make_method("fisher_forgetting", alpha=1e308, clamp=1e308).unlearn(model, forget, retain)


def test_the_run_records_the_failure_and_goes_on(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["run", "--dataset", "digits", "--train-size", "all", "--model", "small_cnn",
            "--epochs", "1", "--methods", "neggrad,finetune", "--hp", "neggrad.lr=1e30",
            "--hp", "neggrad.optimizer=sgd", "--hp", "finetune.epochs=1", "--no-progress",
            "--threads", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 4
    err = capsys.readouterr().err
    assert "2 method run(s) failed: neggrad (class, seed 0), neggrad (random, seed 0)" in err
    for scenario in ("random", "class"):
        failed = json.loads((out / "results" /
                             f"digits_small_cnn_{scenario}_neggrad_seed0.json").read_text())
        assert failed["status"] == "failed" and failed["metrics"] is None
        assert re.search(r"after optimizer step \d+: non-finite weights", failed["failure"])
        ok = json.loads((out / "results" /
                         f"digits_small_cnn_{scenario}_finetune_seed0.json").read_text())
        assert ok["metrics"]["acc_retain"] > 0
    table = (out / "results.md").read_text()
    assert "| neggrad (FAILED) | failed |" in table
    assert "FAILED: neggrad, seed 0: neggrad after optimizer step" in table
    assert "Failed method runs" in (out / "report.html").read_text()
    assert "failed" in (out / "results.csv").read_text()
    # the report rebuilds from the files alone, failures included
    assert main(["report", str(out)]) == 0
    assert "| neggrad (FAILED) |" in (out / "results.md").read_text()


def test_a_one_sample_deletion_request_runs_end_to_end(tmp_path):
    """The most common request, one training index: every attack that cannot be measured on one
    sample says so instead of stopping the run."""
    request = tmp_path / "request.json"
    request.write_text("[5]")
    out = tmp_path / "one"
    argv = ["run", "--dataset", "digits", "--train-size", "all", "--model", "small_cnn",
            "--epochs", "1", "--methods", "deepclean", "--hp", "deepclean.epochs=1",
            "--forget-indices", str(request), "--no-progress", "--threads", "1",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    rec = json.loads((out / "results" / "digits_small_cnn_indices_deepclean_seed0.json")
                     .read_text())
    assert rec["n_forget"] == 1 and rec["metrics"]["acc_forget"] in (0.0, 100.0)
    assert rec["mia_family"]["loss_lr_accuracy"] is None
    assert "needs at least 2 samples in D_f" in rec["mia_family"]["loss_lr_reason"]
