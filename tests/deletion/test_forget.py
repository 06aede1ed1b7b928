"""deepclean forget / verify: user models and weights, the library calls, the CLI, the example."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import TensorDataset

from deepclean.cli import main
from deepclean.deletion.api import forget, verify
from deepclean.deletion.usermodel import (
    build_user_model,
    load_user_weights,
    save_like,
    strip_prefixes,
)
from deepclean.errors import CheckpointError, ConfigurationError, DataError
from deepclean.evaluation.mia import mia_family

ROOT = Path(__file__).resolve().parents[2]
FACTORY = """
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 3))


def wider():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 50), nn.ReLU(), nn.Linear(50, 3))


def not_a_model():
    return 42


def broken():
    raise RuntimeError("no GPU here")
"""


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 3))


# ------------------------------------------------------------------------------- model specs


def test_factory_from_file_and_module(tmp_path, monkeypatch):
    (tmp_path / "netdef.py").write_text(FACTORY)
    model = build_user_model(f"{tmp_path}/netdef.py:make")
    assert isinstance(model, nn.Sequential) and model[1].out_features == 48
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(build_user_model("netdef:wider")[1], nn.Linear)


def test_torchvision_and_our_models():
    m = build_user_model("torchvision:resnet18", num_classes=7)
    assert m.fc.out_features == 7
    ours = build_user_model("small_cnn", num_classes=4, in_channels=3, width=0.25)
    assert ours(torch.zeros(2, 3, 8, 8)).shape == (2, 4)


@pytest.mark.parametrize("spec, message", [
    ("nothing", "has no ':'"),
    ("missing.py:make", "no such file"),
    ("{tmp}/netdef.py:absent", "has no function 'absent'"),
    ("{tmp}/netdef.py:not_a_model", "returned int"),
    ("{tmp}/netdef.py:broken", "RuntimeError: no GPU here"),
    ("no_such_module_xyz:make", "cannot import module"),
    ("torchvision:resnet_nope", "torchvision has no model"),
    ("{tmp}/netdef.py:", "expected SOURCE:FUNCTION"),
])
def test_bad_factory_specs_are_refused(tmp_path, spec, message):
    (tmp_path / "netdef.py").write_text(FACTORY)
    with pytest.raises(ConfigurationError, match=message):
        build_user_model(spec.format(tmp=tmp_path), num_classes=3)


# ------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "_orig_mod.module."])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_weights_with_prefixes_load_and_save_back_under_the_same_names(tmp_path, prefix, fmt):
    src = tiny_model()
    with torch.no_grad():
        src[1].weight.add_(1.0)
    state = {prefix + k: v for k, v in src.state_dict().items()}
    path = tmp_path / f"w.{fmt}"
    torch.save(state, path) if fmt == "pt" else save_file(state, str(path))
    target = tiny_model()
    info = load_user_weights(target, path)
    assert info.prefix == prefix and info.format == ("torch" if fmt == "pt" else "safetensors")
    assert torch.equal(target[1].weight, src[1].weight)
    save_like(target, info, tmp_path / "out.safetensors")
    back = load_file(str(tmp_path / "out.safetensors"))
    assert sorted(back) == sorted(state)
    assert strip_prefixes(["a.b"]) == ("", {"a.b": "a.b"})


def test_key_mismatch_is_refused_naming_the_keys(tmp_path):
    state = tiny_model().state_dict()
    state["3.extra"] = torch.zeros(2)
    del state["1.bias"]
    torch.save(state, tmp_path / "w.pt")
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_user_weights(model, tmp_path / "w.pt")
    assert "missing from the file: ['1.bias']" in str(err.value)
    assert "the model does not have: ['3.extra']" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shape_mismatch_and_pickled_model_are_refused(tmp_path):
    wide = nn.Sequential(nn.Flatten(), nn.Linear(64, 50), nn.ReLU(), nn.Linear(50, 3))
    save_file(wide.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match=r"1.weight: \(50, 64\) in the file, \(48, 64\)"):
        load_user_weights(tiny_model(), tmp_path / "w.safetensors")
    torch.save(tiny_model(), tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_user_weights(tiny_model(), tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        load_user_weights(tiny_model(), tmp_path / "none.pt")


# ------------------------------------------------------------------------- one-sample attacks


def test_mia_family_reports_the_loss_attack_as_not_measurable_for_one_sample():
    g = torch.Generator().manual_seed(0)
    z_r, z_f, z_t = (torch.randn(n, 3, generator=g) for n in (30, 1, 20))
    y_r, y_f, y_t = (torch.randint(0, 3, (n,), generator=g) for n in (30, 1, 20))
    out = mia_family(z_r, y_r, z_f, y_f, z_t, y_t)
    assert out["loss_lr_accuracy"] is None and "needs at least 2 samples in D_f" in out["loss_lr_reason"]
    assert 0.0 <= out["entropy_lr"] <= 100.0 and out["efficacy"] in (0.0, 100.0)
    two = mia_family(z_r, y_r, torch.cat([z_f, z_f]), torch.cat([y_f, y_f]), z_t, y_t)
    assert two["loss_lr_accuracy"] is not None and two["loss_lr_reason"] is None


# ----------------------------------------------------------- a memorising model on noise images


def _noise(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), rng.integers(0, 3, n)


def _train(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """Full-batch Adam until the random labels of noise images are memorised."""
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Noise images with random labels (3 classes) as an ImageFolder: 90 training and 90
    held-out PNGs; a model that memorised the training ones (100 % train accuracy, about chance on
    held-out); its weights as .pt; a factory file; deletion requests."""
    root = tmp_path_factory.mktemp("case")
    classes = ("a", "b", "c")
    for split, seed in (("train", 0), ("holdout", 1)):
        xs, ys = _noise(90, seed)
        for c in classes:
            (root / split / c).mkdir(parents=True)
        for i, (img, label) in enumerate(zip(xs, ys)):
            Image.fromarray(img, mode="L").save(root / split / classes[label] / f"{i:03d}.png")
    (root / "netdef.py").write_text(FACTORY)
    from deepclean.deletion.userdata import Preprocessing, load_user_data

    data = load_user_data(root / "train", preprocessing=Preprocessing(grayscale=True))
    hold = load_user_data(root / "holdout", preprocessing=Preprocessing(grayscale=True),
                          classes=data.classes)
    model = _train(data.x, data.y)
    assert (model(data.x).argmax(1) == data.y).float().mean().item() == 1.0
    torch.save(model.state_dict(), root / "model.pt")
    (root / "forget_paths.txt").write_text("\n".join(data.ids[i] for i in range(0, 60, 3)) + "\n")
    (root / "forget_one.txt").write_text(data.ids[7] + "\n")
    return {"root": root, "data": data, "holdout": hold, "model": model}


