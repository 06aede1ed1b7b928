"""One-number summaries of an unlearned model against gold (GUIDE.md section 4).

- :func:`avg_gap`: Avg. Gap = mean of |metric - gold's| over (Acc_Df, Acc_Dr, Acc_test, MIA), in
  percentage points. Ideal 0. Two-sided: an MIA 10 points below gold's costs exactly as much as
  one 10 points above (over-unlearning is punished too).
- :func:`tug_of_war`: product over D_f, D_r and test of ``1 - |accuracy gap| / 100``. Ideal 1.
- :func:`relative_time_efficiency`: RTE = gold training time / unlearning time. Higher is better
  (how many times cheaper than retraining).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["GAP_METRICS", "ACC_METRICS", "avg_gap", "tug_of_war", "relative_time_efficiency",
           "summary"]

#: The four metrics whose absolute gaps Avg. Gap averages.
GAP_METRICS = ("acc_forget", "acc_retain", "acc_test", "mia")
#: The three accuracies of the tug of war.
ACC_METRICS = ("acc_forget", "acc_retain", "acc_test")


def avg_gap(metrics: Mapping[str, float], gold: Mapping[str, float]) -> float:
    """Mean absolute gap to gold over Acc_Df, Acc_Dr, Acc_test and MIA (points; ideal 0)."""
    return sum(abs(metrics[k] - gold[k]) for k in GAP_METRICS) / len(GAP_METRICS)


def tug_of_war(metrics: Mapping[str, float], gold: Mapping[str, float]) -> float:
    """Product over D_f, D_r, test of ``1 - |accuracy gap| / 100`` (accuracies in %; ideal 1)."""
    out = 1.0
    for k in ACC_METRICS:
        out *= 1.0 - abs(metrics[k] - gold[k]) / 100.0
    return out


def relative_time_efficiency(gold_time_s: float | None, time_s: float | None) -> float | None:
    """RTE = gold training time / unlearning time; ``None`` when either is missing or 0."""
    if gold_time_s is None or time_s is None or time_s <= 0 or not math.isfinite(time_s):
        return None
    return gold_time_s / time_s


def summary(metrics: Mapping[str, float], gold: Mapping[str, float], *,
            time_s: float | None = None, gold_time_s: float | None = None) -> dict[str, Any]:
    """``{"avg_gap", "tug_of_war", "rte"}`` of one model."""
    return {
        "avg_gap": avg_gap(metrics, gold),
        "tug_of_war": tug_of_war(metrics, gold),
        "rte": relative_time_efficiency(gold_time_s, time_s),
    }
