"""Rows that a table alone would hide: a method that left the model as it was (no-op) or destroyed
it (collapse) is named under the table and in report.html."""

from deepclean.report.common import NOOP_POINTS, behaviour_notes
from deepclean.report.tables import markdown_tables


def _rec(method, seed, acc_f, acc_r, acc_t, mia):
    return {"dataset": "toy", "model": "m", "scenario": "random", "method": method, "seed": seed,
            "time_s": 1.0, "n_forget": 10, "n_retain": 90,
            "metrics": {"acc_forget": acc_f, "acc_retain": acc_r, "acc_test": acc_t, "mia": mia}}


def _group():
    return [_rec("original", 0, 99.8, 99.6, 90.8, 80.4), _rec("gold", 0, 91.0, 99.6, 90.7, 74.0),
            _rec("fisher_forgetting", 0, 99.8, 99.63, 90.78, 80.35),  # within 0.5 / 1.0: no-op
            _rec("neggrad", 0, 10.0, 10.2, 10.0, 0.0),                  # Acc_Dr < half of gold's
            _rec("deepclean", 0, 95.4, 96.7, 90.1, 72.0)]                # neither


def test_no_op_and_collapse_are_named_and_the_rest_is_not():
    notes = behaviour_notes(_group())
    assert len(notes) == 2
    assert notes[0].startswith("fisher_forgetting: no-op: Acc_Df 99.80, Acc_Dr 99.63")
    assert notes[1].startswith("neggrad: collapsed: Acc_Dr 10.2 % is under half of the gold "
                               "model's 99.6 %")
    assert not any(n.startswith("deepclean") for n in notes)


def test_the_no_op_threshold_is_the_stated_one():
    just_out = _group()[:2] + [_rec("ssd", 0, 99.8 - 1.01 * NOOP_POINTS, 99.6, 90.8, 80.4)]
    assert behaviour_notes(just_out) == []
    just_in = _group()[:2] + [_rec("ssd", 0, 99.8 - 0.99 * NOOP_POINTS, 99.6, 90.8, 80.4)]
    assert len(behaviour_notes(just_in)) == 1


def test_findings_appear_under_the_markdown_table():
    md = markdown_tables(_group())
    assert "Findings:\n- fisher_forgetting: no-op" in md
    assert "- neggrad: collapsed" in md


def test_the_memorisation_warning_is_only_for_random_forgetting():
    from deepclean.report.common import memorisation_note

    m = {"acc_train": 99.0, "acc_holdout": 98.5, "holdout": "unused training images",
         "attack_auc": 0.51, "too_small_for_random_forgetting": True}
    rec = {"method": "original", "seed": 0, "memorisation": m}
    assert "WARNING" in memorisation_note([rec | {"scenario": "random"}])
    assert "WARNING" not in memorisation_note([rec | {"scenario": "class"}])


def test_a_collapse_in_one_seed_is_named_though_the_mean_hides_it():
    """Seeds 0-2: Acc_Dr 42.6, 99.0, 99.2 (mean 80.3, above half of gold's 99.6)."""
    recs = []
    for seed, acc_r in ((0, 42.6), (1, 99.0), (2, 99.2)):
        recs += [_rec("original", seed, 99.8, 99.6, 90.8, 80.4),
                 _rec("gold", seed, 91.0, 99.6, 90.7, 74.0),
                 _rec("deepclean", seed, 90.0, acc_r, 88.0, 70.0)]
    notes = behaviour_notes(recs)
    assert notes == ["deepclean: collapsed in 1 seed(s) (seed 0: Acc_Dr 42.6 % against gold's "
                     "99.6 %); the mean over seeds hides it, and that seed's forgetting numbers "
                     "mean nothing."]
