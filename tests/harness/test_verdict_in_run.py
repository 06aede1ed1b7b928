"""``deepclean run`` judges every model without the gold model (the forgetting verdict) and runs
DeepClean with ``--gamma auto`` on the held-out pool's choice half."""

from __future__ import annotations

import json
import re

import pytest
import torch

from deepclean.cli import main
from deepclean.data.datasets import ImageData, load_dataset
from deepclean.errors import ConfigurationError
from deepclean.harness.config import ExperimentConfig
from deepclean.harness.holdout import held_out


def _run(tmp_path, *extra):
    out = tmp_path / "run"
    argv = ["run", "--dataset", "digits", "--train-size", "all", "--model", "small_cnn",
            "--epochs", "2", "--methods", "deepclean,finetune", "--hp", "finetune.epochs=1",
            "--hp", "deepclean.epochs=1", "--scenarios", "class", "--no-progress",
            "--threads", "1", "--test-half", "report", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), *extra]
    assert main(argv) == 0
    return out


def test_run_records_a_verdict_for_every_model_and_auto_gamma(tmp_path, capsys):
    out = _run(tmp_path, "--gamma", "auto")
    log = capsys.readouterr().out
    recs = {m: json.loads((out / "results" / f"digits_small_cnn_class_{m}_seed0.json")
                          .read_text()) for m in ("original", "gold", "deepclean", "finetune")}
    for m, rec in recs.items():
        v = rec["verdict"]
        assert v["passed"] in (True, False), (m, v)
        assert v["summary"].split(":")[0] in ("FORGOTTEN", "NOT FORGOTTEN",
                                               "FORGOTTEN, UTILITY LOST")
        assert v["scenario"] == "class"
        assert v["holdout"] == "validation half of the test set"  # digits: all images trained on
        assert f"  {m}: verdict {v['summary']}" in log or m == "original"
    # the original still knows the forgotten class; the gold model never saw it
    assert recs["original"]["verdict"]["forgotten"] is False
    assert recs["gold"]["verdict"]["metrics"]["acc_forget"] < 5.0
    dc = recs["deepclean"]
    assert dc["hyperparameters"]["gamma"] == "auto"
    assert dc["gamma"] == dc["auto_gamma"]["gamma"] > 0  # the threshold it chose
    assert "candidates" in dc["auto_gamma"] and "rule" in dc["auto_gamma"]
    md = (out / "results.md").read_text()
    assert "Forgetting verdict, no gold model needed" in md
    assert "- deepclean: passed in" in md
    assert f"Gamma chosen on held-out data (gamma='auto'): deepclean seed 0: {dc['gamma']:.4g}" in md
    assert "Gamma chosen on held-out data" in (out / "report.html").read_text()
    assert re.search(r"deepclean: gamma chosen on held-out data \(\d+ samples, validation half of the "
                     r"test set\): "
                     + re.escape(f"{dc['gamma']:.4g}"), log)
    assert "Forgetting verdict" in (out / "report.html").read_text()
    audit = json.loads((out / "audit" / "digits_small_cnn_class_deepclean_seed0.json").read_text())
    assert audit["evaluation"]["verdict"]["summary"] == dc["verdict"]["summary"]
    assert audit["method"]["auto_gamma"]["gamma"] == dc["gamma"]
    text = (out / "audit" / "digits_small_cnn_class_deepclean_seed0.txt").read_text()
    assert f"forgetting verdict:     {dc['verdict']['summary']}" in text
    assert "gamma chosen (auto):" in text


def test_held_out_halves_are_disjoint_and_never_the_training_subset():
    g = torch.Generator().manual_seed(0)
    data = ImageData(name="toy", train_x=torch.randn(100, 1, 4, 4, generator=g),
                     train_y=torch.arange(100) % 3, test_x=torch.randn(40, 1, 4, 4, generator=g),
                     test_y=torch.arange(40) % 3, num_classes=3)
    subset = torch.arange(0, 100, 2)
    val = (data.test_x[:20], data.test_y[:20])
    pool = held_out(data, subset, seed=0, test_half="report", validation=val)
    assert pool.source == "unused training images" and len(pool.y) == 50
    xc, xv = pool.choice.tensors[0], pool.verdict.tensors[0]
    assert len(xc) == len(xv) == 25
    flat = lambda x: {tuple(r.tolist()) for r in x.flatten(1)}  # noqa: E731
    assert not flat(xc) & flat(xv)
    assert not (flat(xc) | flat(xv)) & flat(data.train_x[subset])
    again = held_out(data, subset, seed=0, test_half="report", validation=val)
    assert torch.equal(again.choice.tensors[0], xc)  # same seed, same halves
    everything = held_out(data, torch.arange(100), seed=0, test_half="all", validation=val)
    assert everything.source.startswith("validation half of the test set, also reported")
    assert len(everything.choice) == len(everything.verdict) == 10


def test_bad_gamma_on_the_command_line_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--gamma", "automatic", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "expected a number > 0 or 'auto', got 'automatic'" in capsys.readouterr().err
    with pytest.raises(ConfigurationError, match="gamma_random must be"):
        ExperimentConfig(gamma_random=-1.0).validate()
    ExperimentConfig(gamma_random="auto", gamma_class="auto").validate()  # no data needed yet


