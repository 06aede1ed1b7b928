"""Files (issue 6): corrupt cache entries are rebuilt, a gold model of another split is refused,
finished results are resumed (never mixed with another configuration), and every unlearning
leaves an audit record, as JSON and as text. Runs on scikit-learn's digits (no download)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import deepclean
from deepclean import (
    ConfigurationError,
    DeepClean,
    SplitMismatchError,
    TrainConfig,
    audit_record,
    build_model,
    check_same_split,
    evaluate_for_audit,
    format_audit,
    random_split,
    write_audit,
)
from deepclean.checkpoint import load_checkpoint, save_checkpoint, state_digest
from deepclean.harness.experiment import ExperimentConfig, run_experiment

NAME = "digits_small_cnn_random_deepclean_seed0"


def tiny_config(root: Path, **changes) -> ExperimentConfig:
    fields = dict(
        dataset="digits", models=("small_cnn",), width=0.25, train_size=300,
        train=TrainConfig(epochs=1, batch_size=64), scenarios=("random",),
        methods=("deepclean",), unlearn_epochs=1, out_dir=str(root / "out"),
        cache_dir=str(root / "cache"), device="cpu", progress=False,
    )
    fields.update(changes)
    return ExperimentConfig(**fields)


def run(config: ExperimentConfig) -> tuple[list[dict], str]:
    lines: list[str] = []
    records = run_experiment(config, log=lines.append)
    return records, "\n".join(lines)


def by_method(records: list[dict]) -> dict[str, dict]:
    return {r["method"]: r for r in records}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("first")
    records, log = run(tiny_config(root))
    return root, records, log


def _copy_run(first_run, tmp_path) -> Path:
    root, _, _ = first_run
    shutil.copytree(root, tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------- cache entries


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_hash", "garbage"])
def test_a_damaged_cache_entry_is_rebuilt_never_used(first_run, tmp_path, damage):
    root = _copy_run(first_run, tmp_path)
    _, records, _ = first_run
    original = next((root / "cache").glob("original-*.safetensors"))
    good_state, good_meta = load_checkpoint(original)
    data = original.read_bytes()
    if damage == "truncate":
        original.write_bytes(data[: len(data) // 3])
    elif damage == "flip":
        altered = bytearray(data)
        altered[-9] ^= 0x40  # a byte inside the last tensor: still a valid file, wrong hash
        original.write_bytes(bytes(altered))
    elif damage == "garbage":
        original.write_bytes(b"\x00" * 64)
    else:  # a valid safetensors file with the right key but no recorded hash
        from safetensors.torch import save_file

        meta = {k: v for k, v in good_meta.items() if k != "state_sha256"}
        save_file(good_state, str(original), metadata={"deepclean": json.dumps(meta)})
    records2, log = run(tiny_config(root))
    assert "original model: cache entry unusable" in log
    assert "original model: training on" in log
    state, meta = load_checkpoint(original)  # rebuilt: loads, hash checked
    assert meta["state_sha256"] == good_meta["state_sha256"]
    assert by_method(records2)["deepclean"]["metrics"] == by_method(records)["deepclean"]["metrics"]


def test_a_cache_entry_with_another_key_is_not_used(first_run, tmp_path):
    root = _copy_run(first_run, tmp_path)
    gold = next((root / "cache").glob("gold-*.safetensors"))
    state, meta = load_checkpoint(gold)
    model = build_model("small_cnn", in_channels=1, num_classes=10, width=0.25)
    model.load_state_dict(state)
    save_checkpoint(gold, model, {**meta, "key": "something-else"})
    _, log = run(tiny_config(root))
    assert "gold model: cache entry" in log and "has another key; retraining" in log


# ---------------------------------------------------------------- gold model of another split


def test_check_same_split_refuses_a_gold_model_of_another_split(tmp_path):
    a, b = random_split(100, 0.1, seed=0), random_split(100, 0.1, seed=1)
    model = build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=0)
    path = save_checkpoint(tmp_path / "gold.safetensors", model, {"forget_sha256": a.digest})
    _, meta = load_checkpoint(path)
    check_same_split(meta, a)  # the right split passes
    check_same_split(meta, a.digest)
    with pytest.raises(SplitMismatchError, match="trained on another forget/retain split"):
        check_same_split(meta, b)
    with pytest.raises(SplitMismatchError, match="records no forget_sha256"):
        check_same_split({}, b)
    check_same_split({"determinants": {"forget_sha256": b.digest}}, b)  # cache-entry layout


def test_the_harness_refuses_a_gold_model_of_another_split(tmp_path, monkeypatch):
    import deepclean.harness.cache as cache
    import deepclean.harness.records as records

    real = cache._train_or_load
    evaluated = []

    def wrong_gold(ctx, *, kind, **kwargs):
        model, meta = real(ctx, kind=kind, **kwargs)
        if kind == "gold":
            meta = {**meta, "determinants": {**meta["determinants"], "forget_sha256": "0" * 64}}
        return model, meta

    monkeypatch.setattr(cache, "_train_or_load", wrong_gold)
    monkeypatch.setattr(records, "evaluate", lambda *a, **k: evaluated.append(1))
    with pytest.raises(SplitMismatchError, match="gold model was trained on another"):
        run(tiny_config(tmp_path))
    assert not evaluated  # refused before any evaluation


# ---------------------------------------------------------------- resume and out folder


def test_a_finished_run_is_resumed_not_recomputed(first_run, tmp_path):
    root = _copy_run(first_run, tmp_path)
    _, records, first_log = first_run
    assert "training on" in first_log
    records2, log = run(tiny_config(root))
    assert "resuming in" in log and "deepclean: reused the finished result" in log
    assert "training on" not in log and "unlearning with" not in log
    a, b = by_method(records), by_method(records2)
    assert a["deepclean"] == b["deepclean"]  # the very record (same time_s): reused
    assert a["gold"]["metrics"] == b["gold"]["metrics"]


def test_a_result_whose_checkpoint_is_damaged_is_recomputed(first_run, tmp_path):
    root = _copy_run(first_run, tmp_path)
    _, records, _ = first_run
    ckpt = root / "out" / "checkpoints" / f"{NAME}.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    records2, log = run(tiny_config(root))
    assert "recomputing (checkpoint unusable" in log and "unlearning with deepclean" in log
    a, b = by_method(records)["deepclean"], by_method(records2)["deepclean"]
    assert a["metrics"] == b["metrics"] and a["state_sha256"] == b["state_sha256"]


def test_an_added_method_runs_and_the_finished_one_is_reused(first_run, tmp_path):
    root = _copy_run(first_run, tmp_path)
    records2, log = run(tiny_config(root, methods=("deepclean", "zero_weights")))
    assert "deepclean: reused" in log and "unlearning with zero_weights" in log
    assert set(by_method(records2)) == {"original", "gold", "deepclean", "zero_weights"}


@pytest.mark.parametrize("change", [dict(gamma_random=1.5), dict(seeds=(1,)),
                                    dict(train=TrainConfig(epochs=2, batch_size=64))])
def test_another_configuration_in_the_same_out_folder_is_refused(first_run, tmp_path, change):
    root = _copy_run(first_run, tmp_path)
    before = {p: p.read_bytes() for p in (root / "out").rglob("*") if p.is_file()}
    with pytest.raises(ConfigurationError, match="holds results of a different configuration"):
        run(tiny_config(root, **change))
    after = {p: p.read_bytes() for p in (root / "out").rglob("*") if p.is_file()}
    assert before == after  # nothing overwritten


def test_every_file_is_complete_and_no_temporary_file_is_left(first_run):
    root, _, _ = first_run
    out = root / "out"
    for path in out.rglob("*.json"):
        json.loads(path.read_text())
    for path in list(out.rglob("*.safetensors")) + list((root / "cache").glob("*.safetensors")):
        load_checkpoint(path)  # hash checked
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- audit record


def test_each_unlearning_writes_an_audit_record(first_run):
    root, records, _ = first_run
    audit = json.loads((root / "out" / "audit" / f"{NAME}.json").read_text())
    text = (root / "out" / "audit" / f"{NAME}.txt").read_text()
    rec = by_method(records)["deepclean"]
    manifest = json.loads((root / "out" / "splits" / "digits_random_seed0.json").read_text())
    # what was forgotten
    assert audit["forgotten"]["indices"] == manifest["forget_indices"]
    assert audit["forgotten"]["sha256"] == rec["forget_sha256"] == manifest["forget_sha256"]
    assert audit["forgotten"]["count"] == rec["n_forget"] == 30
    # the method and its hyperparameters
    assert audit["method"]["name"] == "deepclean"
    assert audit["method"]["hyperparameters"] == rec["hyperparameters"]
    assert audit["method"]["hyperparameters"]["gamma"] == 1.1
    # hashes before and after, number of weights changed
    original_state, _ = load_checkpoint(next((root / "cache").glob("original-*.safetensors")))
    after_state, after_meta = load_checkpoint(root / "out" / "checkpoints" / f"{NAME}.safetensors")
    assert audit["model"]["sha256_before"] == state_digest(original_state)
    assert audit["model"]["sha256_after"] == after_meta["state_sha256"] == rec["state_sha256"]
    model = build_model("small_cnn", in_channels=1, num_classes=10, width=0.25)
    params = {n for n, _ in model.named_parameters()}
    changed = sum(int((original_state[k] != after_state[k]).sum()) for k in params)
    assert audit["model"]["weights_changed"] == changed
    assert 0 < changed <= rec["n_reset"]  # only reset (then fine-tuned) weights move
    # metrics against the gold model
    assert audit["evaluation"]["metrics"] == rec["metrics"]
    assert audit["evaluation"]["gold_metrics"] == rec["gold_metrics"]
    assert audit["evaluation"]["gaps_to_gold"]["d_acc_forget"] == rec["gaps"]["d_acc_forget"]
    # times and versions
    assert audit["times"]["duration_s"] == rec["time_s"]
    assert audit["times"]["started_at"] <= audit["times"]["finished_at"]
    assert audit["versions"]["deepclean"] == deepclean.__version__
    assert audit["versions"]["torch"] == torch.__version__
    for needle in ("What was forgotten", "deepclean", audit["model"]["sha256_after"],
                   f"weights changed:        {changed} of", "gold model", torch.__version__):
        assert needle in text


def test_no_store_indices_keeps_only_the_hash(tmp_path):
    records, _ = run(tiny_config(tmp_path, store_indices=False))
    out = tmp_path / "out"
    audit = json.loads((out / "audit" / f"{NAME}.json").read_text())
    manifest = json.loads((out / "splits" / "digits_random_seed0.json").read_text())
    assert "indices" not in audit["forgotten"] and audit["forgotten"]["indices_stored"] is False
    assert "forget_indices" not in manifest
    assert audit["forgotten"]["sha256"] == manifest["forget_sha256"]
    assert "not stored (only their hash)" in (out / "audit" / f"{NAME}.txt").read_text()


def test_audit_record_without_a_gold_model(tmp_path, tiny_data):
    forget, retain = tiny_data
    g = torch.Generator().manual_seed(5)
    test = TensorDataset(torch.randn(60, 1, 8, 8, generator=g),
                         torch.randint(0, 10, (60,), generator=g))
    model = build_model("small_cnn", in_channels=1, num_classes=10, width=0.25, seed=0)
    method = DeepClean(epochs=1, batch_size=64)
    unlearned = method.unlearn(model, forget, retain)
    metrics, reference = evaluate_for_audit(
        unlearned, x_forget=forget.tensors[0], y_forget=forget.tensors[1],
        x_test=test.tensors[0], y_test=test.tensors[1], x_retain=retain.tensors[0],
        y_retain=retain.tensors[1])
    record = audit_record(before=model, after=unlearned, forget_indices=range(40), n_train=240,
                          method=method, metrics=metrics, reference_metrics=reference,
                          duration_s=0.1, store_indices=False)
    ev = record["evaluation"]
    assert ev["reference"].startswith("test set")
    assert ev["acc_forget_minus_acc_test"] == metrics["acc_forget"] - metrics["acc_test"]
    assert "mia_test_half" in ev["reference_metrics"] and "gold_metrics" not in ev
    assert record["method"]["info"]["n_reset"] == method.info_["n_reset"]
    assert record["model"]["weights_changed"] > 0
    assert record["model"]["sha256_before"] == state_digest(model.state_dict())
    json_path, text_path = write_audit(record, tmp_path / "audit", "request-17")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(record))
    assert text_path.read_text() == format_audit(record)
    assert "test set (never seen in training)" in text_path.read_text()
    # nothing changed: zero weights changed
    same = audit_record(before=model, after=model, forget_indices=[1], method="none")
    assert same["model"]["weights_changed"] == 0
    assert same["model"]["sha256_before"] == same["model"]["sha256_after"]


# ---------------------------------------------------------------- caller's random state


def test_an_experiment_leaves_the_global_random_state_alone(first_run, tmp_path):
    root = _copy_run(first_run, tmp_path)
    torch.manual_seed(1234)
    np.random.seed(99)
    random.seed(7)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    run(tiny_config(root, methods=("deepclean", "random_label")))
    assert torch.equal(states[0], torch.get_rng_state())
    assert np.array_equal(states[1], np.random.get_state()[1])
    assert states[2] == random.getstate()


def test_temporaries_left_by_a_killed_write_are_removed_on_resume(first_run, tmp_path):
    root = _copy_run(first_run, tmp_path)
    stale = root / "out" / "checkpoints" / f".{NAME}.safetensors.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    keep = root / "out" / "notes.tmp"  # not one of ours: left alone
    keep.write_text("user file")
    run(tiny_config(root))
    assert not stale.exists() and keep.read_text() == "user file"


# ---------------------------------------------------------------- gold-versus-gold spread


def test_gold_spread_is_the_second_gold_models_metrics_minus_the_firsts(tmp_path):
    """``--gold-models 2`` records, beside every result, the paper metrics of the second gold
    model minus the first's: recomputed here from the cached models and the split manifest."""
    from deepclean.data.datasets import load_dataset
    from deepclean.data.splits import ForgetSplit
    from deepclean.evaluation.evaluate import evaluate

    records, log = run(tiny_config(tmp_path, gold_seeds=2, methods=("finetune",)))
    rec = by_method(records)
    spread = rec["gold"]["gold_spread"]
    assert len(spread) == 1 and rec["finetune"]["gold_spread"] == spread
    assert "gold model 2 vs gold: dAcc_Dr" in log
    g = spread[0]
    assert (f"Gold-versus-gold spread (seed 0; another gold model minus the gold model, points): "
            f"dAcc_Dr {g['d_acc_retain']:+.2f}, dAcc_Df {g['d_acc_forget']:+.2f}, "
            f"dMIA {g['d_mia']:+.2f}.") in (tmp_path / "out" / "results.md").read_text()
    assert f"dAcc_Df {g['d_acc_forget']:+.2f}" in (tmp_path / "out" / "report.html").read_text()

    manifest = json.loads(next((tmp_path / "out" / "splits").glob("*.json")).read_text())
    data = load_dataset("digits")
    subset = torch.tensor(manifest["train_subset"])
    x, y = data.train_x[subset], data.train_y[subset]
    forget = torch.tensor(manifest["forget_indices"])
    keep = torch.ones(len(subset), dtype=torch.bool)
    keep[forget] = False
    split = ForgetSplit(forget=forget, retain=torch.arange(len(subset))[keep], n=len(subset),
                        scenario="random", detail={})
    golds = sorted((tmp_path / "cache").glob("gold-*.safetensors"))
    assert len(golds) == 2
    metrics = {}
    for path in golds:
        state, _ = load_checkpoint(path)
        model = build_model("small_cnn", num_classes=10, in_channels=1, width=0.25)
        model.load_state_dict(state)
        metrics[state_digest(model.state_dict())] = evaluate(model, x_train=x, y_train=y, split=split,
                                                x_test=data.test_x, y_test=data.test_y,
                                                seed=0, device="cpu")[0]
    first = metrics.pop(rec["gold"]["state_sha256"])
    (second,) = metrics.values()
    assert first["acc_forget"] == pytest.approx(rec["gold"]["metrics"]["acc_forget"], abs=1e-9)
    for key, name in (("acc_retain", "d_acc_retain"), ("acc_forget", "d_acc_forget"),
                      ("acc_test", "d_acc_test"), ("mia", "d_mia")):
        assert spread[0][name] == pytest.approx(second[key] - first[key], abs=1e-6), name
    assert any(abs(v) > 0 for v in spread[0].values())  # two retrains differ

    one = run(tiny_config(tmp_path / "one"))[0]
    assert by_method(one)["gold"]["gold_spread"] == []