def _args(case, *extra, weights="model.pt", out=None):
    r = case["root"]
    args = ["--model", f"{r}/netdef.py:make", "--weights", str(r / weights), "--data",
            str(r / "train"), "--grayscale", "--device", "cpu", *extra]
    if out is not None:
        args += ["--out", str(out)]
    return args


def test_verify_of_the_original_against_itself_is_not_verified(case, capsys):
    r = case["root"]
    rc = main(["verify", *_args(case, "--unlearned", str(r / "model.pt"), "--forget",
                                str(r / "forget_paths.txt"), "--holdout", str(r / "holdout"))])
    assert rc == 3
    out = capsys.readouterr().out
    assert out.startswith("NOT UNLEARNED: the model's weights and buffers are identical to the "
                          "original's; Acc_Df 100.0 %")


def test_an_unchanged_model_is_never_verified_even_when_its_verdict_passes():
    """A model that memorised nothing of D_f already looks like unseen data on D_f: the verdict
    passes, but verifying it against itself must not report an unlearning (exit 3)."""
    g = torch.Generator().manual_seed(0)
    x, xh = torch.randn(80, 4, generator=g), torch.randn(80, 4, generator=g)
    y, yh = torch.arange(80) % 2, torch.arange(80) % 2
    model = nn.Linear(4, 2)  # untrained: treats training and held-out samples alike
    rec = verify(model, model, TensorDataset(x, y), list(range(20)), TensorDataset(xh, yh))
    assert rec["verdict"]["forgotten"] is True  # the verdict alone cannot tell
    assert rec["unchanged"] is True and rec["verified"] is False
    assert rec["summary"].startswith("NOT UNLEARNED")
    changed = nn.Linear(4, 2)
    with torch.no_grad():
        changed.weight.copy_(model.weight)
        changed.bias.copy_(model.bias + 1e-3)
    assert verify(model, changed, TensorDataset(x, y), list(range(20)),
                  TensorDataset(xh, yh))["unchanged"] is False


