"""report.html says what a reviewer needs: the weights reset, what was forgotten, Acc_Df in
Fig. 2, intervals only with several seeds, one LiRA note; quiet progress bars in logs."""

import re

import pytest

from deepclean.cli import main
from deepclean.progress import progress_bar
from deepclean.report.figures import plot_method_bars


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("rep")
    argv = ["run", "--dataset", "digits", "--train-size", "all", "--model", "small_cnn",
            "--epochs", "1", "--methods", "deepclean", "--hp", "deepclean.epochs=1",
            "--no-progress", "--threads", "1", "--out", str(root / "run"),
            "--cache-dir", str(root / "cache")]
    assert main(argv) == 0
    return (root / "run" / "report.html").read_text()


def test_weights_reset_and_what_was_forgotten(report):
    assert "Weights reset (count)" in report and "Weights reset (% of all)" in report
    assert re.search(r"class 0: \d+ of \d+ training samples", report)
    assert re.search(r"a random 10 % of the training samples: \d+ of \d+", report)


def test_gold_and_original_are_references_not_methods(report):
    assert "Unlearning methods: deepclean. References: the gold model" in report


def test_one_seed_has_no_interval_and_one_lira_note(report):
    assert "95 % interval" not in report and "One seed: single values" in report
    assert report.count("LiRA: this run has 1 gold model(s)") == 2  # one per scenario section


def _record(method, seed, acc_f):
    return {"method": method, "seed": seed, "time_s": 1.0,
            "metrics": {"acc_retain": 90.0, "acc_forget": acc_f, "mia": 50.0}}


def test_fig2_shows_acc_df_and_whiskers_only_with_several_seeds(tmp_path, monkeypatch):
    import matplotlib.axes

    calls = []
    real = matplotlib.axes.Axes.bar

    def spy(self, *args, **kwargs):
        calls.append((self.get_title(), kwargs.get("yerr")))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", spy)
    one = [_record("gold", 0, 0.0), _record("deepclean", 0, 5.0)]
    plot_method_bars(one, tmp_path / "one")
    assert len(calls) == 4 and all(yerr is None for _, yerr in calls)
    calls.clear()
    two = one + [_record("gold", 1, 0.0), _record("deepclean", 1, 7.0)]
    plot_method_bars(two, tmp_path / "two")
    assert all(yerr is not None for _, yerr in calls)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_progress_bars_are_silent_when_output_is_not_a_terminal(capsys):
    bar = progress_bar(total=3, desc="x", enabled=True)  # pytest captures: not a terminal
    assert bar.disable
    assert progress_bar(total=3, desc="x", enabled=False).disable
