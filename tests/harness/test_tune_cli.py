"""``deepclean tune`` and ``deepclean run --hp-file`` end to end on scikit-learn's digits."""

import json

import pytest

from deepclean.cli import main
from deepclean.data.datasets import load_dataset
from deepclean.harness.tuning import test_halves
from deepclean.methods import method_class
from deepclean.methods.space import SpaceContext

COMMON = ["--dataset", "digits", "--train-size", "all", "--model", "small_cnn", "--epochs", "2",
          "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    argv = ["tune", *COMMON, "--methods", "finetune,deepclean,retrain", "--trials", "2",
            "--out", str(root / "tune"), "--cache-dir", str(root / "cache")]
    assert main(argv) == 0
    return root


def test_tune_writes_one_search_per_method_with_the_same_budget(tuned):
    hp = json.loads((tuned / "tune" / "hyperparameters.json").read_text())
    assert hp["format"] == "deepclean-hp/1"
    assert hp["protocol"]["tune_seed"] == 100 and hp["protocol"]["n_trials"] == 2
    for scenario in ("random", "class"):
        assert set(hp["tuned"][scenario]) == {"finetune", "deepclean"}  # retrain: nothing to tune
        for method in ("finetune", "deepclean"):
            search = json.loads((tuned / "tune" / "tuning" / f"{scenario}_{method}.json")
                                .read_text())
            assert len(search["trials"]) == 2  # the same number of trials for every method
            space = method_class(method).search_space(SpaceContext(scenario=scenario))
            assert set(hp["tuned"][scenario][method]) == set(space)
            assert search["best_score"] == min(t["score"] for t in search["trials"])
            for trial in search["trials"]:
                assert trial["params"]["epochs"] <= 3  # the cap on unlearning work
    assert "| deepclean |" in (tuned / "tune" / "tuning.md").read_text()


def test_tuning_scores_on_the_validation_half_and_the_run_reports_the_other(tuned, capsys):
    data = load_dataset("digits")
    val, report = test_halves(int(data.test_x.shape[0]), seed=0)
    search = json.loads((tuned / "tune" / "tuning" / "class_finetune.json").read_text())
    gold = search["gold_metrics"]
    # every accuracy is a multiple of 100 / |validation half|
    assert abs(gold["acc_test"] * len(val) / 100 - round(gold["acc_test"] * len(val) / 100)) < 1e-6
    out = tuned / "run"
    argv = ["run", *COMMON, "--methods", "finetune,deepclean,zero_weights", "--scenarios", "class",
            "--hp-file", str(tuned / "tune" / "hyperparameters.json"), "--hp", "finetune.lr=0.001",
            "--out", str(out), "--cache-dir", str(tuned / "cache")]
    assert main(argv) == 0
    hp = json.loads((tuned / "tune" / "hyperparameters.json").read_text())["tuned"]["class"]
    rec = json.loads((out / "results" / "digits_small_cnn_class_deepclean_seed0.json").read_text())
    assert rec["hp_source"] == "tuned"
    for key, value in hp["deepclean"].items():
        assert rec["hyperparameters"][key] == value
    ft = json.loads((out / "results" / "digits_small_cnn_class_finetune_seed0.json").read_text())
    assert ft["hp_source"] == "tuned+user" and ft["hyperparameters"]["lr"] == 0.001
    assert ft["hyperparameters"]["epochs"] == hp["finetune"]["epochs"]
    # the reported test accuracy is measured on the report half: recompute it from the checkpoint
    from deepclean import build_model
    from deepclean.checkpoint import load_weights
    from deepclean.evaluation.metrics import accuracy, predict_proba

    model = build_model("small_cnn", in_channels=1, num_classes=10, width=0.125)
    load_weights(model, out / "checkpoints" / "digits_small_cnn_class_deepclean_seed0.safetensors")
    acc = accuracy(predict_proba(model, data.test_x[report]), data.test_y[report])
    assert rec["metrics"]["acc_test"] == pytest.approx(acc, abs=1e-9)
    assert json.loads((out / "config.json").read_text())["test_half"] == "report"
    table = (out / "results.md").read_text()
    assert ("Hyperparameters: deepclean tuned, finetune tuned+user, zero_weights defaults (not "
            "in --hp-file).") in table
    zw = json.loads((out / "results" / "digits_small_cnn_class_zero_weights_seed0.json")
                    .read_text())
    assert zw["hp_source"] == "defaults (not in --hp-file)"  # zero_weights was not tuned
    assert "zero_weights: warning: the hyperparameter file holds no values" in capsys.readouterr().out


def test_tune_and_hp_file_refusals(tuned, tmp_path, capsys):
    hp_file = str(tuned / "tune" / "hyperparameters.json")
    cases = [
        (["run", *COMMON, "--hp-file", hp_file, "--seeds", "100"], "tuned on"),
        (["run", *COMMON, "--hp-file", hp_file, "--test-half", "all"], "other half"),
        (["run", *COMMON, "--hp-file", str(tmp_path / "missing.json")], "does not exist"),
        (["tune", *COMMON, "--tune-seed", "0", "--seeds", "0"], "also a reported seed"),
        (["tune", *COMMON, "--trials", "0"], "n_trials"),
        (["run", *COMMON, "--hp-file", hp_file, "--width", "0.25"], "tuned with width"),
        (["run", *COMMON, "--hp-file", hp_file, "--model", "resnet18"], "tuned for model"),
        (["tune", *COMMON, "--max-passes", "0"], "max_passes"),
    ]
    for argv, message in cases:
        argv = argv + ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
        assert not (tmp_path / "c").exists()  # refused before any training