def test_held_out_data_that_is_not_held_out_is_refused_before_any_work():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 4, generator=g), torch.arange(100) % 2
    xh, yh = torch.randn(100, 4, generator=g), torch.arange(100) % 2
    model = nn.Linear(4, 2)
    calls = []
    with pytest.raises(DataError, match=r"identical to samples of D_f \(held-out rows \[7\]\)"):
        xh_f = xh.clone()
        xh_f[7] = x[3]  # a sample of the request in the held-out data
        forget(model, TensorDataset(x, y), [3, 5], holdout=TensorDataset(xh_f, yh),
               hyperparameters={"epochs": 1}) or calls.append(1)
    with pytest.raises(DataError, match="50 of the 100 held-out samples are identical to training"):
        mixed = torch.cat([x[50:], xh[50:]])  # half of it is training data
        verify(model, model, TensorDataset(x, y), [0], TensorDataset(mixed, yh))
    one = xh.clone()
    one[0] = x[60]  # a natural duplicate (1 %) is allowed and noted
    rec = verify(model, model, TensorDataset(x, y), [0], TensorDataset(one, yh))
    assert any("1 held-out sample(s) are identical to training samples" in n
               for n in rec["notes"])
    assert not calls


def test_library_verify_record(case):
    rec = verify(case["model"], case["model"], case["data"], list(range(0, 60, 3)),
                 case["holdout"], seed=0)
    assert rec["verified"] is False and rec["status"] == "not verified"
    assert rec["n_forget"] == 20 and rec["scenario"] == "sample"
    assert rec["models"]["original"]["acc_forget"] == 100.0
    assert rec["models"]["original"]["attack_auc"] > 0.8  # memorised: D_f fitted far better
    assert rec["models"]["unlearned"]["mia_family"]["lira"] is None
    assert rec["verdict"]["forgotten"] is False
    json.dumps(rec)  # JSON-ready


def test_library_forget_without_holdout_says_what_cannot_be_verified(case):
    _, rec = forget(case["model"], case["data"], list(range(10)),
                        hyperparameters={"epochs": 1})
    assert rec["status"] == "cannot verify" and rec["verified"] is False
    assert any("attack AUC" in c for c in rec["cannot_verify"])
    assert rec["unlearning"]["gamma"] == 1.1 and rec["unlearning"]["gamma_source"] == "default"
    assert rec["unlearning"]["weights_changed"] == rec["unlearning"]["info"]["n_reset"] > 0
    # one memorised sample (loss near 0): its Fisher is near 0, no ratio exceeds 1.1, nothing is
    # reset, and the record says so
    _, one = forget(case["model"], case["data"], [case["data"].ids[0]],
                    hyperparameters={"epochs": 1})
    assert one["unlearning"]["weights_changed"] == 0 == one["unlearning"]["info"]["n_reset"]
    assert "changed no weight" in one["notes"][0]
    with pytest.raises(ConfigurationError, match="held-out data"):
        forget(case["model"], case["data"], [0], hyperparameters={"gamma": "auto"})


