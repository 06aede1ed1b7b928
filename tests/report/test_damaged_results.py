"""``deepclean report`` on damaged result folders: clear errors naming the file, or the row
marked damaged; nothing is dropped silently."""

import json
import shutil

import pytest

from deepclean.cli import main

RUN = ["run", "--dataset", "digits", "--train-size", "all", "--model", "small_cnn", "--epochs",
       "1", "--methods", "finetune", "--hp", "finetune.epochs=1", "--no-progress", "--threads",
       "1", "--scenarios", "class"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dmg")
    assert main(RUN + ["--out", str(root / "run"), "--cache-dir", str(root / "cache")]) == 0
    return root / "run"


def _copy(run_dir, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


NAME = "digits_small_cnn_class_finetune_seed0.json"


def test_broken_json_is_a_one_line_error_naming_the_file(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path)
    (run / "results" / NAME).write_text('{"dataset": "digits", ')
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert NAME in err and "not readable JSON" in err and "Traceback" not in err


@pytest.mark.parametrize("change, why", [
    (lambda r: r.pop("metrics"), "no 'metrics'"),
    (lambda r: r["metrics"].__setitem__("acc_retain", "high"), "'acc_retain' is 'high'"),
])
def test_a_record_without_usable_metrics_is_marked_damaged(run_dir, tmp_path, change, why):
    run = _copy(run_dir, tmp_path)
    path = run / "results" / NAME
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))
    assert main(["report", str(run)]) == 0
    table = (run / "results.md").read_text()
    assert "| finetune (DAMAGED) | failed |" in table
    assert f"DAMAGED: finetune, seed 0: {NAME}: " in table and why in table


def test_a_deleted_gold_record_is_named(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    (run / "results" / "digits_small_cnn_class_gold_seed0.json").unlink()
    assert main(["report", str(run)]) == 0
    table = (run / "results.md").read_text()
    assert "MISSING: no gold record for digits / small_cnn / class forgetting, seed 0" in table
    assert "| finetune |" in table  # the row is still there


def test_report_on_the_results_subfolder_writes_into_the_run_folder(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    (run / "results.md").unlink()
    assert main(["report", str(run / "results")]) == 0
    assert (run / "results.md").is_file() and not (run / "results" / "results.md").exists()
