"""What every report module shares: reading nested record fields, mean and 95 % interval,
and the note on a precomputed training-set Fisher."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = [
    "NOOP_POINTS",
    "auto_gamma_note",
    "behaviour_notes",
    "get_field",
    "mean_ci",
    "memorisation_note",
    "precompute_note",
    "verdict_lines",
]


def get_field(r: dict[str, Any], *path: str) -> Any:
    """``r[path[0]][path[1]]...`` or ``None`` where a key is missing (older records)."""
    for key in path:
        if not isinstance(r, dict) or r.get(key) is None:
            return None
        r = r[key]
    return r


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and half-width of the 95 % Student-t interval (``None`` for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    from scipy.stats import t

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def precompute_note(records: Iterable[dict[str, Any]]) -> str:
    """The sentence saying that DeepClean's time excludes the precomputed training-set Fisher
    (``--precompute-fisher``) and how long that took; an empty string when no record used one."""
    once = sorted({round(r["precompute_time_s"], 1) for r in records
                   if r.get("precompute_time_s")})
    if not once:
        return ""
    return ("DeepClean's time (and Zero Weights') excludes the training-set Fisher I_D, computed "
            "once per original model (--precompute-fisher): "
            + ", ".join(f"{t:.1f}" for t in once) + " s.")


def memorisation_note(records: Iterable[dict[str, Any]]) -> str:
    """One sentence per seed on how much the original model memorised (the ``memorisation``
    of its record), with a warning when too little for random forgetting to mean anything."""
    out = []
    for r in sorted((r for r in records if r.get("method") == "original"
                     and isinstance(r.get("memorisation"), dict)), key=lambda r: r["seed"]):
        m = r["memorisation"]
        text = (f"Memorisation of the original model (seed {r['seed']}): train "
                f"{m['acc_train']:.2f} % vs held-out {m['acc_holdout']:.2f} % ({m.get('holdout')}), "
                f"loss-attack AUC {m['attack_auc']:.3f}.")
        if m.get("too_small_for_random_forgetting") and r.get("scenario") == "random":
            text += (" WARNING: it has hardly memorised its training data, so random forgetting "
                     "looks solved by any method.")
        out.append(text)
    return " ".join(out)


def gold_spread_note(records: Iterable[dict[str, Any]]) -> str:
    """One sentence per seed on how far a second gold model (``--gold-models 2`` or more) lands
    from the first: the ``gold_spread`` of the gold record, in points. A method whose gaps are
    within it is as close to gold as another valid retrain. Empty with one gold model."""
    out = []
    for r in sorted((r for r in records if r.get("method") == "gold" and r.get("gold_spread")),
                    key=lambda r: r["seed"]):
        parts = [f"dAcc_Dr {g['d_acc_retain']:+.2f}, dAcc_Df {g['d_acc_forget']:+.2f}, "
                 f"dMIA {g['d_mia']:+.2f}" for g in r["gold_spread"]]
        out.append(f"Gold-versus-gold spread (seed {r['seed']}; another gold model minus the "
                   f"gold model, points): {'; '.join(parts)}.")
    return " ".join(out)


def verdict_lines(records: Iterable[dict[str, Any]]) -> list[str]:
    """The forgetting verdict of every model (the ``verdict`` of its record, judged without the
    gold model: D_f against held-out samples drawn like it): a heading sentence, then one line
    per model with the seeds it passed in and the first seed's summary. An empty list when no
    record holds a verdict (results of earlier versions)."""
    by_method: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for r in sorted(records, key=lambda r: r.get("seed", 0)):
        v = r.get("verdict")
        if isinstance(v, dict) and v.get("summary"):
            by_method.setdefault(r["method"], []).append((r.get("seed", 0), v))
    if not by_method:
        return []
    out = ["Forgetting verdict, no gold model needed (D_f against held-out samples drawn like it; "
           "the gold model should pass and the original should not):"]
    for method, items in by_method.items():
        measured = [v for _, v in items if v.get("passed") is not None]
        passed = sum(1 for v in measured if v["passed"])
        seed, first = items[0]
        untold = len(items) - len(measured)
        head = ", ".join(
            ([f"passed in {passed} of {len(measured)} seed(s)"] if measured else [])
            + ([f"cannot tell in {untold} seed(s), where the original already looks unseen"]
               if untold else []))
        out.append(f"- {method}: {head}; seed {seed}: {first['summary']}")
    return out


def auto_gamma_note(records: Iterable[dict[str, Any]]) -> str:
    """The thresholds chosen with ``gamma="auto"`` (the ``gamma`` of records holding an
    ``auto_gamma`` search), per method and seed; an empty string when none was."""
    parts = [f"{r['method']} seed {r['seed']}: {r['gamma']:.4g} "
             f"({100 * r['share_reset']:.2f} % reset)"
             for r in sorted(records, key=lambda r: (r.get("method", ""), r.get("seed", 0)))
             if isinstance(r.get("auto_gamma"), dict) and isinstance(r.get("gamma"), (int, float))
             and isinstance(r.get("share_reset"), (int, float))]
    return ("Gamma chosen on held-out data (gamma='auto'): " + "; ".join(parts) + ".") if parts \
        else ""


#: A method whose mean Acc_Df, Acc_Dr and Acc_test all lie within this many points of the
#: original model's, and whose MIA within twice as many, left the model as it was (a no-op).
NOOP_POINTS = 0.5


def behaviour_notes(records: Iterable[dict[str, Any]]) -> list[str]:
    """Findings that a table row alone hides, one sentence per method of one (data set, model,
    scenario) group: a **no-op** (mean Acc_Df, Acc_Dr and Acc_test within :data:`NOOP_POINTS`
    points of the original's, MIA within twice that: the method left the model as it was) or a
    **collapse** (mean Acc_Dr below half of the gold model's: the model was destroyed). Means
    over the seeds present for both; an empty list when nothing is found or references are
    missing."""
    records = [r for r in records if isinstance(r.get("metrics"), dict)
               and r.get("status") not in ("failed", "damaged")]

    def means(method: str) -> dict[str, float] | None:
        rs = [r["metrics"] for r in records if r.get("method") == method]
        keys = ("acc_forget", "acc_retain", "acc_test", "mia")
        if not rs or not all(isinstance(m.get(k), (int, float)) for m in rs for k in keys):
            return None
        return {k: sum(m[k] for m in rs) / len(rs) for k in keys}

    original, gold = means("original"), means("gold")
    out = []
    for method in dict.fromkeys(r["method"] for r in records):
        if method in ("original", "gold"):
            continue
        m = means(method)
        if m is None:
            continue
        if gold is not None and m["acc_retain"] < 0.5 * gold["acc_retain"]:
            out.append(f"{method}: collapsed: Acc_Dr {m['acc_retain']:.1f} % is under half of the "
                       f"gold model's {gold['acc_retain']:.1f} %; its forgetting numbers mean "
                       "nothing.")
        elif original is not None and all(
                abs(m[k] - original[k]) <= NOOP_POINTS
                for k in ("acc_forget", "acc_retain", "acc_test")) and \
                abs(m["mia"] - original["mia"]) <= 2 * NOOP_POINTS:
            out.append(f"{method}: no-op: Acc_Df {m['acc_forget']:.2f}, Acc_Dr "
                       f"{m['acc_retain']:.2f}, Acc_test {m['acc_test']:.2f} and MIA "
                       f"{m['mia']:.2f} are those of the original model (within "
                       f"{NOOP_POINTS} points); it did not unlearn, whatever its gap to gold.")
        if gold is not None and m["acc_retain"] >= 0.5 * gold["acc_retain"]:
            # a collapse in some seeds that the mean over seeds hides
            hit = [(seed, acc, gold_acc) for seed, acc, gold_acc in _per_seed_retain(records, method)
                   if acc < 0.5 * gold_acc]
            if hit:
                seeds = ", ".join(f"seed {s}: Acc_Dr {a:.1f} % against gold's {g:.1f} %"
                                  for s, a, g in hit)
                out.append(f"{method}: collapsed in {len(hit)} seed(s) ({seeds}); the mean over "
                           "seeds hides it, and that seed's forgetting numbers mean nothing.")
    return out


def _per_seed_retain(records: list[dict[str, Any]], method: str
                     ) -> list[tuple[int, float, float]]:
    """``(seed, Acc_Dr of method, Acc_Dr of gold)`` for every seed holding both records."""
    gold = {r.get("seed"): r["metrics"].get("acc_retain") for r in records
            if r.get("method") == "gold"}
    out = []
    for r in records:
        acc, ref = r["metrics"].get("acc_retain"), gold.get(r.get("seed"))
        if r.get("method") == method and isinstance(acc, (int, float)) \
                and isinstance(ref, (int, float)):
            out.append((r.get("seed"), float(acc), float(ref)))
    return sorted(out)