def test_cli_forget_by_paths_writes_everything_and_keeps_the_input(case, tmp_path, capsys):
    r = case["root"]
    before = sha(r / "model.pt")
    out = tmp_path / "res"
    rc = main(["forget", *_args(case, "--forget", str(r / "forget_paths.txt"), "--holdout",
                                str(r / "holdout"), "--hp", "epochs=2", out=out)])
    assert rc in (0, 3)
    assert sha(r / "model.pt") == before
    assert sorted(os.listdir(out)) == sorted(["unlearned.safetensors", "audit.json", "audit.txt",
                                               "verification.json", "report.html"])
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]
    model = build_user_model(f"{r}/netdef.py:make")
    model.load_state_dict(load_file(str(out / "unlearned.safetensors")), strict=True)
    audit = json.loads((out / "audit.json").read_text())
    ver = json.loads((out / "verification.json").read_text())
    assert audit["forgotten"]["count"] == 20
    assert audit["forgotten"]["paths"] == (r / "forget_paths.txt").read_text().split()
    assert audit["weights"]["input"]["file_sha256"] == before
    assert audit["weights"]["input"]["unchanged"] is True
    assert audit["weights"]["output"]["file_sha256"] == sha(out / "unlearned.safetensors")
    assert audit["model"]["weights_changed"] > 0
    assert audit["method"]["name"] == "deepclean" and audit["method"]["gamma_source"] == "auto"
    assert audit["method"]["gamma"] == ver["unlearning"]["gamma"] > 0
    assert audit["versions"]["torch"] == torch.__version__
    assert ver["verified"] == (rc == 0) and ver["n_forget"] == 20
    assert "<html" in (out / "report.html").read_text()
    assert "SHA-256 of the paths" in (out / "audit.txt").read_text()
    # the same --out again is refused: results are never overwritten
    assert main(["forget", *_args(case, "--forget", str(r / "forget_paths.txt"), out=out)]) == 2
    assert "already holds results" in capsys.readouterr().err


def test_cli_one_sample_without_storing_ids(case, tmp_path):
    r = case["root"]
    out = tmp_path / "one"
    rc = main(["forget", *_args(case, "--forget", str(r / "forget_one.txt"), "--holdout",
                                str(r / "holdout"), "--no-store-indices", "--hp", "epochs=1",
                                out=out)])
    assert rc in (0, 3)
    audit = json.loads((out / "audit.json").read_text())
    ver = json.loads((out / "verification.json").read_text())
    assert audit["forgotten"]["count"] == 1 and "indices" not in audit["forgotten"]
    assert "paths" not in audit["forgotten"] and len(audit["forgotten"]["paths_sha256"]) == 64
    assert case["data"].ids[7] not in (out / "audit.txt").read_text()
    assert ver["n_forget"] == 1
    assert ver["models"]["unlearned"]["mia_family"]["loss_lr_accuracy"] is None
    assert ver["verdict"]["metrics"]["attack_auc"] is None  # not measurable on one sample


