"""The tuning engine: seeded, same budget, failures recorded, the hyperparameter file."""

import json

import pytest

from deepclean.errors import CheckpointError, ConfigurationError, DataError
from deepclean.harness.tuning import (
    Choice,
    IntRange,
    LogUniform,
    Uniform,
    check_space,
    read_hp_file,
    test_halves,
    tune,
    write_hp_file,
)


def quadratic(params):
    # minimum at lr = 1e-3 (log10 -3), epochs = 2, mode "b"
    import math

    score = (math.log10(params["lr"]) + 3) ** 2 + (params["epochs"] - 2) ** 2
    score += 0.0 if params["mode"] == "b" else 1.0
    return score, {"acc": 100.0 - score}


SPACE = {"lr": LogUniform(1e-5, 1e-1), "epochs": IntRange(1, 3), "mode": Choice(("a", "b"))}


def test_tune_is_seeded_and_spends_exactly_the_budget():
    a = tune(quadratic, SPACE, n_trials=12, seed=3, fixed={"seed": 0})
    b = tune(quadratic, SPACE, n_trials=12, seed=3, fixed={"seed": 0})
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    assert len(a.trials) == 12
    assert a.best["seed"] == 0  # fixed values are part of the best
    scores = [t.score for t in a.trials]
    assert a.best_score == min(scores)
    # every drawn value lies in its declared range
    for t in a.trials:
        assert 1e-5 <= t.params["lr"] <= 1e-1 and t.params["epochs"] in (1, 2, 3)
        assert t.params["mode"] in ("a", "b")
    c = tune(quadratic, SPACE, n_trials=12, seed=4)
    assert [t.params for t in c.trials] != [t.params for t in a.trials]


def test_tune_finds_the_minimum_of_an_easy_objective():
    result = tune(quadratic, SPACE, n_trials=40, seed=0)
    assert result.best["mode"] == "b" and result.best["epochs"] == 2
    assert result.best_score < 0.3  # |log10(lr) + 3| < 0.55


def test_failed_trials_are_recorded_and_the_search_goes_on():
    def objective(params):
        if params["lr"] > 1e-2:
            raise DataError("the MIA's member features hold NaN or infinity")
        if params["lr"] > 1e-3:
            return float("nan"), {}
        return params["lr"], {}

    result = tune(objective, {"lr": LogUniform(1e-5, 1e-1)}, n_trials=12, seed=1)
    states = {t.state for t in result.trials}
    assert states == {"complete", "failed"}
    failed = [t for t in result.trials if t.state == "failed"]
    assert all(t.score is None and t.error for t in failed)
    assert any("DataError" in t.error for t in failed) and any("nan" in t.error for t in failed)
    assert result.best["lr"] <= 1e-3


def test_every_trial_failing_gives_no_best():
    def objective(params):
        raise RuntimeError("diverged")

    result = tune(objective, {"lr": LogUniform(1e-5, 1e-1)}, n_trials=3, seed=0)
    assert result.best == {} and result.best_score is None and len(result.trials) == 3


def test_an_empty_space_runs_one_trial():
    result = tune(lambda p: (1.5, {}), {}, n_trials=12, seed=0, fixed={"a": 1})
    assert len(result.trials) == 1 and result.best == {"a": 1} and result.best_score == 1.5


@pytest.mark.parametrize("bad", [
    lambda: LogUniform(0.0, 1.0), lambda: LogUniform(1.0, 0.5), lambda: Uniform(2, 1),
    lambda: IntRange(3, 1), lambda: IntRange(1.5, 2), lambda: Choice(()),
    lambda: Choice(([1],)),
])
def test_bad_ranges_are_refused(bad):
    with pytest.raises(ConfigurationError):
        bad()


def test_bad_budget_and_space():
    with pytest.raises(ConfigurationError, match="n_trials"):
        tune(quadratic, SPACE, n_trials=0)
    with pytest.raises(ConfigurationError, match="not one of its hyperparameters"):
        check_space("finetune", {"momentum": Uniform(0, 1)}, ["lr", "epochs"])
    with pytest.raises(ConfigurationError, match="expected LogUniform"):
        check_space("finetune", {"lr": (1e-4, 1e-2)}, ["lr", "epochs"])


