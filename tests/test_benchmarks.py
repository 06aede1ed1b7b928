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