def test_cli_finetune_with_zero_epochs_is_not_verified(case, tmp_path, capsys):
    r = case["root"]
    rc = main(["forget", *_args(case, "--forget", str(r / "forget_paths.txt"), "--holdout",
                                str(r / "holdout"), "--method", "finetune", "--hp", "epochs=0",
                                out=tmp_path / "ft")])
    assert rc == 3
    audit = json.loads((tmp_path / "ft" / "audit.json").read_text())
    assert audit["model"]["weights_changed"] == 0
    # a method without a threshold prints, records and reports no gamma
    out = capsys.readouterr().out
    assert "\n0 of " in out and "gamma" not in out
    assert "gamma used" not in (tmp_path / "ft" / "audit.txt").read_text()
    assert "Gamma used" not in (tmp_path / "ft" / "report.html").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--forget", "{bad_index}"], "out of range: 500"),
    (["--forget", "{bad_path}"], "'z/999.png'"),
    (["--forget", "{dup}"], "duplicate"),
    (["--forget-class", "q"], "no such class"),
    (["--forget", "{ok}", "--gamma", "auto"], "pass --holdout"),
    (["--forget", "{ok}", "--method", "nope"], "unknown method"),
])
def test_cli_bad_input_exits_2(case, tmp_path, capsys, extra, message):
    files = {"bad_index": "3\n500\n", "bad_path": "z/999.png\n", "dup": "4\n4\n", "ok": "4\n"}
    for name, text in files.items():
        (tmp_path / f"{name}.txt").write_text(text)
    extra = [e.format(**{k: tmp_path / f"{k}.txt" for k in files}) for e in extra]
    rc = main(["forget", *_args(case, *extra, out=tmp_path / "o")])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_weights_of_another_architecture_exit_2(case, tmp_path, capsys):
    r = case["root"]
    rc = main(["forget", "--model", f"{r}/netdef.py:wider", "--weights", str(r / "model.pt"),
               "--data", str(r / "train"), "--grayscale", "--forget",
               str(r / "forget_one.txt"), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not fit --model" in err and "1.weight: (48, 64) in the file" in err


def test_cli_npz_and_dataset_name(tmp_path):
    x, y = _noise(40, 3)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    model = tiny_model()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "netdef.py").write_text(FACTORY)
    (tmp_path / "f.json").write_text("[1, 5]")
    rc = main(["forget", "--model", f"{tmp_path}/netdef.py:make", "--weights",
               str(tmp_path / "w.safetensors"), "--data", str(tmp_path / "d.npz"), "--forget",
               str(tmp_path / "f.json"), "--hp", "epochs=1", "--out", str(tmp_path / "o")])
    assert rc == 3  # no --holdout: cannot verify
    ver = json.loads((tmp_path / "o" / "verification.json").read_text())
    assert ver["status"] == "cannot verify" and ver["n_data"] == 40
    # a built-in data set by name, DeepClean's own architecture
    from deepclean.data.models import build_model

    small = build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=0)
    save_file(small.state_dict(), str(tmp_path / "s.safetensors"))
    (tmp_path / "f.txt").write_text("0\n1\n2\n")
    rc = main(["forget", "--model", "small_cnn", "--width", "0.25", "--weights",
               str(tmp_path / "s.safetensors"), "--data", "digits", "--holdout", "digits:test",
               "--forget", str(tmp_path / "f.txt"), "--method", "finetune", "--hp", "epochs=0",
               "--out", str(tmp_path / "o2")])
    assert rc in (0, 3)
    ver = json.loads((tmp_path / "o2" / "verification.json").read_text())
    assert ver["n_data"] == 1497 and ver["n_holdout"] == 300 and ver["n_forget"] == 3


def test_python_dash_m_exit_status(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "deepclean", "forget", "--model", "small_cnn",
                           "--weights", str(tmp_path / "none.pt"), "--data", "digits",
                           "--forget", str(tmp_path / "none.txt")],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 2 and "deepclean: error:" in proc.stderr


# ---------------------------------------------------------------------- the worked example


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
def test_worked_example_at_small_scale(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHON": sys.executable,
           "N_TRAIN": "300", "N_HOLDOUT": "300", "EPOCHS": "60", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "examples" / "forget_image_folder.sh"),
                           str(tmp_path / "ex")], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    statuses = [line for line in proc.stdout.splitlines() if line.startswith("exit status")]
    assert len(statuses) == 4 and all(s in ("exit status 0", "exit status 3") for s in statuses)
    # the original, verified against itself, still remembers the 20 images
    assert statuses[0] == "exit status 3"
    for name, n in (("forget-20", 20), ("forget-1", 1)):
        ver = json.loads((tmp_path / "ex" / name / "verification.json").read_text())
        assert ver["n_forget"] == n and ver["n_data"] == 300
        audit = json.loads((tmp_path / "ex" / name / "audit.json").read_text())
        assert len(audit["forgotten"]["paths"]) == n
        assert audit["weights"]["input"]["unchanged"] is True


# ------------------------------------------------------- findings of a new-user test (h-forgetfix)


