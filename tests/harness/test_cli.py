"""The command line: listing, bad input, and an end-to-end run on real Fashion-MNIST images."""

import json

import pytest

from deepclean.cli import main
from deepclean.data.datasets import DEBIAN_FASHION_MNIST
from deepclean.methods import available_methods


def test_methods_lists_every_method_with_a_reference(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in available_methods():
        assert name in out
    assert "arXiv 2311.10448" in out


@pytest.mark.parametrize("argv, message", [
    (["run", "--methods", "deepclean,magic"], "unknown method 'magic'"),
    (["run", "--model", "resnet1000"], "unknown model 'resnet1000'"),
    (["run", "--scenarios", "half"], "unknown scenario 'half'"),
    (["run", "--hp", "deepclean.gamma=-2"], "gamma must be"),
    (["run", "--hp", "deepclean.wings=2"], "no hyperparameter ['wings']"),
    (["run", "--dataset", "cifar10"], "--data-dir"),
    (["run", "--forget-indices", "/nonexistent.json"], "does not exist"),
    (["run", "--scenarios", "random", "--forget-class", "3"],
     "--forget-class is used only by the scenario 'class'"),
    (["run", "--scenarios", "random", "--gamma-class", "5"],
     "--gamma-class is used only by the scenario 'class'"),
    (["run", "--scenarios", "class", "--forget-fraction", "0.3"],
     "--forget-fraction is used only by the scenario 'random'"),
    (["run", "--scenarios", "class", "--gamma-random", "5"],
     "--gamma-random is used only by the scenario 'random'"),
])
def test_bad_input_fails_fast_with_a_clear_message(argv, message, capsys, tmp_path):
    argv = argv + ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "c").exists()  # nothing was trained


def test_malformed_flag_values_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--hp", "gamma"])
    assert "METHOD.NAME=VALUE" in capsys.readouterr().err
    for bad in ("-1", "two"):
        with pytest.raises(SystemExit) as exc:
            main(["run", "--num-workers", bad])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "--num-workers" in err and ">= 0" in err


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_end_to_end_on_fashion_mnist(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["run", "--model", "small_cnn", "--width", "0.5", "--train-size", "3000",
            "--epochs", "6", "--lr", "0.05", "--unlearn-epochs", "2", "--out", str(out),
            "--cache-dir", str(cache), "--no-progress"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    results = {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}
    expected = {f"fashion-mnist_small_cnn_{s}_{m}_seed0" for s in ("random", "class")
                for m in ("original", "gold", "finetune", "deepclean")}
    assert set(results) == expected
    assert {p.name for p in (out / "splits").iterdir()} == {
        "fashion-mnist_random_seed0.json", "fashion-mnist_class_seed0.json"}
    assert len(list((out / "checkpoints").glob("*.safetensors"))) == 8
    assert (out / "results.md").read_text().count("| deepclean |") == 2
    assert len((out / "results.csv").read_text().strip().splitlines()) == 9
    manifest = json.loads((out / "splits" / "fashion-mnist_random_seed0.json").read_text())
    assert manifest["n_forget"] == 300 and len(manifest["forget_indices"]) == 300

    dc = results["fashion-mnist_small_cnn_class_deepclean_seed0"]
    original = results["fashion-mnist_small_cnn_class_original_seed0"]
    gold = results["fashion-mnist_small_cnn_class_gold_seed0"]
    assert original["metrics"]["acc_forget"] > 50  # the original model knows class 0
    assert dc["metrics"]["acc_forget"] <= gold["metrics"]["acc_forget"] + 5.0
    assert dc["metrics"]["acc_retain"] >= original["metrics"]["acc_retain"] - 5.0
    assert 0 < dc["n_reset"] < dc["n_weights"] and dc["time_s"] > 0
    # the evaluation beyond the paper, with one gold model: LiRA skipped with a reason
    assert set(dc["mia_family"]) >= {"entropy_lr", "efficacy", "loss_lr_accuracy", "lira"}
    assert dc["mia_family"]["entropy_lr"] == dc["metrics"]["mia"]
    assert dc["mia_family"]["lira"] is None and "at least 2" in dc["mia_family"]["lira_reason"]
    assert dc["distances"]["normalised"] is None and dc["distances"]["forget"]["js"] > 0
    assert gold["distances"]["forget"]["js"] == 0 and gold["summary"]["avg_gap"] == 0
    assert dc["summary"]["rte"] == pytest.approx(gold["time_s"] / dc["time_s"])
    for name in ("results.tex", "tables/mia.md", "tables/summary.tex", "report.html",
                 "figures/fig2_fashion-mnist_small_cnn_class.svg"):
        assert (out / name).is_file(), name

    # the second run reuses the cached original and gold models and the finished results
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert second.count("model: reused") == 3 and "training on" not in second
    # finished method results of the same configuration are reused, not recomputed (issue 6)
    assert second.count("reused the finished result") == 4 and "unlearning with" not in second
    again = json.loads((out / "results" / "fashion-mnist_small_cnn_class_deepclean_seed0.json").read_text())
    assert again["metrics"] == dc["metrics"]
    assert "training on" in first


def test_gold_models_must_be_positive(tmp_path, capsys):
    argv = ["run", "--gold-models", "0", "--out", str(tmp_path / "o"), "--cache-dir",
            str(tmp_path / "c")]
    assert main(argv) == 2
    assert "gold_seeds (--gold-models) must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_sweep_gamma_then_report_on_fashion_mnist(tmp_path, capsys, monkeypatch):
    from deepclean.methods.deepclean import DeepClean

    calls = []
    real = DeepClean.fisher_pair

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DeepClean, "fisher_pair", counting)
    out = tmp_path / "out"
    argv = ["sweep-gamma", "--model", "small_cnn", "--width", "0.5", "--train-size", "1000",
            "--epochs", "2", "--unlearn-epochs", "1", "--scenarios", "random",
            "--gammas", "1,1.5,3", "--gold-models", "2", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--threads", "1"]
    assert main(argv) == 0
    assert calls == [1]  # the two Fisher diagonals once for three gammas
    sweep = sorted((json.loads(p.read_text()) for p in (out / "sweep").glob("*.json")),
                   key=lambda r: r["gamma"])
    assert [r["gamma"] for r in sweep] == [1.0, 1.5, 3.0]
    assert sweep[0]["n_reset"] >= sweep[1]["n_reset"] >= sweep[2]["n_reset"]
    assert sweep[0]["fisher_time_s"] == sweep[2]["fisher_time_s"]
    assert sweep[0]["mia_family"]["lira"]["n_reference"] == 2
    assert sweep[0]["distances"]["normalised"] is not None
    for name in ("fig3_fashion-mnist_small_cnn.png", "fig3_fashion-mnist_small_cnn.svg",
                 "fig4_fashion-mnist_small_cnn_random.png"):
        assert (out / "figures" / name).is_file()
    (out / "report.html").unlink()
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "Gamma sweep" in html and html.count("data:image/png;base64,") == 2


def test_version_prints_the_package_version(capsys):
    from deepclean import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"deepclean {__version__}"
