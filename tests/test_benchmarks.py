"""benchmarks/bench_run.py: the end-to-end ratios it reports, on hand-made result files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench_run():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "bench_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(folder: Path, method: str, time_s: float, **extra) -> None:
    (folder / "results").mkdir(parents=True, exist_ok=True)
    rec = {"dataset": "d", "model": "m", "scenario": "random", "seed": 0, "method": method,
           "time_s": time_s, **extra}
    (folder / "results" / f"{method}.json").write_text(json.dumps(rec))


def test_ratios_with_and_without_a_precomputed_fisher(tmp_path, capsys) -> None:
    two, pre = tmp_path / "two", tmp_path / "pre"
    for folder in (two, pre):
        _write(folder, "gold", 100.0)
        _write(folder, "finetune", 20.0)
    _write(two, "deepclean", 30.0, fisher_mode="two_passes")
    _write(pre, "deepclean", 21.0, fisher_mode="precomputed", precompute_time_s=9.0)
    out = tmp_path / "out"
    assert _bench_run().main([str(two), str(pre), "--out", str(out)]) == 0
    rows = {p.name: json.loads(p.read_text()) for p in out.glob("run_*.json")}
    a, b = rows["run_two_d_m_random_seed0.json"], rows["run_pre_d_m_random_seed0.json"]
    assert a["deepclean_over_gold"] == pytest.approx(0.30)
    assert a["deepclean_over_finetune"] == pytest.approx(1.5)
    assert b["fisher_mode"] == "precomputed"
    assert b["deepclean_over_gold"] == pytest.approx(0.21)
    assert b["deepclean_over_finetune"] == pytest.approx(1.05)
    assert b["with_precompute_over_gold"] == pytest.approx(0.30)
    assert b["with_precompute_over_finetune"] == pytest.approx(1.5)
    table = capsys.readouterr().out
    assert "| pre | random | 0 | precomputed | 21.0 | 9.0 | 20.0 | 100.0 | 0.21 | 1.05 | 0.30 | 1.50 |" in table
    assert (out / "run_table.md").read_text().strip() == table.strip()


def test_an_empty_folder_is_refused(tmp_path, capsys) -> None:
    assert _bench_run().main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no result JSON files" in capsys.readouterr().err


def test_fisher_table_from_hand_made_measurements(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("bench_fisher",
                                                  ROOT / "benchmarks" / "bench_fisher.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    stem = "small_cnn_w1_1x28x28_cpu.json"
    for t, (plain, fisher) in enumerate([(1.0, 1.4), (1.0, 1.2), (2.0, 3.2)]):
        (tmp_path / f"alternate{t}_{stem}").write_text(json.dumps(
            {"plain_best_s": plain, "fisher_best_s": fisher, "ratio": fisher / plain}))
    (tmp_path / f"plain_{stem}").write_text(json.dumps({"best_s": 1.0,
                                                         "peak_extra_bytes": 100 * 2**20}))
    (tmp_path / f"fisher_{stem}").write_text(json.dumps({"best_s": 1.5,
                                                          "peak_extra_bytes": 150 * 2**20}))
    (tmp_path / "dataload_cpu.json").write_text(json.dumps({"best_s": 1.0}))
    (tmp_path / "train_epoch_cpu.json").write_text(json.dumps({"best_scaled_s": 99.0,
                                                               "measured_samples": 1024}))
    table = bench.build_table(tmp_path, [("small_cnn", 1.0, 512, 1, 28)], "cpu")
    # median of the three alternating trials (1.2, 1.4, 1.6), their range, the separate ratio
    assert "| small_cnn | 1 | 1x28x28 | 512 | 1.000 | 1.400 | 1.40 | 1.20-1.60 | 1.50 | 100 | 150 | 1.50 |" in table
    assert "| 1.000 | 99.0 | 1.00 % |" in table
    summary = json.loads((tmp_path / "fisher_summary.json").read_text())
    assert summary[0]["ratios_alternating"] == pytest.approx([1.2, 1.4, 1.6])


def test_bench_run_without_deepclean_results_fails(tmp_path, capsys) -> None:
    _write(tmp_path, "gold", 100.0)
    _write(tmp_path, "finetune", 20.0)
    assert _bench_run().main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no run with both a deepclean and a gold result" in capsys.readouterr().err


def test_the_fisher_cost_check_runs_on_a_small_case_and_passes(tmp_path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("check", ROOT / "benchmarks" / "check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    out = tmp_path / "run.json"
    # a generous tolerance: this runs beside the rest of the suite on a shared machine
    assert check.main(["--n", "128", "--repeats", "2", "--tolerance", "3", "--out", str(out)]) == 0
    measured = json.loads(out.read_text())
    assert measured["ratio"] == pytest.approx(measured["fisher_s"] / measured["plain_s"])
    assert "Fisher/plain" in capsys.readouterr().out
    baseline = json.loads((ROOT / "benchmarks" / "baseline" / "fisher_ratio.json").read_text())
    assert 0.5 < baseline["ratio"] < 3.0


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GOLD = {"acc_retain": 99.0, "acc_forget": 90.0, "acc_test": 90.0, "mia": 70.0}


def _record(folder: Path, method: str, seed: int, *, avg_gap: float, time_s: float = 10.0,
            gold: dict | None = None, **extra) -> None:
    gold = dict(gold or GOLD)
    metrics = {k: v + extra.pop("shift", 0.0) for k, v in gold.items()}
    rec = {"dataset": "d", "model": "m", "scenario": "random", "seed": seed, "method": method,
           "metrics": metrics, "gold_metrics": gold, "summary": {"avg_gap": avg_gap},
           "time_s": time_s, "gaps": {"d_acc_retain": -0.5, "d_acc_forget": 1.0, "d_mia": -2.0},
           **extra}
    (folder / "results").mkdir(parents=True, exist_ok=True)
    (folder / "results" / f"{method}_{seed}.json").write_text(json.dumps(rec))


def test_autogamma_comparison_by_hand(tmp_path, capsys) -> None:
    paper, auto, tuned = tmp_path / "paper", tmp_path / "auto", tmp_path / "tuned"
    spread = [{"d_acc_retain": 0.1, "d_acc_forget": -1.5, "d_acc_test": 0.2, "d_mia": 3.0}]
    for seed, (gp, ga, gs) in enumerate([(5.0, 2.0, 1.0), (4.0, 4.5, 3.0)]):
        _record(paper, "deepclean", seed, avg_gap=gp, gamma=1.1, share_reset=0.3,
                hyperparameters={"gamma": 1.1})
        _record(auto, "deepclean", seed, avg_gap=ga, time_s=14.0 if seed else 16.0, gamma=1.5,
                share_reset=0.1, gold_spread=spread if seed == 0 else [],
                hyperparameters={"gamma": "auto"})
        _record(tuned, "finetune", seed, avg_gap=gs)
        _record(tuned, "scrub", seed, avg_gap=gs + 1)
    bench = _module("compare_autogamma")
    assert bench.main(["--paper", str(paper), "--auto", str(auto), "--tuned", str(tuned),
                       "--out", str(tmp_path / "o.json")]) == 0
    res = json.loads((tmp_path / "o.json").read_text())
    s = res["summary"]["random"]
    assert s["auto_below_paper"] == 1  # 2 < 5, but 4.5 > 4
    assert s["auto_acc_retain_within_1"] == 2
    assert s["seeds_with_spread"] == 1 and s["auto_within_gold_spread"] == 1  # 1 <= 1.5, 2 <= 3
    assert s["time_ratio_at_most_1_5"] == 1  # 1.6, then 1.4
    assert s["auto_avg_gap"][0] == pytest.approx(3.25)
    assert s["tuned_avg_gap"]["finetune"][0] == pytest.approx(2.0)
    assert [r["best_tuned"] for r in res["rows"]] == ["finetune", "finetune"]
    assert "| random | 0 | 1.50 / 3.00 | 30.00 | 5.00 | 1.500 | 10.00 |" in capsys.readouterr().out

    # bad input: one line on stderr, exit status 2, no traceback
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--paper", str(tmp_path / "nope"), "--auto", str(auto)], "--paper", "no such folder"),
        (["--paper", str(paper), "--auto", str(empty)], "--auto", "holds no finished result"),
        (["--paper", str(paper), "--auto", str(paper)], "--auto", "takes runs with --gamma auto"),
        (["--paper", str(auto), "--auto", str(auto)], "--paper", "at fixed gammas"),
        (["--paper", str(paper), "--auto", str(auto), "--out", str(tmp_path)], "--out",
         "is a folder"),
    ]
    for argv, where, message in cases:
        assert bench.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {where}") and message in err and err.count("\n") == 1
    _record(tuned, "ssd", 1, avg_gap=1.0, gold={**GOLD, "acc_test": 91.0})
    assert bench.main(["--paper", str(paper), "--auto", str(auto), "--tuned", str(tuned)]) == 2
    assert "random seed 1 (ssd, tuned): the folders were evaluated against different gold " \
        "metrics" in capsys.readouterr().err
    (tuned / "results" / "ssd_1.json").write_text('{"broken')
    assert bench.main(["--paper", str(paper), "--auto", str(auto), "--tuned", str(tuned)]) == 2
    assert "is not readable JSON" in capsys.readouterr().err


def test_defaults_against_tuned_keeps_each_sides_seeds(tmp_path, capsys) -> None:
    defaults, tuned, hp = tmp_path / "defaults", tmp_path / "tuned", tmp_path / "hp.json"
    for folder, seeds in ((defaults, [0]), (tuned, [0, 1, 2])):
        for seed in seeds:
            _record(folder, "original", seed, avg_gap=4.0, shift=2.0)
            _record(folder, "gold", seed, avg_gap=0.0)
            _record(folder, "finetune", seed, avg_gap=1.0 + seed)
    hp.write_text(json.dumps({"protocol": {"time_s": {"random": {"finetune": 120.0}}}}))
    bench = _module("compare_runs")
    assert bench.main(["--defaults", str(defaults), "--tuned", str(tuned), "--hp-file", str(hp),
                       "--out", str(tmp_path / "o.json")]) == 0
    block = json.loads((tmp_path / "o.json").read_text())["scenarios"]["random"]
    assert block["seeds"] == {"defaults": [0], "tuned": [0, 1, 2]}
    row = next(r for r in block["rows"] if r["method"] == "finetune")
    assert row["defaults"]["avg_gap"] == [1.0] and row["tuned"]["avg_gap"] == [1.0, 2.0, 3.0]
    assert row["tuning_time_s"] == 120.0
    out = capsys.readouterr().out
    assert "### random forgetting (defaults: seeds [0]; tuned: seeds [0, 1, 2])" in out
    # 95 % Student-t half-width of [1, 2, 3]: t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.732 = 2.48
    assert "| 2.00 ± 2.48 |" in out

    # another test half on one side: different gold metrics for the same seed are refused
    other = tmp_path / "other"
    _record(other, "original", 0, avg_gap=4.0, shift=2.0, gold={**GOLD, "acc_test": 80.0})
    _record(other, "gold", 0, avg_gap=0.0, gold={**GOLD, "acc_test": 80.0})
    assert bench.main(["--defaults", str(other), "--tuned", str(tuned)]) == 2
    assert "random seed 0: the folders were evaluated against different gold metrics" in \
        capsys.readouterr().err
    hp.write_text("[1, 2]")
    for argv, message in (
            (["--defaults", str(tmp_path / "nope"), "--tuned", str(tuned)], "no such folder"),
            (["--defaults", str(defaults), "--tuned", str(tuned), "--hp-file", str(hp)],
             "not a hyperparameter file of deepclean tune"),
            (["--defaults", str(defaults), "--tuned", str(tuned), "--hp-file",
              str(tmp_path / "none.json")], "not a hyperparameter file of deepclean tune")):
        assert bench.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