def test_a_pass_that_cannot_tell_an_unlearned_model_from_an_unchanged_one_is_not_verified():
    """The original already treats D_f like held-out data: the verdict passes for any model, so a
    pass proves nothing; the record says CANNOT VERIFY and ``verified`` is False (exit 3)."""
    g = torch.Generator().manual_seed(0)
    x, xh = torch.randn(80, 4, generator=g), torch.randn(80, 4, generator=g)
    y, yh = torch.arange(80) % 2, torch.arange(80) % 2
    model = nn.Linear(4, 2)  # constant logits: memorised nothing, D_f looks like held-out data
    changed = nn.Linear(4, 2)
    with torch.no_grad():
        for m, b in ((model, 0.0), (changed, 1e-3)):
            m.weight.zero_()
            m.bias.fill_(b)
    rec = verify(model, changed, TensorDataset(x, y), list(range(20)), TensorDataset(xh, yh))
    assert rec["original_verdict"]["forgotten"] is True and rec["verdict"]["passed"] is True
    assert rec["unchanged"] is False
    assert rec["verified"] is False and rec["status"] == "cannot verify"
    assert rec["summary"].startswith("CANNOT VERIFY: the original model already passes")


def test_utility_lost_where_forgetting_cannot_be_told_is_not_called_forgotten():
    """The original already treats D_f like held-out data and the unlearned model collapsed
    onto the rare class: its verdict is "forgotten, utility lost" as measured, but "forgotten"
    is what the check cannot tell here; the record says CANNOT VERIFY, UTILITY LOST and the
    status is a failure, not "cannot verify"."""
    g = torch.Generator().manual_seed(0)
    x, xh = torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g)
    y = yh = (torch.arange(200) % 10 == 0).long()  # 90 % class 0, 10 % class 1
    model, collapsed = nn.Linear(4, 2), nn.Linear(4, 2)
    with torch.no_grad():
        for m, bias in ((model, (1.0, 0.0)), (collapsed, (0.0, 1.0))):
            m.weight.zero_()  # constant logits: the same prediction for every input
            m.bias.copy_(torch.tensor(bias))
    rec = verify(model, collapsed, TensorDataset(x, y), list(range(40)), TensorDataset(xh, yh))
    assert rec["original_verdict"]["forgotten"] is True
    assert rec["verdict"]["forgotten"] is True and rec["verdict"]["utility_kept"] is False
    assert rec["verified"] is False and rec["status"] == "not verified"
    assert rec["summary"].startswith("CANNOT VERIFY, UTILITY LOST: the original model already "
                                     "passes the forgetting check"), rec["summary"]
    assert "FORGOTTEN" not in rec["summary"].split(";")[0].replace("UTILITY LOST", "")


def test_a_model_that_learned_d_f_where_the_original_had_not_is_not_forgotten_without_a_hedge():
    """The original treats D_f like held-out data; the "unlearned" model looks D_f up and gets
    it all right: NOT FORGOTTEN, and the note says the unlearning left a trace rather than that
    the check cannot tell."""
    g = torch.Generator().manual_seed(0)
    x, xh = torch.randn(80, 4, generator=g), torch.randn(80, 4, generator=g)
    y, yh = torch.arange(80) % 2, torch.arange(80) % 2
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1.0, 0.0]))  # class 0 for every input: 50 % everywhere

    class Lookup(nn.Module):
        def __init__(self, xf: torch.Tensor, yf: torch.Tensor) -> None:
            super().__init__()
            self.xf, self.yf = xf, yf
            self.scale = nn.Parameter(torch.tensor(5.0))  # a weight, so it differs from model

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            d = torch.cdist(inp, self.xf, compute_mode="donot_use_mm_for_euclid_dist")
            hit = d.min(dim=1).values < 1e-6
            label = torch.where(hit, self.yf[d.argmin(dim=1)], torch.zeros_like(hit).long())
            return nn.functional.one_hot(label, 2).float() * self.scale

    rec = verify(model, Lookup(x[:20], y[:20]), TensorDataset(x, y), list(range(20)),
                 TensorDataset(xh, yh))
    assert rec["original_verdict"]["forgotten"] is True
    assert rec["summary"].startswith("NOT FORGOTTEN: Acc_Df 100.0 %"), rec["summary"]
    assert rec["status"] == "not verified"
    assert any("the unlearning left a trace" in n for n in rec["notes"]), rec["notes"]
    assert not any("cannot tell" in n for n in rec["notes"])