def test_test_halves_are_disjoint_reproducible_and_cover_the_test_set():
    val, rep = test_halves(101, seed=0)
    assert len(val) == 50 and len(rep) == 51
    assert sorted(val.tolist() + rep.tolist()) == list(range(101))
    val2, rep2 = test_halves(101, seed=0)
    assert val.equal(val2) and rep.equal(rep2)
    assert not val.equal(test_halves(101, seed=1)[0])
    with pytest.raises(DataError):
        test_halves(1)


def test_hp_file_round_trip_and_refusals(tmp_path):
    tuned = {"random": {"scrub": {"lr": 1e-4, "max_steps": 1}}, "class": {"ssd": {"alpha": 3.0}}}
    path = write_hp_file(tmp_path / "hp.json", tuned, {"seed": 100, "n_trials": 12})
    got, protocol = read_hp_file(path)
    assert got == tuned and protocol == {"seed": 100, "n_trials": 12}
    with pytest.raises(ConfigurationError, match="not a JSON value"):
        write_hp_file(tmp_path / "x.json", {"random": {"a": {"b": object()}}}, {})
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(CheckpointError, match="does not exist"):
        read_hp_file(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        read_hp_file(tmp_path / "broken.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(CheckpointError, match="not a DeepClean hyperparameter file"):
        read_hp_file(tmp_path / "other.json")
    (tmp_path / "shape.json").write_text(json.dumps({"format": "deepclean-hp/1", "tuned": [1]}))
    with pytest.raises(CheckpointError, match="scenario -> method"):
        read_hp_file(tmp_path / "shape.json")


def test_every_method_declares_a_valid_search_space_within_the_cap():
    import inspect

    from deepclean.methods.base import available_methods, method_class
    from deepclean.methods.space import SpaceContext

    tunable = []
    for name in available_methods():
        cls = method_class(name)
        accepted = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
        for scenario in ("random", "class"):
            context = SpaceContext(max_passes=2, n_forget=100, n_retain=900, scenario=scenario)
            space = cls.search_space(context)
            check_space(name, space, accepted)
            if "epochs" in space:  # the cap on unlearning work holds
                assert space["epochs"].high <= 2, name
        if cls.search_space(SpaceContext()):
            tunable.append(name)
    for name in ("deepclean", "finetune", "scrub", "neggrad", "sparse_mu", "teacher", "salun",
                 "random_label", "zero_weights"):
        assert name in tunable


def test_search_key_ignores_other_scenarios_methods_and_output():
    """A search finished by one ``deepclean tune`` is reused by another that tunes other
    scenarios or methods or writes elsewhere; a change of what the search depends on is not."""
    from deepclean.harness.config import ExperimentConfig, with_overrides
    from deepclean.harness.tune import search_key

    base = ExperimentConfig(out_dir="a", scenarios=("random", "class"), methods=("deepclean",))
    kw = dict(scenario="random", method="deepclean", space={"gamma": {"type": "log_uniform"}},
              tune_seed=100, n_trials=12, max_passes=3)
    key = search_key(base, **kw)
    for other in (with_overrides(base, scenarios=("random",)), with_overrides(base, out_dir="b"),
                  with_overrides(base, methods=("deepclean", "finetune"))):
        assert search_key(other, **kw) == key
    assert search_key(with_overrides(base, width=0.25), **kw) != key
    assert search_key(base, **(kw | {"n_trials": 6})) != key
    assert search_key(base, **(kw | {"scenario": "class"})) != key


def test_tuning_table_reports_the_separation_of_d_r_and_d_f_by_hand():
    """Acc_Dr - Acc_Df of the best trial (lowest score), the largest over trials and gold's."""
    from deepclean.harness.tune import tuning_table

    def trial(score, retain, forget):
        return {"score": score, "state": "complete",
                "metrics": {"acc_retain": retain, "acc_forget": forget}}

    search = {"best": {"gamma": 2.0}, "best_score": 1.5, "space": {"gamma": {}}, "time_s": 12.0,
              "gold_metrics": {"acc_retain": 99.5, "acc_forget": 91.0},
              "trials": [trial(3.0, 90.0, 80.0), trial(1.5, 99.0, 98.5),
                         {"score": None, "state": "failed", "metrics": None}]}
    row = [line for line in tuning_table({"random": {"zero_weights": search}}).splitlines()
           if line.startswith("| zero_weights")][0]
    assert row == "| zero_weights | gamma=2 | 1.50 | 3.00 | 0.50 | 10.00 | 8.50 | 1/3 | 12.0 |"
