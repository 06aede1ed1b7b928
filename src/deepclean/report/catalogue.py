"""The one catalogue of reported metrics: every table and report.html take their columns and rows
from here, so a metric has one name, one unit, one number of digits and one ideal everywhere.
Adding a metric means adding its function (``deepclean.evaluation``) and one entry here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deepclean.report.common import get_field

__all__ = ["Metric", "METRICS", "columns"]


@dataclass(frozen=True)
class Metric:
    """One reported quantity.

    Attributes:
        short: the column header of the tables.
        long: the row label of report.html (with its unit).
        get: ``record -> value or None`` (None where the record has no such value).
        digits: decimals shown.
        ideal: which value is best (``"= gold"``, ``"0"``, ``"higher"``...), or None.
    """

    short: str
    long: str
    get: Callable[[dict[str, Any]], Any]
    digits: int
    ideal: str | None


def _share(r: dict[str, Any]) -> float | None:
    return None if r.get("share_reset") is None else 100.0 * r["share_reset"]


METRICS: dict[str, Metric] = {m_key: m for m_key, m in [
    ("acc_retain", Metric("Acc_Dr", "Acc_Dr (%)", lambda r: get_field(r, "metrics", "acc_retain"),
                          2, "= gold")),
    ("acc_forget", Metric("Acc_Df", "Acc_Df (%)", lambda r: get_field(r, "metrics", "acc_forget"),
                          2, "= gold")),
    ("acc_test", Metric("Acc_test", "Acc_test (%)", lambda r: get_field(r, "metrics", "acc_test"),
                        2, "= gold")),
    ("mia", Metric("MIA", "MIA entropy, % D_f member (paper)",
                   lambda r: get_field(r, "metrics", "mia"), 2, "= gold")),
    ("d_acc_forget", Metric("dAcc_Df", "dAcc_Df (points)",
                            lambda r: get_field(r, "gaps", "d_acc_forget"), 2, "0")),
    ("d_mia", Metric("dMIA", "dMIA (points)", lambda r: get_field(r, "gaps", "d_mia"), 2, "0")),
    ("mia_entropy", Metric("MIA entropy (%)", "MIA entropy LR, % D_f member",
                           lambda r: get_field(r, "mia_family", "entropy_lr"), 2, "= gold")),
    ("mia_efficacy", Metric("MIA-efficacy (%)", "MIA-efficacy, % D_f non-member",
                            lambda r: get_field(r, "mia_family", "efficacy"), 2, "= gold")),
    ("loss_lr", Metric("Loss-LR acc. (%)", "Loss-LR attack accuracy (%)",
                       lambda r: get_field(r, "mia_family", "loss_lr_accuracy"), 2,
                       "= gold")),
    ("lira_auc", Metric("LiRA AUC", "LiRA AUC, D_f vs test",
                        lambda r: get_field(r, "mia_family", "lira", "auc"), 3, "0.5")),
    ("lira_tpr", Metric("LiRA TPR@1%FPR (%)", "LiRA TPR at 1 % FPR (%)",
                        lambda r: get_field(r, "mia_family", "lira", "tpr_at_1fpr"), 2, "1")),
    ("js_forget", Metric("JS D_f", "JS to gold on D_f (bits)",
                         lambda r: get_field(r, "distances", "forget", "js"), 4, "0")),
    ("kl_forget", Metric("KL D_f", "KL(gold || model) on D_f",
                         lambda r: get_field(r, "distances", "forget", "kl"), 4, "0")),
    ("act_forget", Metric("Act. D_f", "Activation distance on D_f",
                          lambda r: get_field(r, "distances", "forget", "activation"), 4, "0")),
    ("js_test", Metric("JS test", "JS to gold on test (control)",
                       lambda r: get_field(r, "distances", "test", "js"), 4, "0")),
    ("kl_test", Metric("KL test", "KL(gold || model) on test (control)",
                       lambda r: get_field(r, "distances", "test", "kl"), 4, "0")),
    ("act_test", Metric("Act. test", "Activation distance on test (control)",
                        lambda r: get_field(r, "distances", "test", "activation"), 4, "0")),
    ("w_gold", Metric("W to gold", "Weight distance to gold",
                      lambda r: get_field(r, "distances", "weights_to_gold"), 2, "0")),
    ("w_original", Metric("W to original", "Weight distance to the original",
                          lambda r: get_field(r, "distances", "weights_to_original"), 2,
                          "(context)")),
    ("js_forget_norm", Metric("JS D_f / gold-gold", "JS on D_f / gold-vs-gold",
                              lambda r: get_field(r, "distances", "normalised", "forget", "js"),
                              2, "<= 1")),
    ("act_forget_norm", Metric("Act. D_f / gold-gold", "Activation distance on D_f / gold-vs-gold",
                               lambda r: get_field(r, "distances", "normalised", "forget",
                                                   "activation"), 2, "<= 1")),
    ("w_gold_norm", Metric("W to gold / gold-gold", "Weight distance to gold / gold-vs-gold",
                           lambda r: get_field(r, "distances", "normalised", "weights_to_gold"),
                           2, "<= 1")),
    ("avg_gap", Metric("Avg. Gap", "Avg. Gap (points)",
                       lambda r: get_field(r, "summary", "avg_gap"), 2, "0")),
    ("tug_of_war", Metric("Tug of war", "Tug of war",
                          lambda r: get_field(r, "summary", "tug_of_war"), 4, "1")),
    ("rte", Metric("RTE", "RTE (gold time / time)", lambda r: get_field(r, "summary", "rte"), 2,
                   "higher")),
    ("n_reset", Metric("reset", "Weights reset (count)", lambda r: r.get("n_reset"), 0, "-")),
    ("share_reset", Metric("reset %", "Weights reset (% of all)", _share, 2, "-")),
    ("time_s", Metric("time (s)", "Unlearning time (s)", lambda r: r.get("time_s"), 1, "lower")),
]}


def columns(keys: list[str], *, ideal: bool = True, long: bool = False) -> list[tuple]:
    """``(label, getter, digits, ideal)`` for each key, the tables' and the report's row format;
    ``ideal=False`` leaves the ideal out (the paper's tables have no ideal row)."""
    out = []
    for key in keys:
        m = METRICS[key]
        out.append((m.long if long else m.short, m.get, m.digits, m.ideal if ideal else None))
    return out