def test_cli_verify_exits_3_when_the_original_already_looks_unseen(case, tmp_path, capsys):
    r = case["root"]
    untrained = tiny_model()  # never saw the noise images: D_f already looks like held-out data
    torch.save(untrained.state_dict(), tmp_path / "untrained.pt")
    with torch.no_grad():
        untrained[3].bias.add_(1e-3)
    save_file(untrained.state_dict(), str(tmp_path / "nudged.safetensors"))
    rc = main(["verify", *_args(case, "--unlearned", str(tmp_path / "nudged.safetensors"),
                                "--forget", str(r / "forget_paths.txt"), "--holdout",
                                str(r / "holdout"), weights=tmp_path / "untrained.pt")])
    out = capsys.readouterr().out
    assert out.startswith("CANNOT VERIFY: the original model already passes this check"), out
    assert rc == 3
    assert "CANNOT VERIFY" in (ROOT / "docs" / "forget.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--method", "nosuch"], "unknown method 'nosuch'"),
    (["--method", "finetune", "--hp", "epochs=abc"], "epochs must be an int >= 0, got 'abc'"),
    (["--hp", "nosuch=1"], "has no hyperparameter ['nosuch']"),
    (["--method", "finetune", "--gamma", "3"], "method 'finetune' has no threshold gamma"),
    (["--hp", "seed=3"], "use --seed"),
    (["--gamma", "2", "--hp", "gamma=3"], "gamma given twice"),
    (["--gamma", "auto"], "pass --holdout"),
])
def test_cli_method_options_are_refused_before_any_loading(tmp_path, capsys, extra, message):
    """Data and weights that do not exist: the option must be refused first, in one line, without
    the 'deepclean forget: ... samples' header."""
    rc = main(["forget", "--model", "small_cnn", "--weights", str(tmp_path / "none.pt"), "--data",
               str(tmp_path / "none.npz"), "--forget", str(tmp_path / "none.txt"), "--out",
               str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1 and "samples, method" not in err
    assert not (tmp_path / "o").exists()


def test_cli_negative_num_workers_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["forget", "--model", "small_cnn", "--weights", str(tmp_path / "none.pt"), "--data",
              str(tmp_path / "none.npz"), "--forget", str(tmp_path / "none.txt"),
              "--num-workers", "-1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert ("argument --num-workers: expected a number of worker processes >= 0 (0 reads in the "
            "main process), got '-1'") in err


def test_weights_that_disagree_with_the_data_the_model_was_built_from_say_so(tmp_path, capsys):
    """small_cnn takes its input channels and classes from --data: a 3-channel .npz or labels
    10-19 for 1-channel, 10-class weights is a data problem, and the message says so."""
    from deepclean.data.models import build_model

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", x=rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8),
             y=rng.integers(0, 10, 30))
    np.savez(tmp_path / "labels.npz", x=rng.integers(0, 256, (30, 8, 8), dtype=np.uint8),
             y=rng.integers(10, 20, 30))
    small = build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=0)
    save_file(small.state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "f.txt").write_text("0\n1\n")

    def run(data: str) -> str:
        rc = main(["forget", "--model", "small_cnn", "--width", "0.25", "--weights",
                   str(tmp_path / "w.safetensors"), "--data", str(tmp_path / data), "--forget",
                   str(tmp_path / "f.txt"), "--out", str(tmp_path / "o"), "--hp", "epochs=1"])
        assert rc == 2
        return capsys.readouterr().err

    err = run("rgb.npz")
    assert "the model built for this data has 3 input channels (from --data" in err
    assert "but the weights file has 1: check --data (channels" in err
    err = run("labels.npz")
    assert "the model built for this data has 20 classes (from --data" in err
    assert "but the weights file has 10: check --data (label range) or pass --num-classes" in err
    # a factory model decides its own shape: no such sentence
    assert "built for this data" not in str(pytest.raises(
        CheckpointError, load_user_weights, tiny_model(), tmp_path / "w.safetensors").value)


def test_a_whole_model_pickle_is_refused_in_one_plain_line(tmp_path):
    torch.save(tiny_model(), tmp_path / "whole.pt")
    with pytest.raises(CheckpointError) as err:
        load_user_weights(tiny_model(), tmp_path / "whole.pt")
    text = str(err.value)
    assert "\x1b" not in text and "\n" not in text
    assert "weights_only=False" not in text and "..." not in text
    assert "the file holds Python objects other than tensors" in text
    assert "torch.save(model.state_dict(), path)" in text and ".safetensors" in text


def test_worked_example_pins_one_cpu_thread():
    """docs/forget.md shows the output of one CPU thread; the script must run with one."""
    script = (ROOT / "examples" / "forget_image_folder.sh").read_text()
    assert "export OMP_NUM_THREADS=1" in script
    assert "--threads 1" in script


def test_num_classes_help_and_docs_agree_with_the_code():
    import argparse

    from deepclean.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub.choices["forget"]._actions}
    assert "default: the number of classes in --data" in helps["num_classes"]
    doc = (ROOT / "docs" / "forget.md").read_text()
    assert "`torchvision:NAME` with `--num-classes`" not in doc
    assert "the number of classes in `--data`" in doc