def test_with_the_report_half_the_held_out_pool_is_the_other_half(tmp_path):
    """``--test-half report`` (implied by --hp-file) cuts the test set to the report half; the
    held-out pool of a run on every training image must still be the validation half."""
    from deepclean.harness.cache import _make_context
    from deepclean.harness.tuning import test_halves

    full = load_dataset("digits")
    cfg = ExperimentConfig(dataset="digits", models=("small_cnn",), train_size=None,
                           test_half="report", out_dir=str(tmp_path / "o"),
                           cache_dir=str(tmp_path / "c"), progress=False)
    ctx = _make_context(cfg, lambda text: None)
    val, report = test_halves(len(full.test_y), seed=0)
    assert torch.equal(ctx.data.test_x, full.test_x[report])  # what is reported
    assert torch.equal(ctx.validation[0], full.test_x[val])  # what is held out
    pool = held_out(ctx.data, torch.arange(len(full.train_y)), seed=0, test_half="report",
                    validation=ctx.validation)
    reported = {tuple(r.tolist()) for r in full.test_x[report].flatten(1)}
    pooled = {tuple(r.tolist()) for r in pool.x.flatten(1)}
    assert pool.source == "validation half of the test set"
    assert not pooled & reported and len(pool.y) == len(val)


def test_when_the_original_passes_no_model_passes_but_measured_failures_stay():
    """An original model that treats D_f like held-out data (here: one that outputs the same
    logits for every input) makes a passing verdict CANNOT TELL, with passed None: a pass would
    mean nothing, since an unchanged model passes too. What can still be measured fails: a model
    that collapsed onto another class reads CANNOT TELL, UTILITY LOST (passed False), and one
    that knows D_f better than held-out data reads NOT FORGOTTEN (passed False)."""
    from types import SimpleNamespace

    from torch import nn
    from torch.utils.data import TensorDataset

    from deepclean.harness.experiment import CANNOT_TELL, CANNOT_TELL_UTILITY_LOST, _verdict_judge
    from deepclean.harness.holdout import HeldOut

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 1, 4, 4, generator=g)
    y = (torch.arange(400) % 5 == 0).long()  # 80 % class 0, 20 % class 1

    def constant(cls: int) -> nn.Module:
        m = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        with torch.no_grad():
            m[1].weight.zero_()  # every input gets the same logits: nothing memorised
            m[1].bias.copy_(torch.tensor([1.0, 0.0] if cls == 0 else [0.0, 1.0]))
        return m

    class Memoriser(nn.Module):
        """Right on D_f's inputs (looked up), class 0 elsewhere: knows D_f, not held-out data."""

        def __init__(self, xf: torch.Tensor, yf: torch.Tensor) -> None:
            super().__init__()
            self.xf, self.yf = xf.flatten(1), yf

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            d = torch.cdist(inp.flatten(1), self.xf, compute_mode="donot_use_mm_for_euclid_dist")
            hit = d.min(dim=1).values < 1e-6
            label = torch.where(hit, self.yf[d.argmin(dim=1)], torch.zeros_like(hit).long())
            return torch.nn.functional.one_hot(label, 2).float() * 5.0

    original = constant(0)
    forget = TensorDataset(x[:100], y[:100])
    pool = HeldOut(x=x[100:], y=y[100:], choice=TensorDataset(x[100:250], y[100:250]),
                   verdict=TensorDataset(x[250:], y[250:]), source="test")
    judge = _verdict_judge(SimpleNamespace(device=torch.device("cpu")), pool, forget, original,
                           "random", seed=0)
    v = judge(original)
    assert v["passed"] is None and v["summary"].startswith(CANNOT_TELL), v["summary"]
    assert v["passed_as_measured"] is True
    v = judge(constant(1))  # collapsed: D_f still looks like held-out data, utility lost
    assert v["passed"] is False and v["forgotten"] is True and v["utility_kept"] is False
    assert v["summary"].startswith(CANNOT_TELL_UTILITY_LOST), v["summary"]
    v = judge(Memoriser(*forget.tensors))
    assert v["passed"] is False and v["forgotten"] is False
    assert v["summary"].startswith("NOT FORGOTTEN: Acc_Df 100.0 %"), v["summary"]


def test_verdict_lines_count_passes_and_seeds_that_cannot_tell():
    from deepclean.report.common import verdict_lines

    def rec(seed, passed, summary):
        return {"method": "deepclean", "seed": seed,
                "verdict": {"passed": passed, "summary": summary}}

    lines = verdict_lines([rec(0, True, "FORGOTTEN: a"), rec(1, False, "NOT FORGOTTEN: b"),
                           rec(2, None, "CANNOT TELL (...): c")])
    assert lines[1] == ("- deepclean: passed in 1 of 2 seed(s), cannot tell in 1 seed(s), where "
                        "the original already looks unseen; seed 0: FORGOTTEN: a")
    only = verdict_lines([rec(0, None, "CANNOT TELL (...): c")])
    assert only[1] == ("- deepclean: cannot tell in 1 seed(s), where the original already looks "
                       "unseen; seed 0: CANNOT TELL (...): c")
