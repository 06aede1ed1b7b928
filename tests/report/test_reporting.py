"""Tables, figures and the HTML report from synthetic result records (no training)."""

import csv
import io
import json

import pytest

from deepclean.cli import main
from deepclean.report import (
    build_report,
    csv_table,
    latex_tables,
    markdown_tables,
    mean_ci,
    write_tables,
)
from deepclean.report.figures import write_figures
from deepclean.report.html import render_html_report

GOLD = {"acc_forget": 80.0, "acc_retain": 99.0, "acc_test": 90.0, "mia": 30.0}


def record(method, seed, *, scenario="random", shift=0.0, lira=True):
    metrics = {k: v + shift + seed for k, v in GOLD.items()}
    gold = {k: v + seed for k, v in GOLD.items()}
    return {
        "dataset": "toy", "model": "small_cnn", "width": 0.5, "scenario": scenario, "seed": seed,
        "method": method, "n_train": 100, "n_forget": 10, "n_retain": 90,
        "forget_sha256": f"hash{seed}", "gold_seeds": 3, "gold_metrics": gold,
        "gold_time_s": 10.0, "metrics": metrics,
        "gaps": {"d_acc_forget": shift, "d_acc_retain": shift, "d_acc_test": shift,
                 "d_mia": shift},
        "time_s": 2.0 + seed if method != "original" else None,
        "n_reset": 50 if method in ("deepclean", "zero_weights") else None,
        "share_reset": 0.1 if method in ("deepclean", "zero_weights") else None,
        "mia_family": {"entropy_lr": metrics["mia"], "efficacy": 60.0 + shift,
                       "loss_lr_accuracy": 50.0 + shift,
                       "lira": {"auc": 0.5 + shift / 100, "tpr_at_1fpr": 1.0, "n_reference": 3,
                                "n_forget": 10, "n_test": 50,
                                "top_remembered": [{"index": 4, "z": 3.0, "phi": 1.0}]}
                       if lira else None,
                       "lira_reason": None if lira else "LiRA needs at least 2 reference"},
        "distances": {"forget": {"js": 0.01 * shift, "kl": 0.02 * shift, "activation": 0.1},
                      "test": {"js": 0.0, "kl": 0.0, "activation": 0.0},
                      "weights_to_gold": 3.0, "weights_to_original": 1.0,
                      "normalised": None},
        "summary": {"avg_gap": abs(shift), "tug_of_war": (1 - abs(shift) / 100) ** 3,
                    "rte": None if method == "original" else 10.0 / (2.0 + seed)},
    }


@pytest.fixture
def records():
    out = []
    for seed in (0, 1, 2):
        for scenario in ("random", "class"):
            out += [record("original", seed, scenario=scenario, shift=5.0),
                    record("gold", seed, scenario=scenario),
                    record("deepclean", seed, scenario=scenario, shift=1.0),
                    record("zero_weights", seed, scenario=scenario, shift=-3.0)]
    return out


def sweep_records():
    out = []
    for seed in (0, 1):
        for gamma in (1.0, 1.5, 2.0):
            r = record("deepclean", seed, shift=gamma)
            r.update(kind="gamma_sweep", gamma=gamma, n_reset=int(1000 / gamma), n_weights=2000)
            out.append(r)
    return out


def test_markdown_table_has_mean_and_interval_over_seeds(records):
    md = markdown_tables(records)
    mean, half = mean_ci([80.0 + 1 + s for s in (0, 1, 2)])
    assert "| deepclean | " in md and f"{mean:.2f} ± {half:.2f}" in md
    assert md.count("### ") == 2  # random and class
    assert md.index("| original |") < md.index("| gold |") < md.index("| deepclean |")


def test_extra_tables_state_the_ideal_and_show_gold_first(records):
    for name in ("mia", "distances", "summary"):
        md = markdown_tables(records, name)
        assert "| *ideal* |" in md
        body = md.split("| *ideal* |")[1]
        assert body.index("| original |") < body.index("| gold |")
    mia = markdown_tables(records, "mia")
    assert "*= gold*" in mia and "*0.5*" in mia
    assert "LiRA AUC" in mia


def test_ablation_table_only_with_zero_weights(records):
    assert "Table 4" in markdown_tables(records, "ablation")
    assert markdown_tables([r for r in records if r["method"] != "zero_weights"],
                           "ablation") == ""


def test_csv_has_means_and_half_widths(records):
    rows = list(csv.DictReader(io.StringIO(csv_table(records, "summary"))))
    dc = [r for r in rows if r["method"] == "deepclean" and r["scenario"] == "random"][0]
    assert float(dc["Avg. Gap"]) == pytest.approx(1.0)
    assert float(dc["Avg. Gap ci95"]) == pytest.approx(0.0)
    assert any(r["method"] == "ideal" for r in rows)


def test_latex_escapes_and_structure(records):
    tex = latex_tables(records, "mia")
    assert tex.count(r"\begin{tabular}") == 2 and r"\toprule" in tex
    assert r"LiRA TPR@1\%FPR (\%)" in tex and r"$\pm$" in tex
    assert "zero\\_weights" in tex


def test_records_without_new_keys_still_tabulate(records):
    old = [{k: v for k, v in r.items() if k not in ("mia_family", "distances", "summary")}
           for r in records]
    assert "| deepclean | - | - |" in markdown_tables(old, "mia")


def test_figures_and_html_from_records_and_sweep(records, tmp_path):
    figures = write_figures(records, sweep_records(), tmp_path / "figures")
    names = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert "fig2_toy_small_cnn_random.png" in names and "fig2_toy_small_cnn_random.svg" in names
    assert "fig3_toy_small_cnn.png" in names and "fig4_toy_small_cnn_random.svg" in names
    assert all((tmp_path / "figures" / n).stat().st_size > 1000 for n in names)
    html = render_html_report(records, sweep_records(), figures)
    assert html.count("data:image/png;base64,") == len(figures) == 4
    assert "http" not in html.replace("http-equiv", "")  # no external assets
    assert "<script" not in html and "<link" not in html
    assert "hash0" in html and "zero_weights" in html and "Unlearning time" in html
    assert "random forgetting" in html and "class forgetting" in html


def test_build_report_rebuilds_everything_from_the_json_files(records, tmp_path):
    for i, r in enumerate(records):
        path = tmp_path / "results" / f"r{i}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(r))
    for i, r in enumerate(sweep_records()):
        path = tmp_path / "sweep" / f"s{i}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(r))
    assert main(["report", str(tmp_path)]) == 0
    for name in ("results.md", "results.csv", "results.tex", "report.html",
                 "tables/mia.tex", "tables/distances.csv", "tables/summary.md",
                 "tables/ablation.md", "figures/fig2_toy_small_cnn_class.png",
                 "figures/fig4_toy_small_cnn_random.png"):
        assert (tmp_path / name).is_file(), name
    first = (tmp_path / "tables" / "mia.md").read_text()
    build_report(tmp_path)
    assert (tmp_path / "tables" / "mia.md").read_text() == first


def test_report_of_an_empty_folder_fails_clearly(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no result JSON files" in capsys.readouterr().err


def test_write_tables_returns_every_table(records, tmp_path):
    md = write_tables(records, tmp_path)
    for title in ("paper layout", "Table 4", "Membership inference", "Distances", "Summaries"):
        assert title in md