def test_model_cache_is_shared_with_the_run(tuned):
    # the tuning seed trained its own original and gold models (two scenarios), the reported
    # seed 0 its own (class scenario only): one cache, separate entries
    names = sorted(p.name.split("-")[0] for p in (tuned / "cache").glob("*.safetensors"))
    assert names.count("original") == 2 and names.count("gold") == 3


def test_an_interrupted_tune_reuses_finished_searches(tuned, capsys):
    argv = ["tune", *COMMON, "--methods", "finetune,deepclean,retrain", "--trials", "2",
            "--out", str(tuned / "tune"), "--cache-dir", str(tuned / "cache")]
    before = (tuned / "tune" / "tuning" / "random_finetune.json").read_text()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("reused the finished search") == 4  # 2 methods x 2 scenarios
    assert (tuned / "tune" / "tuning" / "random_finetune.json").read_text() == before


def test_several_hp_files_merge_and_conflicts_are_refused(tmp_path):
    from deepclean.errors import ConfigurationError
    from deepclean.harness.tuning import read_hp_files, write_hp_file

    a = write_hp_file(tmp_path / "a.json", {"random": {"ssd": {"alpha": 3.0}}}, {"tune_seed": 100})
    b = write_hp_file(tmp_path / "b.json", {"random": {"scrub": {"lr": 1e-4}}}, {"tune_seed": 100})
    merged, protocol = read_hp_files([a, b])
    assert merged == {"random": {"ssd": {"alpha": 3.0}, "scrub": {"lr": 1e-4}}}
    assert protocol["tune_seed"] == 100
    with pytest.raises(ConfigurationError, match="in two files"):
        read_hp_files([a, a])
    c = write_hp_file(tmp_path / "c.json", {"class": {"ssd": {"alpha": 2.0}}}, {"tune_seed": 7})
    with pytest.raises(ConfigurationError, match="different seeds|merge files of one tuning seed"):
        read_hp_files([a, c])


def test_the_training_set_fisher_is_computed_once_for_all_trials(tmp_path, monkeypatch):
    import deepclean.harness.tune as tune_module
    import deepclean.methods.deepclean as dc_module

    computed, passes = [], []
    real_pre, real_fisher = tune_module.precompute_train_fisher, dc_module.fisher_diagonal
    monkeypatch.setattr(tune_module, "precompute_train_fisher",
                        lambda *a, **k: computed.append(1) or real_pre(*a, **k))
    monkeypatch.setattr(dc_module, "fisher_diagonal",
                        lambda model, data, **k: passes.append(len(data)) or
                        real_fisher(model, data, **k))
    argv = ["tune", *COMMON, "--methods", "deepclean", "--scenarios", "class", "--trials", "3",
            "--out", str(tmp_path / "t"), "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 0
    assert computed == [1]  # I_D once
    n_forget = json.loads((tmp_path / "t" / "tuning" / "class_deepclean.json").read_text())
    assert len(passes) == 3 and len(set(passes)) == 1  # one Fisher pass per trial, over D_f only
    assert passes[0] < 400 and n_forget["best_score"] is not None


def test_fisher_forgetting_gets_the_true_fisher_once_per_search(tmp_path, monkeypatch):
    import deepclean.methods.fisher_forgetting as ff_module

    calls = []
    real = ff_module.true_fisher_diagonal
    monkeypatch.setattr(ff_module, "true_fisher_diagonal",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    argv = ["tune", *COMMON, "--methods", "fisher_forgetting", "--scenarios", "class",
            "--trials", "3", "--out", str(tmp_path / "t"), "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 0
    assert calls == [1]  # once for the search, not once per trial
    search = json.loads((tmp_path / "t" / "tuning" / "class_fisher_forgetting.json").read_text())
    assert len(search["trials"]) == 3 and search["best_score"] is not None


def test_an_interrupted_tune_leaves_a_usable_partial_hp_file(tmp_path, monkeypatch):
    import deepclean.harness.tune as tune_module
    from deepclean.harness.tuning import read_hp_file

    real, calls = tune_module.tune, []

    def stop_at_the_second_search(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tune_module, "tune", stop_at_the_second_search)
    argv = ["tune", *COMMON, "--methods", "finetune,deepclean", "--scenarios", "class",
            "--trials", "2", "--out", str(tmp_path / "t"), "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 130  # interrupted
    tuned, protocol = read_hp_file(tmp_path / "t" / "hyperparameters.json")
    assert protocol["complete"] is False
    assert list(tuned["class"]) == ["finetune"]  # the finished search only
    assert "| finetune |" in (tmp_path / "t" / "tuning.md").read_text()
    monkeypatch.setattr(tune_module, "tune", real)
    assert main(argv) == 0  # resumes: finetune reused, deepclean searched
    tuned, protocol = read_hp_file(tmp_path / "t" / "hyperparameters.json")
    assert protocol["complete"] is True and sorted(tuned["class"]) == ["deepclean", "finetune"]
