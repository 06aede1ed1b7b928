"""The training-set Fisher computed once: I_Dr from I_D and I_Df equals the direct pass over D_r."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import deepclean.methods.deepclean as deepclean_module
from deepclean import (
    CheckpointError,
    ConfigurationError,
    DeepClean,
    SplitMismatchError,
    TrainFisher,
    ZeroWeights,
    fisher_diagonal,
    precompute_train_fisher,
)


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 36, 3),
    ).to(dtype).eval()


def _data(n: int = 60, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 6, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (n,),
                                                                             generator=gen)


def _split(x, y, n_forget=12):
    return x[:n_forget], y[:n_forget], x[n_forget:], y[n_forget:]


def _max_rel(a: dict, b: dict) -> float:
    return max(((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max()).item()
               for k in b)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_retain_fisher_equals_the_direct_pass(dtype: torch.dtype, rtol: float) -> None:
    model = _model(dtype)
    x, y = _data(dtype=dtype)
    xf, yf, xr, yr = _split(x, y)
    tf = precompute_train_fisher(model, TensorDataset(x, y), batch_size=7)
    fisher_f = fisher_diagonal(model, TensorDataset(xf, yf))
    got = tf.retain_fisher(model, fisher_f, xf, yf, xr, yr)
    direct = fisher_diagonal(model, TensorDataset(xr, yr))
    assert _max_rel(got, direct) <= rtol  # relative to each tensor's largest entry
    for k, v in got.items():
        assert v.dtype == dtype and v.shape == direct[k].shape and bool((v >= 0).all())
    assert tf.n_samples == 60 and tf.time_s > 0


def test_deepclean_with_a_precomputed_fisher_gives_the_same_model() -> None:
    model = _model(torch.float64)
    x, y = _data(dtype=torch.float64)
    xf, yf, xr, yr = _split(x, y)
    tf = precompute_train_fisher(model, TensorDataset(x, y))
    forget, retain = TensorDataset(xf, yf), TensorDataset(xr, yr)
    plain = DeepClean(gamma=1.1, epochs=1, seed=3)
    fast = DeepClean(gamma=1.1, epochs=1, seed=3, train_fisher=tf)
    a = plain.unlearn(model, forget, retain)
    # D_r in another order: the split is checked as a multiset of samples
    perm = torch.randperm(xr.shape[0], generator=torch.Generator().manual_seed(5))
    fast.unlearn(model, forget, TensorDataset(xr[perm], yr[perm]))
    assert all(torch.equal(plain.mask_[k], fast.mask_[k]) for k in plain.mask_)
    assert plain.info_["fisher_mode"] == "two_passes"
    assert fast.info_["fisher_mode"] == "precomputed"
    assert 0 < plain.info_["n_reset"] < plain.info_["n_weights"]
    c = DeepClean(gamma=1.1, epochs=1, seed=3, train_fisher=tf).unlearn(model, forget, retain)
    for (name, pa), pc in zip(a.state_dict().items(), c.state_dict().values(), strict=True):
        assert torch.allclose(pa, pc, rtol=1e-9, atol=1e-12), name
    zw = ZeroWeights(gamma=1.1, train_fisher=tf)
    zw.unlearn(model, forget, retain)
    assert all(torch.equal(zw.mask_[k], plain.mask_[k]) for k in plain.mask_)


def _spy_fisher(monkeypatch: pytest.MonkeyPatch) -> list:
    calls = []
    real = deepclean_module.fisher_diagonal

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(deepclean_module, "fisher_diagonal", spy)
    return calls


@pytest.mark.parametrize("change", ["drop_one", "swap_one", "relabel_one"])
def test_another_split_is_refused_before_any_work(
    change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model()
    x, y = _data()
    tf = precompute_train_fisher(model, TensorDataset(x, y))
    xf, yf, xr, yr = _split(x, y)
    xr, yr = xr.clone(), yr.clone()
    if change == "drop_one":
        xr, yr = xr[1:], yr[1:]
    elif change == "swap_one":
        xr[0] = torch.randn(xr[0].shape, generator=torch.Generator().manual_seed(9))
    else:
        yr[0] = (yr[0] + 1) % 3
    calls = _spy_fisher(monkeypatch)
    counts = {"drop_one": "0 of theirs .* not among them and 1 of them are missing",
              "swap_one": "1 of theirs .* not among them and 1 of them are missing",
              "relabel_one": "1 of theirs .* not among them and 1 of them are missing"}[change]
    with pytest.raises(SplitMismatchError, match="together are not the 60 training samples"
                       f".*{counts}"):
        DeepClean(train_fisher=tf).unlearn(model, TensorDataset(xf, yf), TensorDataset(xr, yr))
    assert calls == []


def test_another_model_is_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    x, y = _data()
    tf = precompute_train_fisher(model, TensorDataset(x, y))
    other = _model()
    with torch.no_grad():
        other[0].weight[0, 0, 0, 0] += 1e-3
    xf, yf, xr, yr = _split(x, y)
    calls = _spy_fisher(monkeypatch)
    with pytest.raises(ConfigurationError, match="compute it again for this model"):
        DeepClean(train_fisher=tf).unlearn(other, TensorDataset(xf, yf), TensorDataset(xr, yr))
    assert calls == []


def test_wrong_type_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="train_fisher must be a TrainFisher"):
        DeepClean(train_fisher={"weight": torch.zeros(1)})


def test_hyperparameters_stay_json_friendly() -> None:
    model = _model()
    x, y = _data()
    tf = precompute_train_fisher(model, TensorDataset(x, y))
    hp = DeepClean(train_fisher=tf).hyperparameters()
    # a collaborator, not a hyperparameter: the same hyperparameters with or without it (the run
    # records how I_Dr was obtained apart, as fisher_mode and precompute_time_s)
    assert "train_fisher" not in hp and hp == DeepClean().hyperparameters()
    import json

    assert json.loads(json.dumps(hp)) == hp


def test_save_and_load_round_trip_and_altered_file(tmp_path) -> None:
    model = _model()
    x, y = _data()
    tf = precompute_train_fisher(model, TensorDataset(x, y))
    path = tf.save(tmp_path / "fisher.safetensors", {"note": "test"})
    back, meta = TrainFisher.load(path)
    assert meta["note"] == "test" and back.n_samples == 60
    assert back.model_sha256 == tf.model_sha256 and torch.equal(back.digests, tf.digests)
    assert all(torch.equal(back.fisher[k], tf.fisher[k]) for k in tf.fisher)
    assert back.time_s == pytest.approx(tf.time_s)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        TrainFisher.load(path)


def test_run_with_precompute_fisher_selects_the_same_weights(tmp_path, capsys) -> None:
    """``deepclean run --precompute-fisher``: same selection as the two-pass run, the one-off
    time recorded apart, the training-set Fisher cached next to the model and reused."""
    import json

    from deepclean.cli import main

    cache = tmp_path / "cache"
    argv = ["run", "--dataset", "digits", "--model", "small_cnn", "--width", "0.25",
            "--train-size", "300", "--epochs", "2", "--scenarios", "random,class",
            "--methods", "deepclean,zero_weights", "--unlearn-epochs", "1", "--device", "cpu",
            "--no-progress", "--threads", "1", "--cache-dir", str(cache)]
    assert main(argv + ["--out", str(tmp_path / "two")]) == 0
    assert main(argv + ["--precompute-fisher", "--out", str(tmp_path / "pre")]) == 0
    out = capsys.readouterr().out
    assert "training-set Fisher I_D on 300 samples" in out
    assert len(list(cache.glob("fisher-*.safetensors"))) == 1

    def load(folder: str) -> dict:
        return {p.stem: json.loads(p.read_text())
                for p in (tmp_path / folder / "results").glob("*.json")}

    two, pre = load("two"), load("pre")
    for scenario in ("random", "class"):
        for method in ("deepclean", "zero_weights"):
            name = f"digits_small_cnn_{scenario}_{method}_seed0"
            assert pre[name]["fisher_mode"] == "precomputed"
            assert two[name]["fisher_mode"] == "two_passes"
            assert pre[name]["n_reset"] == two[name]["n_reset"] > 0
            assert pre[name]["precompute_time_s"] > 0 and "precompute_time_s" not in two[name]
            assert pre[name]["metrics"]["acc_forget"] == pytest.approx(
                two[name]["metrics"]["acc_forget"], abs=1.0)
    assert json.loads((tmp_path / "pre" / "config.json").read_text())["precompute_fisher"]
    assert "computed once per original model" in (tmp_path / "pre" / "results.md").read_text()
    assert "computed once" not in (tmp_path / "two" / "results.md").read_text()
    assert "computed once per original model" in (tmp_path / "pre" / "report.html").read_text()
    audit = json.loads((tmp_path / "pre" / "audit" /
                        "digits_small_cnn_random_deepclean_seed0.json").read_text())
    assert "precompute_time_s" in json.dumps(audit) and "precomputed" in json.dumps(audit)
    # a second run reuses the cached training-set Fisher
    assert main(argv + ["--precompute-fisher", "--out", str(tmp_path / "again")]) == 0
    assert "training-set Fisher I_D: reused" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"precompute_fisher": True, "methods": ("finetune",)},
         "--precompute-fisher only changes deepclean and zero_weights"),
        ({"precompute_fisher": "yes"}, "precompute_fisher must be True or False"),
        ({"hyperparameters": {"deepclean": {"train_fisher": None}}},
         "deepclean.train_fisher cannot be set as a hyperparameter; pass --precompute-fisher"),
        ({"unlearn_epochs": -1}, r"unlearn_epochs must be an integer >= 0, got -1 \(command line: "
                                 "--unlearn-epochs\\)"),
    ],
)
def test_configuration_errors_name_the_flag(fields: dict, message: str) -> None:
    from deepclean.harness.experiment import ExperimentConfig

    with pytest.raises(ConfigurationError, match=message):
        ExperimentConfig(**fields).validate()


def test_training_epochs_error_names_the_flag() -> None:
    from deepclean import TrainConfig

    with pytest.raises(ConfigurationError, match=r"epochs must be an integer >= 1, got -1 "
                                                 r"\(command line: --epochs\)"):
        TrainConfig(epochs=-1)


@pytest.mark.parametrize("data", [{"x": torch.zeros(3, 1, 6, 6)},
                                  (torch.zeros(3, 1, 6, 6), torch.zeros(3, dtype=torch.long)),
                                  "data.pt"])
def test_not_a_dataset_is_a_data_error(data) -> None:
    from deepclean import DataError

    with pytest.raises(DataError, match="expected a torch Dataset|could not read"):
        precompute_train_fisher(_model(), data)
    with pytest.raises(DataError, match="expected a torch Dataset|could not read"):
        fisher_diagonal(_model(), data)


def test_not_a_model_is_a_configuration_error() -> None:
    x, y = _data()
    with pytest.raises(ConfigurationError):
        precompute_train_fisher("model", TensorDataset(x, y))