def test_cli_verify_checks_the_audit_record_against_the_weights_and_the_request(case, tmp_path,
                                                                               capsys):
    r = case["root"]
    out = tmp_path / "res"
    main(["forget", *_args(case, "--forget", str(r / "forget_paths.txt"), "--holdout",
                           str(r / "holdout"), "--hp", "epochs=2", out=out)])
    capsys.readouterr()
    audit = str(out / "audit.json")
    unlearned = str(out / "unlearned.safetensors")

    def verify(*extra):
        rc = main(["verify", *_args(case, "--holdout", str(r / "holdout"), *extra)])
        return rc, capsys.readouterr()

    rc, cap = verify("--unlearned", unlearned, "--forget", str(r / "forget_paths.txt"),
                     "--audit", audit, "--out", str(tmp_path / "v"))
    ver = json.loads((tmp_path / "v" / "verification.json").read_text())
    assert ver["audit_check"] == {"audit": audit, "matches": True, "mismatches": []}
    assert "names these weights and this deletion request" in cap.out
    assert not cap.out.startswith("AUDIT MISMATCH")

    rc, cap = verify("--unlearned", unlearned, "--forget", str(r / "forget_one.txt"),
                     "--audit", audit)
    assert rc == 3
    assert cap.out.startswith("AUDIT MISMATCH: the deletion request (1 samples) is not the one "
                              "the audit record names (20 samples")
    rc, cap = verify("--unlearned", str(r / "model.pt"), "--forget",
                     str(r / "forget_paths.txt"), "--audit", audit)
    assert rc == 3 and cap.out.startswith(
        "AUDIT MISMATCH: --unlearned is not the model the audit record says was written")

    (tmp_path / "bad.json").write_text('{"forgotten": {}}')
    good = json.loads((out / "audit.json").read_text())
    good["model"]["sha256_before"] = None
    (tmp_path / "null.json").write_text(json.dumps(good))
    good["model"]["sha256_before"], good["forgotten"]["count"] = "abc", "20"
    (tmp_path / "text.json").write_text(json.dumps(good))
    for bad, message in ((tmp_path / "bad.json", "not an audit record of deepclean forget"),
                         (tmp_path / "null.json", "model.sha256_before should be a SHA-256 "
                          "string, found None"),
                         (tmp_path / "text.json", "forgotten.count should be an integer, "
                          "found '20'"),
                         (tmp_path / "none.json", "no such file")):
        rc, cap = verify("--unlearned", unlearned, "--forget", str(r / "forget_paths.txt"),
                         "--audit", str(bad))
        assert rc == 2 and message in cap.err
