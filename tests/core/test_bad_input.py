"""Every bad input of issue 6 raises a deepclean error that says what was expected, what arrived
and how to fix it, before any work: through the Python API and through the CLI (one line on
stderr, exit status 2, no traceback)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from deepclean import (
    ConfigurationError,
    DataError,
    DeepClean,
    MaskError,
    build_model,
    fisher_diagonal,
    index_split,
    make_split,
    select_weights,
)
from deepclean.cli import main
from deepclean.data.datasets import DEBIAN_FASHION_MNIST
from deepclean.harness.experiment import ExperimentConfig
from deepclean.methods.base import prepare_inputs
from deepclean.selection import check_mask
from deepclean.validation import check_num_classes, check_parameter_keys


def _model(num_classes: int = 10) -> nn.Module:
    return build_model("small_cnn", in_channels=1, num_classes=num_classes, width=0.25, seed=0)


def _data(n=24, classes=10, shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


# ---------------------------------------------------------------- forget indices and splits


@pytest.mark.parametrize("indices, match", [
    ([3, 10], r"must lie in \[0, 10\) for a training set of 10 samples; got \[10\]"),
    ([-1, 2], r"must be >= 0 .* got negative values \[-1\]"),
    ([2, 2, 5], r"more than once \(e\.g\. \[2\]\); expected each index once"),
    ([1.5, 2], r"must be integers, got 1\.5 \(float\) at position 0"),
    (["3"], r"must be integers, got '3' \(str\)"),
    ([True], r"must be integers, got True"),
    ([], r"no index \(empty forget set\); expected at least one"),
    (list(range(10)), r"covers every one of the 10 training samples, so D_r would be empty"),
])
def test_bad_forget_indices(indices, match):
    with pytest.raises(DataError, match=match):
        index_split(10, indices)


def test_forget_indices_as_float_tensor_or_string_are_refused():
    with pytest.raises(DataError, match="1-d tensor of integers, got dtype torch.float32"):
        index_split(10, torch.tensor([1.0, 2.0]))
    with pytest.raises(DataError, match="sequence of integers, got the string"):
        index_split(10, "12")
    assert index_split(10, torch.tensor([3, 1])).forget.tolist() == [1, 3]


def test_forget_class_absent_and_whole_set():
    labels = torch.tensor([1, 2, 1, 2])
    with pytest.raises(DataError, match=r"class\(es\) \[0\] have no training sample; the labels "
                                        r"present are \[1, 2\]\. Choose"):
        make_split("class", labels, classes=[0])
    with pytest.raises(DataError, match="leaves D_r empty"):
        make_split("class", labels, classes=[1, 2])
    with pytest.raises(DataError, match=r"forget classes must be integers, got 0\.5"):
        make_split("class", labels, classes=[0.5])


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, float("nan"), "0.1"])
def test_bad_forget_fraction(fraction):
    with pytest.raises(DataError, match=r"forget fraction must lie in \(0, 1\)"):
        make_split("random", torch.zeros(100, dtype=torch.long), fraction=fraction)


# ---------------------------------------------------------------- gamma


@pytest.mark.parametrize("gamma", [0, -1.0, float("nan"), float("inf"), "2", True, None])
def test_bad_gamma_everywhere(gamma):
    one = {"w": torch.ones(2)}
    with pytest.raises(ConfigurationError, match=r"gamma must be a finite number > 0, got"):
        select_weights(one, one, gamma)
    with pytest.raises(ConfigurationError, match=r"gamma must be a finite number > 0"):
        DeepClean(gamma=gamma)
    with pytest.raises(ConfigurationError, match=r"gamma_random must be a finite number > 0"):
        ExperimentConfig(gamma_random=gamma).validate()


# ---------------------------------------------------------------- models and data


def test_model_without_trainable_parameters():
    model = _model().requires_grad_(False)
    x, y = _data()
    with pytest.raises(ConfigurationError, match=r"expected a model with trainable parameters, "
                                                 r"got one with \d+ parameter tensors and none"):
        fisher_diagonal(model, TensorDataset(x, y))
    with pytest.raises(ConfigurationError, match="unfreeze it first"):
        DeepClean(epochs=1).unlearn(model, TensorDataset(x[:4], y[:4]),
                                    TensorDataset(x[4:], y[4:]))
    with pytest.raises(ConfigurationError, match="expected the model to be a torch.nn.Module, "
                                                 "got OrderedDict"):
        prepare_inputs(_model().state_dict(), TensorDataset(x, y), TensorDataset(x, y), None)


def test_model_output_width_differs_from_labels_and_classes():
    x, y = _data(classes=10)
    y[0] = 9
    small = _model(num_classes=4)
    with pytest.raises(DataError, match=r"labels from \d+ to 9 but the model has 4 outputs; "
                                        r"expected labels in \[0, 3\]"):
        DeepClean(epochs=1).unlearn(small, TensorDataset(x[:4], y[:4]),
                                    TensorDataset(x[4:], y[4:]))
    with pytest.raises(DataError, match=r"lie in \[0, 4\) for a model with 4 outputs"):
        fisher_diagonal(small, TensorDataset(x, y))
    with pytest.raises(DataError, match=r"the model has 4 outputs but the data set has 10 "
                                        r"classes; expected equal numbers. Build the model with "
                                        r"num_classes=10"):
        check_num_classes(4, 10)


@pytest.mark.parametrize("shape", [(3, 8, 8), (8, 8), (1, 1, 1)])
def test_data_of_the_wrong_shape(shape):
    x, y = _data(shape=shape)
    with pytest.raises(DataError, match=r"samples have shape .* which the model does not accept"):
        fisher_diagonal(_model(), TensorDataset(x, y))
    with pytest.raises(DataError, match=r"which the model does not accept .* expected inputs of "
                                        r"the shape and type"):
        DeepClean(epochs=1).unlearn(_model(), TensorDataset(x[:4], y[:4]),
                                    TensorDataset(x[4:], y[4:]))


def test_data_of_the_wrong_type():
    x, y = _data()
    with pytest.raises(DataError, match=r"dtype torch.uint8, which the model does not accept"):
        fisher_diagonal(_model(), TensorDataset((x * 40).clamp(0, 255).to(torch.uint8), y))
    with pytest.raises(DataError, match=r"expected integer class labels, got dtype torch.float32"):
        fisher_diagonal(_model(), TensorDataset(x, y.float()))
    with pytest.raises(DataError, match=r"expected labels of shape \(N,\)"):
        fisher_diagonal(_model(), TensorDataset(x, nn.functional.one_hot(y, 10)))
    with pytest.raises(DataError, match=r"must be real numbers, got dtype torch.bool"):
        fisher_diagonal(_model(), TensorDataset(x > 0, y))


def test_nan_or_infinite_inputs():
    x, y = _data()
    x[3, 0, 0, 0] = float("nan")
    x[5, 0, 1, 1] = float("inf")
    with pytest.raises(DataError, match=r"inputs hold NaN or infinite values \(2 samples "
                                        r"affected\); expected finite numbers"):
        fisher_diagonal(_model(), TensorDataset(x, y))
    with pytest.raises(DataError, match=r"forget set D_f inputs hold NaN"):
        DeepClean(epochs=1).unlearn(_model(), TensorDataset(x[:8], y[:8]),
                                    TensorDataset(x[8:], y[8:]))


def test_negative_labels():
    x, y = _data()
    y[2] = -1
    with pytest.raises(DataError, match=r"labels must be class indices >= 0, got a minimum of -1"):
        DeepClean(epochs=1).unlearn(_model(), TensorDataset(x[:4], y[:4]),
                                    TensorDataset(x[4:], y[4:]))


def test_empty_forget_set_and_overlapping_subsets():
    x, y = _data()
    full = TensorDataset(x, y)
    with pytest.raises(DataError, match="forget set D_f is empty"):
        DeepClean().unlearn(_model(), TensorDataset(x[:0], y[:0]), full)
    with pytest.raises(DataError, match=r"D_f and D_r share 2 samples of the same data set "
                                        r"\(indices \[4, 5\]\); expected disjoint"):
        DeepClean().unlearn(_model(), Subset(full, [0, 4, 5]), Subset(full, range(4, 24)))
    with pytest.raises(DataError, match="same data set object"):
        DeepClean().unlearn(_model(), full, full)
    inner = Subset(full, list(range(10, 24)))  # nested Subset views are resolved to the base
    with pytest.raises(DataError, match=r"share 1 samples .* \[10\]"):
        DeepClean().unlearn(_model(), Subset(full, [10]), Subset(inner, [0, 1, 2]))


def test_checks_run_before_any_work(monkeypatch):
    """A bad input never reaches the Fisher pass or the fine-tune."""
    import deepclean.methods.deepclean as dc_module

    called = []
    monkeypatch.setattr(dc_module, "fisher_diagonal", lambda *a, **k: called.append(1))
    x, y = _data()
    y[0] = 12
    with pytest.raises(DataError):
        DeepClean().unlearn(_model(), TensorDataset(x[:4], y[:4]), TensorDataset(x[4:], y[4:]))
    assert not called


# ---------------------------------------------------------------- Fisher and mask dictionaries


def test_fisher_or_mask_keys_that_do_not_match_the_model():
    model = _model()
    good = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    bad = dict(good)
    bad.pop("classifier.3.bias")
    bad["head.weight"] = torch.ones(1)
    with pytest.raises(MaskError, match=r"keys do not match the model's trainable parameters: "
                                        r"missing \['classifier.3.bias'\], unexpected "
                                        r"\['head.weight'\]"):
        check_parameter_keys(model, bad)
    wrong_shape = dict(good, **{"classifier.3.bias": torch.ones(3)})
    with pytest.raises(MaskError, match=r"classifier.3.bias: the Fisher diagonal has shape \(3,\)"):
        check_parameter_keys(model, wrong_shape)
    with pytest.raises(MaskError, match="same parameter names"):
        select_weights(good, bad, 1.0)
    mask = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in bad.items()}
    with pytest.raises(MaskError, match="mask's keys do not match"):
        check_mask(model, mask)
    with pytest.raises(MaskError, match="Fisher must be a dict"):
        select_weights([1, 2], good, 1.0)
    # DeepClean's own selection step refuses Fisher diagonals of another model
    method = DeepClean(epochs=0)
    x, y = _data()
    other = build_model("small_cnn", in_channels=1, num_classes=10, width=0.5, seed=0)
    f_other = {n: torch.ones_like(p) for n, p in other.named_parameters()}
    with pytest.raises(MaskError):
        method.apply_selection(model, f_other, f_other, x, y, torch.device("cpu"))


def test_a_module_prefix_never_causes_a_mismatch_in_fisher_dicts():
    model = _model()
    plain = {n: torch.rand(p.shape) for n, p in model.named_parameters()}
    prefixed = {f"module.{n}": t for n, t in plain.items()}
    a = select_weights(prefixed, plain, 1.0)
    b = select_weights(plain, plain, 1.0)
    assert set(a) == set(plain) and all(torch.equal(a[k], b[k]) for k in a)
    assert set(check_parameter_keys(nn.DataParallel(model), prefixed)) == set(plain)


# ---------------------------------------------------------------- experiment configuration


@pytest.mark.parametrize("fields, match", [
    ({"forget_fraction": 1.0}, r"forget_fraction must lie in \(0, 1\), got 1.0"),
    ({"forget_indices": (1, 2.5), "scenarios": ("indices",)}, r"must be integers, got 2.5"),
    ({"forget_classes": (-1,)}, r"forget classes must be integers >= 0, got -1"),
    ({"forget_classes": ()}, r"needs at least one class to forget"),
    ({"unlearn_lr": float("inf")}, r"unlearn_lr must be a finite number > 0"),
])
def test_bad_experiment_configuration(fields, match):
    with pytest.raises(ConfigurationError, match=match):
        ExperimentConfig(**fields).validate()


# ---------------------------------------------------------------- the CLI

needs_fmnist = pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                                  reason="dataset-fashion-mnist not installed")


def _cli(argv, tmp_path, capsys):
    base = ["run", "--model", "small_cnn", "--train-size", "600", "--epochs", "1",
            "--no-progress", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]
    code = main(base + argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("argv, message", [
    (["--gamma", "-1"], "gamma_random must be a finite number > 0, got -1.0"),
    (["--gamma", "nan"], "gamma_random must be a finite number > 0, got nan"),
    (["--gamma-class", "inf"], "gamma_class must be a finite number > 0, got inf"),
    (["--forget-fraction", "1.2"], r"forget_fraction must lie in (0, 1), got 1.2"),
    (["--forget-class", "-3"], "forget classes must be integers >= 0, got -3"),
    (["--data-dir", "/nonexistent/folder"], "data folder /nonexistent/folder does not exist"),
    (["--width", "inf"], "width must be a number in (0, 16], got inf"),
    (["--width", "1e308"], "width must be a number in (0, 16], got 1e+308"),
    (["--lr", "inf"], "lr must be a finite number > 0, got inf"),
    (["--lr", "1e400"], "lr must be a finite number > 0, got inf"),
])
def test_cli_bad_values_fail_fast(argv, message, tmp_path, capsys):
    code, err = _cli(argv, tmp_path, capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line, no traceback
    assert not (tmp_path / "c").exists()  # nothing was trained


@pytest.mark.parametrize("command", ["run", "forget", "verify"])
@pytest.mark.parametrize("threads", ["0", "100000", "1.5"])
def test_cli_threads_outside_one_to_the_cpus_are_refused(command, threads, tmp_path, capsys):
    # tens of thousands of threads make the process fail while starting them (exit 139)
    with pytest.raises(SystemExit) as exc:
        main([command, "--threads", threads, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --threads: expected a number of CPU threads from 1 to " in err, err
    assert f"got '{threads}'; leave it out to let torch choose" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@needs_fmnist
@pytest.mark.parametrize("content, message", [
    ("[5, 600]", "must lie in [0, 600) for a training set of 600 samples; got [600]"),
    ("[-2]", "must be >= 0 (positions in the training set), got negative values [-2]"),
    ("[4, 4]", "lists some index more than once (e.g. [4])"),
    ("[1.5]", "must hold integers (a JSON list, or one per line); 1.5 is not an integer"),
    ("1\nabc\n", "must hold integers (a JSON list, or one per line)"),
    ("[]", "got an empty list (empty forget set)"),
    (json.dumps(list(range(600))), "covers every one of the 600 training samples"),
])
def test_cli_bad_forget_indices_fail_before_training(content, message, tmp_path, capsys):
    path = tmp_path / "forget.json"
    path.write_text(content)
    code, err = _cli(["--forget-indices", str(path)], tmp_path, capsys)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1
    assert not (tmp_path / "c").exists()


@needs_fmnist
def test_cli_forget_class_absent_from_the_data_fails_before_training(tmp_path, capsys):
    code, err = _cli(["--scenarios", "class", "--forget-class", "10"], tmp_path, capsys)
    assert code == 2
    assert "forget class(es) [10] are absent from fashion-mnist, whose classes are 0 to 9" in err
    assert not (tmp_path / "c").exists()


def test_cli_out_or_cache_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    code, err = _cli([], tmp_path, capsys)
    assert code == 2 and "the output folder" in err and "is a file; expected a folder" in err
    (tmp_path / "out").unlink()
    (tmp_path / "c").write_text("not a folder")
    code, err = _cli([], tmp_path, capsys)
    assert code == 2 and "the cache folder" in err and "is a file" in err


def test_cli_refuses_an_out_folder_of_another_configuration(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    other = ExperimentConfig(models=("small_cnn",), train_size=600, width=0.5).to_dict()
    (out / "config.json").write_text(json.dumps(other | {"device_used": "cpu"}))
    before = (out / "config.json").read_text()
    code, err = _cli(["--width", "0.25"], tmp_path, capsys)
    assert code == 2
    assert "holds results of a different configuration (differs in" in err
    assert "width: 0.5 there, 0.25 now" in err and "Pass another --out" in err
    assert (out / "config.json").read_text() == before  # untouched
    assert not (tmp_path / "c").exists()


def test_cli_refuses_results_without_a_config(tmp_path, capsys):
    (tmp_path / "out" / "results").mkdir(parents=True)
    code, err = _cli([], tmp_path, capsys)
    assert code == 2 and "holds results but no config.json" in err


def test_cli_traceback_only_when_asked(tmp_path):
    with pytest.raises(ConfigurationError):
        main(["--traceback", "run", "--gamma", "0", "--out", str(tmp_path / "o")])
